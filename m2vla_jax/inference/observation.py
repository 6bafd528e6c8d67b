"""Raw observations (camera frames, proprio, instruction strings) -> the model's batch contract.

Owns the inverse of the data pipeline's per-frame transforms at inference time, for every caller
that holds raw observations: the Meta-World adapter (`sim.common.policy_adapter`) and the policy server
(`serving.server`) both encode through `ObservationEncoder`, so a robot, a simulator and a server
see the ids, pixels and normalized state the policy was trained on.

  images      uint8 [B, C_raw, H, W, 3] -> resized (OpenCV bilinear, as `data.transforms.decode_resize`)
              to the training `image_size`, placed in the training camera slots by `camera_index`
              (slot name -> raw camera index); a slot whose raw camera is absent or masked is zeros,
              mask False, as in training data
  image_mask  bool [B, C_raw]
  state       float [B, S_d] raw -> normalized with the run's statistics, zero-padded to the model's S
  instruction list[str] of B -> tokens int32 [B, T] / token_mask bool [B, T] (training tokenizer)

A malformed observation raises `ObservationError`, whose `field` names the offending key.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from m2vla_jax.data import loader
from m2vla_jax.data import transforms
from m2vla_jax.inference import normalization as norm_lib
from m2vla_jax.text import tokenizers

RAW_KEYS = ("images", "image_mask", "state", "instruction")


class ObservationError(ValueError):
  """A raw observation does not fit the contract; `field` names the key ('' for the whole dict)."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


class ObservationEncoder:
  """`encoder(raw) -> {'images', 'image_mask', 'state', 'tokens', 'token_mask'}` (numpy, batch contract).

  Args:
    normalization: the run's `RunNormalization` (state normalizer; its `model_state_dim` is S).
    tokenizer: the training tokenizer (`text.tokenizers.make_tokenizer`).
    max_tokens: T of the training batches.
    image_size: (H, W) of the training images.
    cameras: the pipeline's camera slots, in batch order.
    camera_index: slot name -> index of that camera in the raw `images`; default: slot i is raw
      camera i (a robot or server client sends cameras in the order the metadata lists them).
  """

  def __init__(self, normalization: norm_lib.RunNormalization, tokenizer: Any, max_tokens: int,
               image_size: Sequence[int], cameras: Sequence[str],
               camera_index: Optional[Mapping[str, int]] = None):
    self.normalization = normalization
    self.image_size = tuple(int(x) for x in image_size)
    self.cameras = tuple(cameras)
    if camera_index is None:
      camera_index = {name: i for i, name in enumerate(self.cameras)}
    bad = [c for c in self.cameras if c not in camera_index]
    if bad:
      raise ValueError(f"cameras={list(self.cameras)}: slots {bad} have no raw camera; the raw "
                       f"observation provides {sorted(camera_index)}")
    self.camera_index = {c: int(camera_index[c]) for c in self.cameras}
    self.max_tokens = int(max_tokens)
    self._tokenize = tokenizers.Tokenize(tokenizer, max_tokens)

  @classmethod
  def from_config(cls, config: Any, normalization: norm_lib.RunNormalization,
                  camera_index: Optional[Mapping[str, int]] = None) -> "ObservationEncoder":
    """With the run's tokenizer and pipeline settings (`config.data.tokenizer`, `config.data.pipeline`)."""
    for field in ("tokenizer", "pipeline"):
      if field not in config.data:
        raise ValueError(f"the run's config has no data.{field}; encoding raw observations needs the "
                         f"training tokenizer and pipeline settings (an RLDS-trained run)")
    pipe = loader.pipeline_config(config)   # the batch geometry resolved from the policy
    return cls(normalization, tokenizers.make_tokenizer(config.data.tokenizer),
               max_tokens=int(pipe.max_tokens), image_size=tuple(pipe.image_size),
               cameras=tuple(pipe.cameras), camera_index=camera_index)

  @property
  def state_dim(self) -> int:
    """S_d, the raw state dims a caller sends."""
    return self.normalization.state_dim

  @property
  def num_raw_cameras(self) -> int:
    """The fewest raw cameras that fill every slot."""
    return max(self.camera_index.values()) + 1

  def check(self, obs: Mapping[str, Any]) -> int:
    """Raises ObservationError on a malformed raw observation; returns its batch size B."""
    if not hasattr(obs, "keys"):
      raise ObservationError("", f"observation must be a dict, got {type(obs).__name__}")
    missing = [k for k in RAW_KEYS if k not in obs]
    if missing:
      raise ObservationError(missing[0], f"observation is missing {missing} (has {sorted(obs)}); a raw "
                             "observation has images [B,C,H,W,3] uint8, image_mask [B,C] bool, "
                             "state [B,S] float, instruction list[str]")
    images = obs["images"]
    if (not isinstance(images, np.ndarray) or images.ndim != 5 or images.shape[-1] != 3
        or images.dtype != np.uint8):
      raise ObservationError("images", f"observation['images'] is {_describe(images)}; expected uint8 "
                             f"[B, C, H, W, 3]")
    b, c_raw = images.shape[:2]
    if b < 1 or min(images.shape[2:4]) < 1:
      raise ObservationError("images", f"observation['images'] has shape {images.shape}; B, H and W "
                             "must be >= 1")
    mask = obs["image_mask"]
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (b, c_raw):
      raise ObservationError("image_mask", f"observation['image_mask'] is {_describe(mask)}; expected "
                             f"bool {(b, c_raw)}")
    state = obs["state"]
    d = self.state_dim
    if (not isinstance(state, np.ndarray) or not np.issubdtype(state.dtype, np.floating)
        or state.shape != (b, d)):
      raise ObservationError("state", f"observation['state'] is {_describe(state)}; expected float "
                             f"{(b, d)} (the training dataset's state dims)")
    if not np.isfinite(state).all():
      raise ObservationError("state", "observation['state'] holds NaN or infinite values")
    instructions = obs["instruction"]
    if (isinstance(instructions, (str, bytes)) or not isinstance(instructions, (list, tuple))
        or len(instructions) != b or not all(isinstance(t, str) for t in instructions)):
      raise ObservationError("instruction", f"observation['instruction'] must be a list of {b} "
                             f"strings, got {instructions!r:.200}")
    return b

  def __call__(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch-contract observation of a raw one (see the module docstring)."""
    if hasattr(obs, "keys"):   # lists and plain arrays from in-process callers
      obs = dict(obs)
      for k in ("images", "image_mask", "state"):
        if k in obs and not isinstance(obs[k], np.ndarray):
          obs[k] = np.asarray(obs[k], bool if k == "image_mask" else None)
      if isinstance(obs.get("image_mask"), np.ndarray) and obs["image_mask"].dtype != np.bool_:
        obs["image_mask"] = obs["image_mask"].astype(bool)
    b = self.check(obs)
    images, image_mask = obs["images"], obs["image_mask"]
    c_raw = images.shape[1]
    out_images = np.zeros((b, len(self.cameras), *self.image_size, 3), np.uint8)
    out_mask = np.zeros((b, len(self.cameras)), bool)
    for slot, name in enumerate(self.cameras):
      k = self.camera_index[name]
      if k >= c_raw:
        continue  # this camera is not sent: absent, as in training data
      for i in range(b):
        if image_mask[i, k]:
          out_images[i, slot] = transforms.decode_resize(images[i, k], self.image_size)
          out_mask[i, slot] = True
    state = self.normalization.normalize_state(obs["state"].astype(np.float64)).astype(np.float32)
    try:
      tokens, token_mask = zip(*(self._tokenize(t) for t in obs["instruction"]))
    except ValueError as e:   # a closed-vocabulary tokenizer refusing a word
      raise ObservationError("instruction", str(e)) from e
    return {"images": out_images, "image_mask": out_mask, "state": state,
            "tokens": np.stack(tokens).astype(np.int32), "token_mask": np.stack(token_mask)}


def _describe(x: Any) -> str:
  if isinstance(x, np.ndarray):
    return f"{x.dtype} {x.shape}"
  return type(x).__name__

"""Raw simulator observation -> model observation -> Meta-World actions, for any trained M²-VLA.

Owns the inverse of the data pipeline's per-frame transforms at inference time, so that a policy
trained on RLDS demonstrations runs in the closed loop of `sim.evaluate_metaworld`:

  images   uint8 [B, C_sim, H, W, 3] -> resized (OpenCV bilinear, as `data.transforms.decode_resize`)
           to the training `image_size` and placed in the training camera slots (sim camera 0 is
           'primary', camera 1 'wrist'); slots the simulator does not render are zeros, mask False
  instruction list[str] -> tokens / token_mask with the training tokenizer (`text.tokenizers.Tokenize`)
  state    float [B, S_sim] -> normalized with the dataset statistics, zero-padded to the model's S
  actions  normalized [B, H, A] -> the dataset's units (first A_d dims) -> float64 [B, H, A_d]

The model call (`sample_actions`) is jitted once; a fixed evaluation batch size compiles once.
Build it from a training run (`from_workdir`, newest checkpoint) or an export bundle (`from_bundle`),
both through `inference.InferencePolicy`; normalization is `inference.normalization`'s, shared
with export bundles and the MJX rollout.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from m2vla_jax.data import transforms
from m2vla_jax.inference import normalization
from m2vla_jax.inference.policy import InferencePolicy
from m2vla_jax.text import tokenizers

# Simulator camera index of each pipeline camera slot (metaworld_env: primary, then wrist).
SIM_CAMERA_INDEX = {"primary": 0, "wrist": 1}


class SimPolicyAdapter:
  """`adapter(obs) -> actions float64 [B, H, A_d]` in the dataset's (Meta-World's) units.

  Args:
    policy: an object with `sample_actions(params, state, observation, rng)` (models.m2vla.M2VLA).
    params, state: the policy's parameters and state (MSM memory).
    statistics: the run's statistics asset ({'normalization', 'datasets': {name: stats}, ...}).
    tokenizer: the training tokenizer (`encode` or `tokenize_batch`).
    max_tokens: T of the training batches.
    image_size: (H, W) of the training images.
    cameras: the pipeline's camera slots, in batch order.
    state_dim: the model's S (statistics dims are zero-padded up to it).
    dataset: statistics entry to use (default: the only one).
    seed: base of the per-call sampling rng.
  """

  def __init__(self, policy: Any, params: Any, state: Any, statistics: Mapping[str, Any],
               tokenizer: Any, max_tokens: int, image_size: Sequence[int], cameras: Sequence[str],
               state_dim: int, dataset: str | None = None, seed: int = 0):
    self.normalization = normalization.RunNormalization.from_statistics(statistics, state_dim, dataset)
    bad = [c for c in cameras if c not in SIM_CAMERA_INDEX]
    if bad:
      raise ValueError(f"cameras={list(cameras)}: slots {bad} have no simulator camera; the "
                       f"simulator renders {sorted(SIM_CAMERA_INDEX)}")
    self.dataset = self.normalization.dataset
    self.policy, self.params, self.state = policy, params, state
    self.image_size = tuple(int(x) for x in image_size)
    self.cameras = tuple(cameras)
    self.state_dim = int(state_dim)
    self._tokenize = tokenizers.Tokenize(tokenizer, max_tokens)
    self._sample = jax.jit(policy.sample_actions)
    self._rng = jax.random.PRNGKey(seed)
    self._calls = 0

  # ------------------------------------------------------------------ builders
  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> "SimPolicyAdapter":
    """From a training run's newest (or given) checkpoint, on one device."""
    return cls.from_inference_policy(InferencePolicy.from_workdir(workdir, step), **kwargs)

  @classmethod
  def from_bundle(cls, path: str, **kwargs) -> "SimPolicyAdapter":
    """From an export bundle (`m2vla_jax.inference.export`)."""
    return cls.from_inference_policy(InferencePolicy.from_bundle(path), **kwargs)

  @classmethod
  def from_inference_policy(cls, loaded: InferencePolicy, **kwargs) -> "SimPolicyAdapter":
    """Around a restored policy, with its run's tokenizer and pipeline settings."""
    config, policy = loaded.config, loaded.policy
    for field in ("tokenizer", "pipeline"):
      if field not in config.data:
        raise ValueError(f"the run's config has no data.{field}; the adapter needs the training "
                         f"tokenizer and pipeline settings (an RLDS-trained run)")
    pipe = config.data.pipeline
    return cls(policy, loaded.params, loaded.state, loaded.statistics,
               tokenizer=tokenizers.make_tokenizer(config.data.tokenizer),
               max_tokens=int(pipe.max_tokens), image_size=tuple(pipe.image_size),
               cameras=tuple(pipe.cameras), state_dim=int(policy.config.state_dim), **kwargs)

  # ------------------------------------------------------------------ transforms
  def model_observation(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch-contract observation for a raw simulator observation (see module docstring)."""
    if not hasattr(obs, "keys"):
      raise ValueError(f"observation must be a dict, got {type(obs).__name__}")
    missing = [k for k in ("images", "image_mask", "state", "instruction") if k not in obs]
    if missing:
      raise ValueError(f"observation is missing {missing} (has {sorted(obs)}); the simulator "
                       "observation has images [B,C,H,W,3] uint8, image_mask [B,C], state [B,S], "
                       "instruction list[str]")
    images = np.asarray(obs["images"])
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"observation['images'] is {images.dtype} {images.shape}; expected uint8 "
                       f"[B, C, H, W, 3]")
    b, c_sim = images.shape[:2]
    image_mask = np.asarray(obs["image_mask"], bool)
    if image_mask.shape != (b, c_sim):
      raise ValueError(f"observation['image_mask'] has shape {image_mask.shape}; expected {(b, c_sim)}")
    state = np.asarray(obs["state"], np.float64)
    d = self.normalization.state_dim
    if state.shape != (b, d):
      raise ValueError(f"observation['state'] has shape {state.shape}; expected {(b, d)} (the "
                       f"training dataset's state dims)")
    instructions = obs["instruction"]
    if isinstance(instructions, str) or len(instructions) != b or not all(
        isinstance(t, str) for t in instructions):
      raise ValueError(f"observation['instruction'] must be a list of {b} strings, got "
                       f"{instructions!r:.200}")
    out_images = np.zeros((b, len(self.cameras), *self.image_size, 3), np.uint8)
    out_mask = np.zeros((b, len(self.cameras)), bool)
    for slot, name in enumerate(self.cameras):
      k = SIM_CAMERA_INDEX[name]
      if k >= c_sim:
        continue  # the simulator does not render this camera: absent, as in training data
      for i in range(b):
        if image_mask[i, k]:
          out_images[i, slot] = transforms.decode_resize(images[i, k], self.image_size)
          out_mask[i, slot] = True
    norm_state = self.normalization.normalize_state(state).astype(np.float32)
    tokens, token_mask = zip(*(self._tokenize(t) for t in instructions))
    return {"images": out_images, "image_mask": out_mask, "state": norm_state,
            "tokens": np.stack(tokens).astype(np.int32), "token_mask": np.stack(token_mask)}

  def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
    """Dataset units [..., A_d] -> normalized float32 [..., A_d] (the training targets)."""
    return self.normalization.normalize_actions(np.asarray(actions, np.float64)).astype(np.float32)

  def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
    """Normalized [..., A] -> dataset units float64 [..., A_d] (model padding dims dropped)."""
    return self.normalization.unnormalize_actions(np.asarray(actions, np.float64))

  def __call__(self, obs: Mapping[str, Any]) -> np.ndarray:
    model_obs = self.model_observation(obs)
    rng = jax.random.fold_in(self._rng, self._calls)
    self._calls += 1
    actions = np.asarray(self._sample(self.params, self.state, model_obs, rng))
    return self.unnormalize_actions(actions)

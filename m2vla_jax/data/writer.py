"""In-memory episodes -> an RLDS TFDS dataset on disk that `rlds.load_dataset` reads back.

    write_rlds_dataset(episodes, out_dir, 'my_sim_demos', version='1.0.0', split='train')

An episode is a dict of per-step arrays with a leading time axis T:
  observation: {key: array [T, ...]}    uint8 [T, H, W, 3] arrays become TFDS Images (jpeg or png)
  action: float [T, A]
  language_instruction: str (one for the episode) or a sequence of T strings
  optional: is_first, is_last, is_terminal (bool [T]; default first / last / last), reward,
            discount (float32 [T]; default 0 / 1), episode_metadata (dict of scalars; file_path and
            episode_id are filled in when absent)
Features come from the first episode; every other episode must match them (same keys, dtypes and
trailing shapes; images may change size only if `variable_image_size=True`). Written through TFDS's own
`store_as_tfds_dataset`, so the result is an ordinary prepared TFDS dataset (`<out_dir>/<name>/<version>/`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import tqdm

from m2vla_jax.data.errors import DataError

_FLAGS = ("is_first", "is_last", "is_terminal")


def _steps_of(ep: Mapping[str, Any], i: int, allow_empty: bool) -> tuple[dict, int]:
  if "action" not in ep or "observation" not in ep:
    raise DataError(f"episode {i}: needs 'observation' and 'action' (got {sorted(ep)}).")
  action = np.asarray(ep["action"])
  t = action.shape[0]
  if t == 0 and not allow_empty:
    raise DataError(f"episode {i}: empty (0 steps); RLDS episodes need at least one step "
                    "(allow_empty_episodes=True writes it anyway, e.g. to test readers).")
  steps: dict[str, Any] = {"action": action.astype(np.float32),
                           "observation": {k: np.asarray(v) for k, v in ep["observation"].items()}}
  text = ep.get("language_instruction", "")
  steps["language_instruction"] = [text] * t if isinstance(text, str) else list(text)
  for k in _FLAGS:
    default = np.arange(t) == (0 if k == "is_first" else t - 1)
    steps[k] = np.asarray(ep.get(k, default), bool)
  steps["reward"] = np.asarray(ep.get("reward", np.zeros(t)), np.float32)
  steps["discount"] = np.asarray(ep.get("discount", np.ones(t)), np.float32)
  for k, v in {**steps["observation"], **{k: steps[k] for k in steps if k != "observation"}}.items():
    if len(v) != t:
      raise DataError(f"episode {i} field {k!r}: {len(v)} steps, but 'action' has {t}.")
  return steps, t


def _is_image(x: np.ndarray) -> bool:
  return x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3


def write_rlds_dataset(episodes: Sequence[Mapping[str, Any]], out_dir: str, name: str, *,
                       version: str = "1.0.0", split: str = "train", image_encoding: str = "jpeg",
                       variable_image_size: bool = False, file_format: str = "tfrecord",
                       progress: bool = True, description: str | None = None,
                       allow_empty_episodes: bool = False) -> str:
  """Writes `episodes` as split `split` of `<out_dir>/<name>/<version>`; returns that directory."""
  import tensorflow_datasets as tfds
  if image_encoding not in ("jpeg", "png"):
    raise DataError(f"image_encoding={image_encoding!r}; use 'jpeg' or 'png'.")
  if not episodes:
    raise DataError("write_rlds_dataset: no episodes given.")
  prepared = [_steps_of(ep, i, allow_empty_episodes) for i, ep in enumerate(episodes)]
  first, _ = prepared[0]
  obs_feats = {}
  for k, v in first["observation"].items():
    if _is_image(v):
      shape = (None, None, 3) if variable_image_size else v.shape[1:]
      obs_feats[k] = tfds.features.Image(shape=shape, encoding_format=image_encoding)
    elif v.dtype.kind in "OSU":
      obs_feats[k] = tfds.features.Text()
    else:
      obs_feats[k] = tfds.features.Tensor(shape=v.shape[1:], dtype=v.dtype)
  for i, (steps, _) in enumerate(prepared):
    if set(steps["observation"]) != set(obs_feats):
      raise DataError(f"episode {i}: observation keys {sorted(steps['observation'])} differ from "
                      f"episode 0's {sorted(obs_feats)}.")
    for k, v in steps["observation"].items():
      ref = first["observation"][k]
      same = v.shape[1:] == ref.shape[1:] or (variable_image_size and v.ndim == 4 and v.shape[-1] == 3)
      if not same or v.dtype != ref.dtype:
        raise DataError(f"episode {i} field 'observation/{k}': {v.dtype}{list(v.shape[1:])} differs from "
                        f"episode 0's {ref.dtype}{list(ref.shape[1:])}.")
    if steps["action"].shape[1:] != first["action"].shape[1:]:
      raise DataError(f"episode {i} field 'action': shape {steps['action'].shape[1:]} differs from "
                      f"episode 0's {first['action'].shape[1:]}.")
  meta0 = dict(episodes[0].get("episode_metadata", {}))
  meta_feats = {"file_path": tfds.features.Text(), "episode_id": tfds.features.Scalar(np.int32)}
  for k, v in meta0.items():
    if k not in meta_feats:
      meta_feats[k] = (tfds.features.Text() if isinstance(v, (str, bytes))
                       else tfds.features.Tensor(shape=np.shape(v), dtype=np.asarray(v).dtype))
  features = tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset({
          "observation": obs_feats,
          "action": tfds.features.Tensor(shape=first["action"].shape[1:], dtype=np.float32),
          "language_instruction": tfds.features.Text(),
          "reward": tfds.features.Scalar(np.float32), "discount": tfds.features.Scalar(np.float32),
          **{k: tfds.features.Scalar(np.bool_) for k in _FLAGS},
      }),
      "episode_metadata": meta_feats,
  })

  def examples():
    it = enumerate(zip(prepared, episodes))
    if progress:
      it = tqdm.tqdm(it, total=len(prepared), desc=f"write {name}/{split}", leave=False)
    for i, ((steps, _), ep) in it:
      meta = {"file_path": f"{name}/{split}/episode_{i}", "episode_id": i,
              **dict(ep.get("episode_metadata", {}))}
      yield i, {"steps": steps, "episode_metadata": meta}

  os.makedirs(out_dir, exist_ok=True)
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=features, split_datasets={split: examples()},
      data_dir=out_dir, description=description or f"{name}: RLDS episodes written by m2vla_jax.",
      file_format=file_format, disable_shuffling=True)
  return os.path.join(out_dir, name, version)

"""Test helpers for the data package: a tiny tokenizer, toy episodes, a writer for arbitrary RLDS feature
layouts (published OXE specs, zlib-encoded tensors) and the shared-data locator."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from m2vla_jax.text.tokenizers import ByteTokenizer  # noqa: F401  (tests build pipelines with it)


def shared_data_dir() -> str | None:
  """$M2VLA_SHARED_DATA, else `<repo>/../shared/data`; None if it does not exist."""
  path = os.environ.get("M2VLA_SHARED_DATA")
  if not path:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(os.path.dirname(repo), "shared", "data")
  return path if os.path.isdir(path) else None


def _smooth_images(rng: np.random.Generator, t: int, hw: tuple[int, int]) -> np.ndarray:
  """uint8 [t, H, W, 3] colour gradients (smooth, so JPEG round trips are close)."""
  yy, xx = np.meshgrid(np.linspace(0, 1, hw[0]), np.linspace(0, 1, hw[1]), indexing="ij")
  base = rng.uniform(30, 220, (t, 1, 1, 3))
  slope = rng.uniform(-30, 30, (t, 1, 1, 3, 2))
  img = base + slope[..., 0] * yy[None, :, :, None] + slope[..., 1] * xx[None, :, :, None]
  return np.clip(img, 0, 255).astype(np.uint8)


def toy_episodes(num: int, lengths: Sequence[int] | int = 6, *, image_hw: tuple[int, int] = (16, 16),
                 action_dim: int = 4, state_dim: int = 3, seed: int = 0, task: str = "task") -> list[dict]:
  """Random episodes in `write_rlds_dataset` format: observation/image uint8, state, action (last dim
  a 0/1 gripper), language_instruction '<task> <i % 3>'."""
  rng = np.random.default_rng(seed)
  lengths = [lengths] * num if isinstance(lengths, int) else list(lengths)
  eps = []
  for i, t in enumerate(lengths):
    action = rng.normal(size=(t, action_dim)).astype(np.float32)
    action[:, -1] = rng.integers(0, 2, t)
    eps.append({
        "observation": {"image": _smooth_images(rng, t, image_hw),
                        "state": rng.normal(size=(t, state_dim)).astype(np.float32)},
        "action": action,
        "language_instruction": f"{task} {i % 3}",
    })
  return eps


def write_tfds_episodes(out_dir: str, name: str, step_features: Mapping[str, Any],
                        episodes: Sequence[Mapping[str, Any]], *, version: str = "0.1.0",
                        split: str = "train") -> str:
  """Writes `episodes` with exactly the given step features (a nested dict of `tfds.features`, e.g. a
  published OXE layout with nested action dicts or zlib-encoded tensors, which `writer.py` does not
  produce) as `<out_dir>/<name>/<version>`; returns that directory.

  Each episode is {'steps': nested dict of per-step arrays [T, ...] matching step_features,
  'file_path': str (optional, episode_metadata/file_path)}.
  """
  import tensorflow_datasets as tfds
  features = tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset(dict(step_features)),
      "episode_metadata": {"file_path": tfds.features.Text()},
  })

  def examples():
    for i, ep in enumerate(episodes):
      yield i, {"steps": ep["steps"],
                "episode_metadata": {"file_path": ep.get("file_path", f"{name}/{split}/episode_{i}")}}

  os.makedirs(out_dir, exist_ok=True)
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=features, split_datasets={split: examples()},
      data_dir=out_dir, description=f"{name}: test episodes in a given feature layout.",
      disable_shuffling=True)
  return os.path.join(out_dir, name, version)

"""Synthetic batches of the batch contract (docs/ARCHITECTURE.md), for the toy policy and tests.

`SyntheticData` yields deterministic batches whose actions are a fixed linear function of the
observation, so the loss can decrease; its state is `{'index': n}`. Shapes come from the toy
policy's config (`policies/toy.py: default_config`).
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np


class SyntheticData:
  """Deterministic batches of the batch contract; actions are a fixed linear map of state and image.

  Args:
    config: the toy model config (shapes).
    batch_size: per-host batch size.
    seed: data seed; `split` in {'train', 'val'} selects a disjoint stream.
    process_index, process_count: this host's rows of the global batch. Every host draws the same
      global batch and keeps its slice, so N hosts see exactly the rows one host would.
  """

  def __init__(self, config: Mapping[str, Any], batch_size: int, seed: int = 0, split: str = "train",
               num_batches: int | None = None, nan_at_batch: int = -1, slow_after_batch: int = -1,
               slow_seconds: float = 0.0, process_index: int = 0, process_count: int = 1):
    self.c = config
    self.process_index, self.process_count = process_index, process_count
    # Fault injection for trainer tests: NaN actions in one batch; slow batches (a preemption window).
    self.nan_at_batch, self.slow_after_batch, self.slow_seconds = nan_at_batch, slow_after_batch, slow_seconds
    self.batch_size = batch_size
    self.seed = seed + (0 if split == "train" else 1_000_003)
    self.num_batches = num_batches
    self.index = 0
    w = np.random.default_rng(1234)  # The task is the same for every split and seed.
    self.w_state = w.normal(size=(config["state_dim"], config["horizon"] * config["action_dim"])) * 0.5
    self.w_img = w.normal(size=(3, config["horizon"] * config["action_dim"])) * 0.5

  def make_batch(self, index: int) -> dict:
    c, b = self.c, self.batch_size * self.process_count
    rng = np.random.default_rng([self.seed, index])
    images = rng.integers(0, 256, size=(b, c["num_cameras"], c["image_size"], c["image_size"], 3),
                          dtype=np.uint8)
    state = rng.normal(size=(b, c["state_dim"])).astype(np.float32)
    tokens = rng.integers(1, c["vocab"], size=(b, c["num_tokens"])).astype(np.int32)
    token_mask = np.arange(c["num_tokens"])[None] < rng.integers(2, c["num_tokens"] + 1, size=(b, 1))
    img_feat = images[:, 0].astype(np.float32).mean(axis=(1, 2)) / 255.0 - 0.5
    actions = np.tanh(state @ self.w_state + img_feat @ self.w_img)
    actions = actions.reshape(b, c["horizon"], c["action_dim"]).astype(np.float32)
    batch = {
        "observation": {
            "images": images,
            "image_mask": np.ones((b, c["num_cameras"]), bool),
            "state": state,
            "tokens": np.where(token_mask, tokens, 0).astype(np.int32),
            "token_mask": token_mask,
        },
        "actions": actions,
        "action_mask": np.ones((b, c["horizon"]), bool),
        "frame_id": (index * b + np.arange(b)).astype(np.int32),
    }
    rows = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
    return jax.tree_util.tree_map(lambda x: x[rows], batch)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self.num_batches is not None and self.index >= self.num_batches:
      raise StopIteration
    batch = self.make_batch(self.index)
    if self.index == self.nan_at_batch:
      batch["actions"][:] = np.nan
    if 0 <= self.slow_after_batch <= self.index:
      time.sleep(self.slow_seconds)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.index = int(state["index"])

  def statistics(self) -> dict:
    """Statistics in the pipeline adapter's layout. The toy data is generated already normalized; these
    bounds (q01 = -2, q99 = 2, 'bounds' mode) make unnormalized actions twice the model's output, so export
    and evaluation have a non-trivial mapping to check; the last action dim is a gripper (not normalized)."""
    a, s = self.c["action_dim"], self.c["state_dim"]
    def block(d):
      return {"mean": [0.0] * d, "std": [1.0] * d, "q01": [-2.0] * d, "q99": [2.0] * d,
              "min": [-2.0] * d, "max": [2.0] * d}
    gripper = [False] * (a - 1) + [True]
    return {"normalization": "bounds",
            "datasets": {"synthetic": {"dataset": "synthetic", "action": block(a), "state": block(s),
                                       "action_gripper_mask": gripper}},
            "gripper_masks": {"synthetic": gripper}, "action_dim": a, "state_dim": s,
            "frame_id_ranges": {"synthetic": [0, 2**31 - 1]}}


def make_data(config: ml_collections.ConfigDict, split: str, batch_size: int, seed: int,
              process_index: int = 0, process_count: int = 1):
  """Data factory used by configs: `config.data.kind = 'synthetic'`."""
  d = config.data
  return SyntheticData(config.model, batch_size=batch_size, seed=seed, split=split,
                       process_index=process_index, process_count=process_count,
                       num_batches=None if split == "train" else d.get("val_batches", 4),
                       nan_at_batch=d.get("nan_at_batch", -1) if split == "train" else -1,
                       slow_after_batch=d.get("slow_after_batch", -1) if split == "train" else -1,
                       slow_seconds=d.get("slow_seconds", 0.0))

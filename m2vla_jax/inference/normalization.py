"""The run's normalization at inference: raw state in, unnormalized actions out; numpy or in-graph.

One formula for every caller (bundles, the Meta-World adapter, the compiled MJX rollout, a server),
taken from the training pipeline (`data.statistics.run_normalizers`: the gripper and padding dims
pass through unchanged):

  state    float [..., S_d] raw -> clip(x * scale + shift, lo, hi), zero-padded to the model's S
  actions  float [..., A] normalized -> (a[..., :A_d] - shift) / scale   (model padding dims dropped)

With `xp=numpy` the arithmetic is float64 (host callers cast as they need); with `xp=jax.numpy` it
is float32 with float32 constants, so it traces into a compiled rollout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from m2vla_jax.data import statistics as stats_lib


@dataclasses.dataclass(frozen=True, eq=False)
class RunNormalization:
  """The state normalizer and action unnormalizer of one dataset of a run's statistics asset."""
  dataset: str
  model_state_dim: int
  state: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]    # scale, shift, lo, hi [S_d]
  action: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]   # [A_d]

  @classmethod
  def from_statistics(cls, statistics: Mapping[str, Any], model_state_dim: int,
                      dataset: str | None = None) -> "RunNormalization":
    """`dataset` defaults to the only entry (or the first when all entries are equal)."""
    dataset, state, action = stats_lib.run_normalizers(statistics, dataset)
    if state[0].shape[0] > model_state_dim:
      raise ValueError(f"statistics of dataset {dataset!r} have {state[0].shape[0]} state dims, more "
                       f"than the model's state_dim={model_state_dim}; they are from another run")
    return cls(dataset, int(model_state_dim), tuple(state), tuple(action))

  @property
  def state_dim(self) -> int:
    """S_d, the dataset's raw state dims."""
    return self.state[0].shape[0]

  @property
  def action_dim(self) -> int:
    """A_d, the dataset's action dims."""
    return self.action[0].shape[0]

  def normalize_state(self, state: Any, xp: Any = np) -> Any:
    """float [..., S_d] raw -> float [..., model_state_dim] normalized, zero-padded."""
    scale, shift, lo, hi = self._constants(self.state, xp)
    x = xp.clip(xp.asarray(state, scale.dtype) * scale + shift, lo, hi)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, self.model_state_dim - x.shape[-1])]
    return xp.pad(x, pad)

  def normalize_actions(self, actions: Any, xp: Any = np) -> Any:
    """Dataset units [..., A_d] -> normalized [..., A_d] (the training targets)."""
    scale, shift, lo, hi = self._constants(self.action, xp)
    return xp.clip(xp.asarray(actions, scale.dtype) * scale + shift, lo, hi)

  def unnormalize_actions(self, actions: Any, xp: Any = np) -> Any:
    """Normalized [..., A] -> dataset units [..., A_d]."""
    scale, shift, _, _ = self._constants(self.action, xp)
    return (xp.asarray(actions[..., :scale.shape[0]], scale.dtype) - shift) / scale

  @staticmethod
  def _constants(norm, xp):
    dtype = np.float64 if xp is np else np.float32
    return tuple(np.asarray(x, dtype) for x in norm)

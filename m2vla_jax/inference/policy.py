"""A trained policy ready for inference: model observation -> actions in the dataset's units.

`InferencePolicy` is the one observation -> action path. It holds the policy object, its params and
state (MSM memory) and the run's statistics; `sample_actions` is jitted once per policy. Build it from
a training run (`from_workdir`: newest or given checkpoint, one device) or an export bundle
(`from_bundle`). Simulators and the server put their raw observations into the batch contract
(docs/ARCHITECTURE.md) and call it; in-graph callers (compiled rollouts) use `policy.sample_actions`
with `normalization(...)` and `xp=jax.numpy`.

  policy(observation, rng=None, dataset=None) -> float32 [B, H, A_d]
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np

from m2vla_jax.core import freezing
from m2vla_jax.inference import normalization
from m2vla_jax.training import trainer


def fold_lora(config, policy, params):
  """(config, policy, params) with a LoRA policy's W + (alpha / r) B A folded into its weights and the
  adapter turned off: the plain backbone then computes what the adapted one did, at the unadapted
  backbone's speed (unfolded, every wrapped einsum runs twice more). Anything else is returned as is:
  GSE's experts are routed per token and cannot fold."""
  adapter = getattr(policy, "adapter_config", None)
  if adapter is None or adapter.kind != "lora":
    return config, policy, params
  from m2vla_jax.models import adapters  # pylint: disable=g-import-not-at-top
  params = {**params, "vlm": adapters.merge_lora(params["vlm"], adapter)}
  config = config.copy_and_resolve_references()
  config.model.adapter.kind = None
  return config, trainer.build_policy(config), params


class InferencePolicy:
  """Policy + params + state + statistics; see the module docstring."""

  def __init__(self, config, params, state, statistics, batch_spec=None, policy=None):
    self.config, self.params, self.state = config, params, state
    self.statistics, self.batch_spec = statistics, batch_spec
    self.policy = trainer.build_policy(config) if policy is None else policy
    self._sample = jax.jit(self.policy.sample_actions)

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, fold: bool = True) -> "InferencePolicy":
    """A training run's newest (or given) checkpoint, restored on one device. `fold`: LoRA adapters
    are folded into the weights they adapt (`fold_lora`), as the export bundle does."""
    from m2vla_jax.inference import restore  # pylint: disable=g-import-not-at-top
    config, setup, state, assets = restore.restore_run(workdir, step)
    params, policy = freezing.merge(state.trainable, state.frozen), setup.policy
    if fold:
      config, policy, params = fold_lora(config, policy, params)
    return cls(config, params, state.policy_state, assets["statistics"], assets.get("batch_spec"),
               policy=policy)

  @classmethod
  def from_bundle(cls, path: str) -> "InferencePolicy":
    """An export bundle, checked whole at load (`inference.bundle.load_policy`)."""
    from m2vla_jax.inference import bundle  # pylint: disable=g-import-not-at-top
    return bundle.load_policy(path)

  @property
  def datasets(self) -> list[str]:
    return sorted(self.statistics["datasets"])

  @property
  def model_state_dim(self) -> int:
    return int(self.policy.config.state_dim)

  def normalization(self, dataset: Optional[str] = None) -> normalization.RunNormalization:
    """The state normalizer / action unnormalizer of `dataset` (default: the only one)."""
    return normalization.RunNormalization.from_statistics(self.statistics, self.model_state_dim,
                                                          dataset)

  def unnormalize(self, actions: np.ndarray, dataset: Optional[str] = None) -> np.ndarray:
    """Normalized [..., A] -> float32 [..., A_d] in the dataset's units."""
    return self.normalization(dataset).unnormalize_actions(np.asarray(actions)).astype(np.float32)

  def normalized_actions(self, observation: Mapping[str, Any], rng: Optional[jax.Array] = None
                         ) -> np.ndarray:
    """Batch-contract observation -> normalized actions float [B, H, A] (the model's output)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return np.asarray(self._sample(self.params, self.state, dict(observation), rng))

  def __call__(self, observation: Mapping[str, Any], rng: Optional[jax.Array] = None,
               dataset: Optional[str] = None) -> np.ndarray:
    return self.unnormalize(self.normalized_actions(observation, rng), dataset)

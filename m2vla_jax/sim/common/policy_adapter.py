"""Raw simulator observation -> model observation -> Meta-World actions, for any trained M²-VLA.

Owns the simulator's side of inference, so that a policy trained on RLDS demonstrations runs in the
closed loop of `sim.metaworld.evaluate`: which simulator camera fills which training camera slot
(sim camera 0 is 'primary', camera 1 'wrist') and the per-call sampling rng. The raw -> batch-contract
transforms (resize, tokenize, normalize state) are `inference.observation.ObservationEncoder`'s, shared
with the policy server:

  images   uint8 [B, C_sim, H, W, 3], image_mask [B, C_sim], state float [B, S_sim],
           instruction list[str] -> the batch contract (`inference.observation`)
  actions  normalized [B, H, A] -> the dataset's units (first A_d dims) -> float64 [B, H, A_d]

The model call (`sample_actions`) is jitted once; a fixed evaluation batch size compiles once.
Build it from a training run (`from_workdir`, newest checkpoint) or an export bundle (`from_bundle`),
both through `inference.InferencePolicy`; normalization is `inference.normalization`'s, shared
with export bundles and the MJX rollout.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from m2vla_jax.data import loader
from m2vla_jax.inference import normalization
from m2vla_jax.inference import observation
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
    self.encoder = observation.ObservationEncoder(self.normalization, tokenizer, max_tokens, image_size,
                                                  cameras, camera_index=SIM_CAMERA_INDEX)
    self.dataset = self.normalization.dataset
    self.policy, self.params, self.state = policy, params, state
    self.image_size, self.cameras = self.encoder.image_size, self.encoder.cameras
    self.state_dim = int(state_dim)
    self._sample = jax.jit(policy.sample_actions)
    self._rng = jax.random.PRNGKey(seed)
    self._calls = 0
    # (batch size, seconds) of every call's model part (observation in, actions back on the host):
    # the action-chunk latency an evaluation reports (`evaluation.summary.policy_latency`).
    self.call_seconds: list[tuple[int, float]] = []

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
    pipe = loader.pipeline_config(config)   # the batch geometry resolved from the policy
    return cls(policy, loaded.params, loaded.state, loaded.statistics,
               tokenizer=tokenizers.make_tokenizer(config.data.tokenizer),
               max_tokens=int(pipe.max_tokens), image_size=tuple(pipe.image_size),
               cameras=tuple(pipe.cameras), state_dim=int(policy.config.state_dim), **kwargs)

  # ------------------------------------------------------------------ transforms
  def model_observation(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch-contract observation for a raw simulator observation (`inference.observation`)."""
    return self.encoder(obs)

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
    start = time.perf_counter()
    actions = np.asarray(self._sample(self.params, self.state, model_obs, rng))
    self.call_seconds.append((len(actions), time.perf_counter() - start))
    return self.unnormalize_actions(actions)

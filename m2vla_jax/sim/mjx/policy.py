"""A trained M²-VLA as the `policy_fn` of the compiled MJX rollout (and of the C-MuJoCo loop).

Owns the in-graph (jnp) twin of the data pipeline's per-frame transforms, so that a policy trained
on the MJX demonstrations (RLDS through the grain pipeline) sees at evaluation exactly what it saw
in training:

  images   uint8 [N, C, S, S, 3]  rendered at the training image size (no resize; the demos were
                                  written losslessly at that size), passed through
  state    float [N, 4]           normalized with the dataset statistics
                                  (`inference.normalization`, the pipeline's formula, in-graph),
                                  zero-padded to the model's state_dim
  tokens   int32 [N, T]           the training tokenizer (`TrainingTokenizer`, hashable so that
                                  `rollout.EnvParams` stays a cache key), T = pipeline max_tokens
  actions  normalized [N, H, A]   -> dataset units on the first A_d dims (the same
                                  `inference.normalization` as bundles and the Meta-World adapter)

    trained = TrainedPolicy.from_workdir(workdir)
    env = trained.env_params(tasks=..., execute_steps=2, cameras=('table',))
    summary = rollout.report(rollout.rollout(trained.policy_fn, trained.params, env, rng, n_envs,
                                             horizon))

`policy_fn(params, obs, rng)` is one function object per TrainedPolicy (the rollout's compile
cache is keyed on it); `params = {'model': ..., 'state': ...}` (weights and MSM memory).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.data import loader
from m2vla_jax.inference import normalization
from m2vla_jax.inference.policy import InferencePolicy
from m2vla_jax.sim.mjx import rollout as rollout_lib

# What the model's observation takes from the rollout's (privileged state is left out).
MODEL_KEYS = ("images", "image_mask", "state", "tokens", "token_mask")


@dataclasses.dataclass(frozen=True)
class TrainingTokenizer:
  """str -> token ids exactly as the training pipeline's `text.tokenizers.Tokenize` produces them.

  Hashable by its spec, so two EnvParams built with the same tokenizer share one compiled rollout.
  """
  spec: str
  max_tokens: int

  def __call__(self, text: str) -> list[int]:
    tokens, mask = _tokenize(self.spec, self.max_tokens)(text)
    return [int(t) for t in np.asarray(tokens)[np.asarray(mask, bool)]]


_TOKENIZERS: dict[tuple[str, int], Any] = {}


def _tokenize(spec: str, max_tokens: int):
  key = (spec, max_tokens)
  if key not in _TOKENIZERS:
    from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
    _TOKENIZERS[key] = tokenizers.Tokenize(tokenizers.make_tokenizer(spec), max_tokens)
  return _TOKENIZERS[key]


class TrainedPolicy:
  """A policy object with `sample_actions`, its weights and the run's normalization statistics.

  Args:
    policy: e.g. `models.m2vla.M2VLA` (anything with `sample_actions(params, state, obs, rng)` and
      `config.state_dim`).
    params, state: weights and policy state (MSM memory).
    statistics: the run's statistics asset ({'normalization', 'datasets': {name: stats}}).
    tokenizer: training tokenizer spec (config.data.tokenizer) and max_tokens (pipeline T).
    image_size: training image side S (pipeline image_size, square).
    dataset: statistics entry (default: the only one).
  """

  def __init__(self, policy: Any, params: Any, state: Any, statistics: Mapping[str, Any],
               tokenizer: str, max_tokens: int, image_size: int, dataset: str | None = None):
    self.normalization = normalization.RunNormalization.from_statistics(
        statistics, int(policy.config.state_dim), dataset)
    self.policy, self.dataset = policy, self.normalization.dataset
    self.params = {"model": params, "state": state}
    self.tokenizer = TrainingTokenizer(str(tokenizer), int(max_tokens))
    self.image_size = int(image_size)
    self.state_dim = int(policy.config.state_dim)
    if self.normalization.action_dim != 4:
      raise ValueError(f"the dataset's actions have {self.normalization.action_dim} dims; the MJX "
                       f"tasks take 4 (hand xyz delta, gripper)")
    self.policy_fn = self._make_policy_fn()

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "TrainedPolicy":
    """From a training run's newest (or given) checkpoint, on one device."""
    loaded = InferencePolicy.from_workdir(workdir, step)
    config = loaded.config
    pipe = loader.pipeline_config(config)   # the batch geometry resolved from the policy
    size = tuple(int(x) for x in pipe.image_size)
    if size[0] != size[1]:
      raise ValueError(f"data.pipeline.image_size={size}: the MJX renderer makes square images")
    return cls(loaded.policy, loaded.params, loaded.state, loaded.statistics,
               tokenizer=config.data.tokenizer, max_tokens=int(pipe.max_tokens),
               image_size=size[0])

  def normalize_state(self, state: jax.Array) -> jax.Array:
    """float [N, S_d] raw -> float32 [N, state_dim] (the pipeline's formula, zero-padded)."""
    return self.normalization.normalize_state(state, xp=jnp)

  def unnormalize_actions(self, actions: jax.Array) -> jax.Array:
    """Normalized [..., A] -> dataset units float32 [..., 4] (model padding dims dropped)."""
    return self.normalization.unnormalize_actions(actions, xp=jnp)

  def _make_policy_fn(self):
    def policy_fn(params: Mapping[str, Any], obs: Mapping[str, jax.Array], rng: jax.Array
                  ) -> jax.Array:
      """Rollout contract: obs (rollout module docstring) -> float32 [N, H, 4] in [-1, 1]."""
      if obs["images"].shape[-2] != self.image_size:
        raise ValueError(f"rendered images are {obs['images'].shape[-3:-1]}; the policy was "
                         f"trained on {self.image_size}px (EnvParams.image_size)")
      model_obs = {k: obs[k] for k in MODEL_KEYS}
      model_obs["state"] = self.normalize_state(obs["state"])
      actions = self.policy.sample_actions(params["model"], params["state"], model_obs, rng)
      return jnp.clip(self.unnormalize_actions(actions), -1.0, 1.0)
    return policy_fn

  def env_params(self, tasks: Sequence[str], cameras: str | Sequence[str], execute_steps: int,
                 instructions: Sequence[str] | None = None) -> rollout_lib.EnvParams:
    """The rollout settings this policy needs (its image size, cameras and tokenizer)."""
    cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
    return rollout_lib.EnvParams(
        tasks=tuple(tasks), instructions=None if instructions is None else tuple(instructions),
        execute_steps=int(execute_steps), image_size=self.image_size, cameras=cameras,
        max_tokens=self.tokenizer.max_tokens, tokenizer=self.tokenizer)

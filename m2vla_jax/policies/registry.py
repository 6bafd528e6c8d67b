"""The policies a config can name (`config.policy`), and the contract each one keeps.

A policy class is built as `cls(config.model)` (or `cls(config.model, mesh=mesh)` when its
constructor takes a mesh, e.g. to shard its memory) and provides pure functions over explicit state:

  init(rng, example_batch) -> (params, state)        params: nested dict ('vlm/...', 'head/...')
  loss(params, state, batch, rng) -> (loss, (metrics, new_state))
  sample_actions(params, state, observation, rng) -> float [B, horizon, action_dim] (normalized)
  trainable_rules: [(regex, bool), ...] over parameter paths (first full match decides; core/freezing.py)
  frozen_dtype: dtype name of the frozen parameters (core/dtypes.py)
  batch_geometry: {'horizon', 'state_dim', 'action_dim', 'max_tokens'} the batches must have; the
    data loader builds its pipeline to it, so a config states each in config.model only

Optional: prepare(params, state) -> (params, state), called by the trainer once per start after `init`
and any pretrained weights, for parts derived from the backbone's final weights (an EMA teacher,
spectrally initialised adapters).

trainable_rules and frozen_dtype are the policy's config facts (`config.model.trainable` / `.frozen_dtype`); the trainer
reads them from the policy, so a run states them once.

The batch and observation layouts are in docs/ARCHITECTURE.md. Adding a policy: one file in
`policies/` and one line below; a 'module:Class' string in the config works without a line.
"""
from __future__ import annotations

from typing import Any

from m2vla_jax.core import registry

POLICIES = {
    "toy": "m2vla_jax.policies.toy:ToyPolicy",
    "m2vla": "m2vla_jax.policies.m2vla:M2VLA",
    "mole_vla": "m2vla_jax.policies.mole_vla:MoLeVLA",
}


def policy_class(name: str, field: str = "config.policy") -> Any:
  """The class `name` names (a POLICIES key or 'module:Class'); RegistryError naming `field`."""
  return registry.resolve(name, POLICIES, field)


def batch_geometry(policy: str, model_config: Any) -> dict[str, int]:
  """The batch geometry of the policy `policy` names, built from `model_config` (no weights)."""
  return dict(policy_class(policy)(model_config).batch_geometry)

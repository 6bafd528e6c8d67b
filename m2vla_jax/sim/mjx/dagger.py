"""DAgger (Ross, Gordon and Bagnell, 2011) on the MJX tasks: the learner drives, the expert labels.

Behaviour cloning compounds its own errors: a cloned policy that is a few centimetres off goes
into states no demonstration visits, where nothing tells it how to recover (docs/results/mjx_runs.md: with the
colour word grounded, the policy descended 3-7 cm beside the block, closed the fingers on nothing
and stayed on the table). The scripted experts are memoryless functions of the privileged state,
so any visited state can be labelled. One DAgger round:

  1. roll out the trained policy in the compiled MJX program, each policy call handing control
     to the expert with probability `beta` (so episodes also reach the later phases of a task);
  2. label every visited state with the expert's clean action (`experts.expert_action`);
  3. write those episodes (cut at first success, or as many steps after it as the demonstrations
     keep; failures kept whole: they hold the recoveries)
     as an RLDS dataset, and train the next policy on demonstrations + every round so far, all
     normalized with the demonstrations' statistics (`pipeline.shared_statistics`).

The learner runs with `execute_steps=1` here (a new chunk every control step), so the recorded
steps are consecutive control steps and the dataset's action chunks mean what they mean in the
demonstrations.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from m2vla_jax.sim.mjx import experts
from m2vla_jax.sim.mjx import rollout as rollout_lib


def mixed_policy(learner_fn: Callable) -> Callable:
  """Policy contract function with params {'learner': ..., 'beta': float []}: per environment and
  call, the expert's action (repeated over the chunk) with probability beta, else the learner's."""

  def policy_fn(params, obs, rng):
    k_learner, k_mix = jax.random.split(rng)
    chunk = learner_fn(params["learner"], obs, k_learner)                       # [N, H, 4]
    expert = experts.expert_policy(None, obs, rng)                              # [N, 1, 4]
    use_expert = jax.random.uniform(k_mix, (chunk.shape[0], 1, 1)) < params["beta"]
    return jnp.where(use_expert, jnp.broadcast_to(expert, chunk.shape), chunk)
  return policy_fn


def collect(learner_fn: Callable, learner_params: Any, env: rollout_lib.EnvParams, rng: jax.Array,
            n_envs: int, horizon: int, beta: float, image_keys: Sequence[str] = ("image",),
            post_success_steps: int = 0, post_success_tasks: Sequence[str] | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """One round: (writer episodes labelled by the expert, rollout summary of the mixed policy).
  `image_keys`: each camera's observation key (experts.camera_slots); `post_success_*`: steps kept
  after a success, as the demonstrations were cut (experts.demo_episodes)."""
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"DAgger beta={beta} must be in [0, 1] (probability of an expert action)")
  if env.execute_steps != 1 or not env.record:
    raise ValueError(f"DAgger collection needs EnvParams(execute_steps=1, record=True) (got "
                     f"execute_steps={env.execute_steps}, record={env.record}): every control "
                     f"step must be a recorded, labelled step")
  result = rollout_lib.rollout(mixed_policy(learner_fn),
                               {"learner": learner_params, "beta": jnp.float32(beta)},
                               env, rng, n_envs, horizon)
  experts.relabel_with_expert(result)
  return (experts.demo_episodes(result, only_successful=False, image_keys=image_keys,
                                post_success_steps=post_success_steps,
                                post_success_tasks=post_success_tasks),
          rollout_lib.summarize(result))


def round_name(demo_name: str, k: int) -> str:
  """Readable prefix of round k's dataset (`round_spec` adds the hash): `<demos>_dagger<k>`."""
  return f"{demo_name}_dagger{k}"


def round_spec(demo_name: str, k: int, learner_dir: str, beta: float, seed: int, n_envs: int,
               horizon: int, cameras: Sequence[str], post_success_steps: int = 0,
               post_success_tasks: Sequence[str] | None = None) -> dict[str, Any]:
  """The demo cache's spec (`demo_cache`) of round k: what `collect` is given, with the learner
  named by its run directory (a run retrained in place must not reuse its old rounds' rollouts:
  start it in a new directory) and the experts' VERSION (they label every state)."""
  return {"simulator": "mjx_dagger", "experts_version": experts.VERSION, "demos": demo_name,
          "round": int(k), "learner": os.path.abspath(learner_dir), "beta": float(beta),
          "seed": int(seed), "episodes": int(n_envs), "horizon": int(horizon),
          "cameras": list(cameras), "post_success_steps": int(post_success_steps),
          "post_success_tasks": None if post_success_tasks is None else list(post_success_tasks),
          "image_encoding": "png"}

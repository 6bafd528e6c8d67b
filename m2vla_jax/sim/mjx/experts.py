"""Scripted experts for the MJX tasks (pure JAX, memoryless) and demonstrations from them.

Owns: `expert_action` (privileged state -> action; which phase to be in is decided from the
state alone, so it runs inside the compiled rollout with no extra carry), the chunked
`expert_policy` / `random_policy` behind the rollout's policy contract, and `collect_demos`,
which records expert rollouts (rendered camera, proprio, actions, instruction) and writes them
through `m2vla_jax.data.writer.write_rlds_dataset`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks as tasks_lib

# Bumped whenever the experts' behaviour changes: it is part of the demo cache name.
# 2: hysteresis on the descents (below).
VERSION = 2
HOVER_Z = 0.09           # hand height for travelling: fingertips clear the 4 cm blocks
# Descent hysteresis. A descent starts only when aligned within ALIGN_START, but once the hand is
# low it goes on while within ALIGN_KEEP. Without it a learner that is ~1 cm precise sits on the
# threshold, where the labels flip between "go up" and "go down" and their L1 median is "stay":
# cloned policies hovered 1.5 cm over the goal with the block in hand (RESULTS.md).
ALIGN_START = 0.012      # m, xy error that starts the descent to a block
ALIGN_KEEP = 0.018       # m, xy error under which a started descent (hand low) continues
PLACE_START, PLACE_KEEP = 0.008, 0.015   # the same for setting a block down on the goal
GRASP_DZ = -0.015        # hand origin (fingertips) relative to the block centre when grasping
CARRY_Z = 0.12
PUSH_Z = 0.006
_CONTACT_Q = scene_lib.BLOCK_HALF + scene_lib.FINGER_RADIUS   # finger q touching a block
_OPEN, _CLOSE = -1.0, 1.0


def _move(hand: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.clip((target - hand) / scene_lib.MAX_DELTA, -1.0, 1.0)


def _select(conds: Sequence[jax.Array], values: Sequence[jax.Array]) -> jax.Array:
  """The value of the first true condition (the last value is the default)."""
  out = values[-1]
  for c, v in zip(reversed(conds), reversed(values[:-1])):
    out = jnp.where(c, v, out)
  return out


def _pick_phases(hand, q, block):
  """(gripped, action) for reaching and grasping `block` (common to pick and place)."""
  xy_err = jnp.linalg.norm(hand[:2] - block[:2])
  grasp = block + jnp.array([0.0, 0.0, GRASP_DZ])
  gripped = ((q > 0.012) & (q < _CONTACT_Q + 0.003) & (xy_err < 0.02)
             & (jnp.abs(hand[2] - grasp[2]) < 0.03))
  low = hand[2] < HOVER_Z - 0.03
  aligned = (xy_err < ALIGN_START) | ((xy_err < ALIGN_KEEP) & low)
  at_grasp = aligned & (hand[2] < grasp[2] + 0.01)
  missed = at_grasp & (q <= 0.012)       # closed on nothing: open again
  hover = jnp.concatenate([block[:2], jnp.array([HOVER_Z])])
  up = jnp.concatenate([hand[:2], jnp.array([HOVER_Z])])
  action = _select(
      [missed, at_grasp, aligned, ~low],
      [jnp.append(_move(hand, up), _OPEN),
       jnp.append(_move(hand, grasp), _CLOSE),
       jnp.append(_move(hand, grasp), _OPEN),
       jnp.append(_move(hand, hover), _OPEN),
       jnp.append(_move(hand, up), _OPEN)])
  return gripped, action


def _pick(hand, q, block, goal):
  del goal
  gripped, reach = _pick_phases(hand, q, block)
  lift = jnp.append(_move(hand, jnp.concatenate([hand[:2], jnp.array([CARRY_Z])])), _CLOSE)
  return jnp.where(gripped, lift, reach)


def _place(hand, q, block, goal):
  gripped, reach = _pick_phases(hand, q, block)
  err = goal[:2] - block[:2]
  low = block[2] < scene_lib.BLOCK_HALF + 0.006
  # Heights from the hand, not the block: the block may sit higher or lower in the grasp.
  carry_z = CARRY_Z - 0.04
  over_goal = ((jnp.linalg.norm(err) < PLACE_START)
               | ((jnp.linalg.norm(err) < PLACE_KEEP) & (hand[2] < carry_z - 0.01)))
  set_down = hand[2] - (block[2] - scene_lib.BLOCK_HALF)   # hand height that puts it on the table
  carry = _select(
      [~over_goal & (hand[2] < carry_z - 0.01), ~over_goal, ~low],
      [jnp.append(_move(hand, jnp.concatenate([hand[:2], jnp.array([carry_z])])), _CLOSE),
       jnp.append(_move(hand, jnp.concatenate([hand[:2] + err, jnp.array([carry_z])])), _CLOSE),
       jnp.append(_move(hand, jnp.concatenate([hand[:2] + err, set_down[None] - 0.002])),
                  _CLOSE),
       jnp.append(jnp.zeros(3), _OPEN)])
  on_goal = (jnp.linalg.norm(err) < tasks_lib.GOAL_RADIUS - 0.01) & low
  leave = jnp.append(_move(hand, jnp.concatenate([hand[:2], jnp.array([HOVER_Z])])), _OPEN)
  return _select([gripped & ~on_goal, on_goal], [carry, leave, reach])


def _push(hand, q, block, goal):
  del q
  d = goal[:2] - block[:2]
  dist = jnp.linalg.norm(d)
  u = d / jnp.maximum(dist, 1e-6)
  perp = jnp.array([-u[1], u[0]])
  standoff = scene_lib.BLOCK_HALF + scene_lib.FINGER_RADIUS
  rel = hand[:2] - block[:2]
  along, lat = rel @ u, rel @ perp
  pre = block[:2] - u * (standoff + 0.02)
  behind = (along < -standoff + 0.01) & (along > -standoff - 0.04) & (jnp.abs(lat) < 0.012)
  low = hand[2] < 0.03
  push_target = jnp.concatenate(
      [hand[:2] + u * jnp.minimum(scene_lib.MAX_DELTA, dist) - perp * lat, jnp.array([PUSH_Z])])
  at_pre = jnp.linalg.norm(hand[:2] - pre) < 0.01
  action = _select(
      [dist < 0.008, behind & low, at_pre, hand[2] > HOVER_Z - 0.03],
      [jnp.zeros(3), _move(hand, push_target),
       _move(hand, jnp.concatenate([pre, jnp.array([PUSH_Z])])),
       _move(hand, jnp.concatenate([pre, jnp.array([HOVER_Z])])),
       _move(hand, jnp.concatenate([hand[:2], jnp.array([HOVER_Z])]))])
  return jnp.append(action, _CLOSE)


def expert_action(priv: jax.Array) -> jax.Array:
  """float [18] privileged state (tasks.privileged) -> float [4] action in [-1, 1]."""
  hand, q = priv[:3], priv[3]
  blocks = priv[4:13].reshape(scene_lib.NUM_BLOCKS, 3)
  goal = priv[13:16]
  task_id, block_id = priv[16].astype(jnp.int32), priv[17].astype(jnp.int32)
  block = blocks[block_id]
  branches = [lambda: _pick(hand, q, block, goal), lambda: _push(hand, q, block, goal),
              lambda: _place(hand, q, block, goal)]
  return jnp.stack([b() for b in branches])[task_id]


def expert_policy(params: Any, obs: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """Rollout policy contract: obs['privileged'] float [N, 18] -> chunk float [N, 1, 4].

  The expert is closed-loop, so run it with `execute_steps=1` (a chunk of one action).
  """
  del params, rng
  return jax.vmap(expert_action)(obs["privileged"])[:, None]


def noisy_expert_policy(params: jax.Array, obs: dict[str, jax.Array], rng: jax.Array
                        ) -> jax.Array:
  """The expert with Gaussian noise of std `params` (float []) on its hand motion; chunk
  [N, 1, 4]. For DART-style demonstrations: the noisy action is executed, the recorded label is
  the expert's clean action in the state that noise led to (`collect_demos`), so the data covers
  the states a slightly wrong policy drifts into and says how to get back."""
  clean = jax.vmap(expert_action)(obs["privileged"])
  noise = params * jax.random.normal(rng, clean[:, :3].shape)
  return jnp.clip(clean.at[:, :3].add(noise), -1.0, 1.0)[:, None]


def random_policy(params: Any, obs: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """Uniform actions in [-1, 1], chunk float [N, 1, 4] (a success floor; run with execute_steps=1)."""
  del params
  return jax.random.uniform(rng, (obs["state"].shape[0], 1, 4), minval=-1.0, maxval=1.0)


def collect_demos(out_dir: str, name: str, *, tasks: Sequence[str] = tasks_lib.TASKS,
                  episodes_per_task: int = 4, horizon: int = 60, seed: int = 0,
                  image_size: int = 64, only_successful: bool = True, camera: str = "front",
                  image_encoding: str = "png", noise: float = 0.0, layout_repeats: int = 1,
                  env_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
  """Runs the expert in the compiled rollout and writes the episodes as an RLDS dataset.

  Episodes end at their first success (like the Meta-World demos). Returns (dataset directory,
  rollout summary). Observations: 'image' uint8 [T, S, S, 3] (`camera`), 'state' float32
  [T, 4]; action float32 [T, 4]; language_instruction the episode's instruction.
  `image_encoding` defaults to lossless PNG: the closed-loop policy sees the renderer's exact
  pixels, so training on JPEG-decoded pixels would add a train/test gap (at 32 px JPEG blurs a
  2-3 px block into its neighbours).
  `noise` > 0: execute `noisy_expert_policy` (std `noise` on the hand motion) and record the
  clean expert action of each visited state as the label (DART: a learner's small errors then
  lead into states the data covers). With noise 0 the label is the executed action.
  `layout_repeats` (EnvParams.layout_repeats): consecutive episodes sharing one initial layout.
  """
  from m2vla_jax.data import writer  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  if episodes_per_task < 1:
    raise ValueError(f"episodes_per_task={episodes_per_task} must be >= 1")
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise={noise} must be in [0, 1] (std of the hand action, in action units)")
  env = rollout_lib.EnvParams(tasks=tuple(tasks), execute_steps=1, image_size=image_size,
                              cameras=(camera,), record=True, layout_repeats=layout_repeats,
                              **(env_kwargs or {}))
  n = episodes_per_task * len(tasks)
  result = rollout_lib.rollout(noisy_expert_policy, jnp.float32(noise), env, jax.random.key(seed),
                               n, horizon)
  # Labels: the expert's action in each recorded state (execute_steps=1: one state per step).
  relabel_with_expert(result)
  episodes = demo_episodes(result, only_successful)
  if not episodes:
    raise RuntimeError(f"no successful expert episode among {n}; nothing to write")
  path = writer.write_rlds_dataset(episodes, out_dir, name, progress=False,
                                   image_encoding=image_encoding,
                                   description=f"{name}: MJX tabletop scripted-expert "
                                               f"demonstrations cut at first success "
                                               f"(m2vla_jax.sim.mjx.experts).")
  return path, rollout_lib.summarize(result)


def relabel_with_expert(result: dict[str, Any]) -> None:
  """In place: `actions` become the clean expert action of every recorded state (the executed
  ones move to `executed_actions`). Needs a rollout recorded with `execute_steps=1`."""
  result["executed_actions"] = result["actions"]
  result["actions"] = np.asarray(jax.vmap(jax.vmap(expert_action))(result["privileged"]))


def demo_episodes(result: dict[str, Any], only_successful: bool = True) -> list[dict[str, Any]]:
  """Rollout output recorded with `EnvParams(record=True)` -> writer episodes (cut at success)."""
  frames = np.asarray(result["frames"])            # [T, N, C, S, S, 3]
  states = np.asarray(result["states"])            # [T, N, 4]
  actions = np.asarray(result["actions"])          # [T, N, 4]
  episodes = []
  for i, ins in enumerate(result["instructions"]):
    ok = bool(result["success"][i])
    if only_successful and not ok:
      continue
    t = int(result["success_step"][i]) + 1 if ok else frames.shape[0]
    episodes.append({
        "observation": {"image": frames[:t, i, 0], "state": states[:t, i].astype(np.float32)},
        "action": actions[:t, i].astype(np.float32),
        "language_instruction": ins,
        "episode_metadata": {"task": result["tasks"][i], "success": ok},
    })
  return episodes

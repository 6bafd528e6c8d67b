"""Scripted experts for the MJX tasks (pure JAX, memoryless) and demonstrations from them.

Owns: `expert_action` (privileged state -> action; which phase to be in is decided from the
state alone, so it runs inside the compiled rollout with no extra carry), the chunked
`expert_policy` / `random_policy` behind the rollout's policy contract, and `collect_demos`,
which records expert rollouts (rendered camera, proprio, actions, instruction) and writes them
through `m2vla_jax.data.writer.write_rlds_dataset`, with `demo_spec` / `demo_name` naming them in
the demo cache (`m2vla_jax.sim.common.demo_cache`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks as tasks_lib

# Bumped whenever the experts' behaviour changes: it is part of the demo cache's spec (`demo_spec`).
# 2: hysteresis on the descents. 3: funnels (below) instead of thresholds, release on hand height.
VERSION = 3
HOVER_Z = 0.09           # hand height for travelling: fingertips clear the 4 cm blocks
# Funnels. A cloned policy localises the block to ~1-1.5 cm from a 32 px image (docs/results/mjx_runs.md). Where
# the expert switched between "go down" and "stay up" at a sharp xy threshold (v1-v2), labels of
# states the policy cannot tell apart disagreed, their L1 median was "stay", and cloned policies
# hovered beside the block or over the goal. Now the height target is a continuous function of
# the xy error: all the way down within `*_IN`, at travel height beyond `*_OUT`, linear between,
# so nearby states get nearby labels and a 1 cm error only slows the descent.
REACH_IN, REACH_OUT = 0.008, 0.025    # m, xy error hand-to-block (the open fingers clear 1.7 cm)
PLACE_IN, PLACE_OUT = 0.008, 0.03     # m, xy error block-to-goal while carrying
PUSH_IN, PUSH_OUT = 0.01, 0.03        # m, xy error hand-to-pre-push point
GRASP_XY = 0.015         # m, xy error under which the fingers close at grasp height
GRASP_DZ = -0.015        # hand origin (fingertips) relative to the block centre when grasping
CARRY_Z = 0.08           # hand height while carrying a block to the goal
PUSH_Z = 0.006
# Let go when the hand is this low (block on the table for the nominal grasp, GRASP_DZ) or the
# block is within 6 mm of the table: the hand height is in the proprio, exact for the policy,
# where the block's height is a fraction of a pixel (v1-v2 released on block height only).
RELEASE_HAND_Z = scene_lib.BLOCK_HALF + GRASP_DZ + 0.006
RELEASE_XY = 0.02        # m, block-to-goal xy error under which a low block is let go
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


def _funnel(err: jax.Array, inner: float, outer: float, low: jax.Array, high: float) -> jax.Array:
  """Height target: `low` for err <= inner, `high` for err >= outer, linear between."""
  down = jnp.clip((outer - err) / (outer - inner), 0.0, 1.0)
  return high - down * (high - low)


def _xyz(xy: jax.Array, z: jax.Array) -> jax.Array:
  return jnp.concatenate([xy, jnp.reshape(z, (1,))])


def _pick_phases(hand, q, block):
  """(gripped, action) for reaching and grasping `block` (common to pick and place)."""
  xy_err = jnp.linalg.norm(hand[:2] - block[:2])
  grasp_z = block[2] + GRASP_DZ
  gripped = ((q > 0.012) & (q < _CONTACT_Q + 0.003) & (xy_err < 0.02)
             & (jnp.abs(hand[2] - grasp_z) < 0.03))
  at_grasp = (xy_err < GRASP_XY) & (hand[2] < grasp_z + 0.01)
  missed = at_grasp & (q <= 0.012)       # closed on nothing: open again on the way up
  reach = _xyz(block[:2], _funnel(xy_err, REACH_IN, REACH_OUT, grasp_z, HOVER_Z))
  action = _select(
      [missed, at_grasp],
      [jnp.append(_move(hand, _xyz(hand[:2], HOVER_Z)), _OPEN),
       jnp.append(_move(hand, _xyz(block[:2], grasp_z)), _CLOSE),
       jnp.append(_move(hand, reach), _OPEN)])
  return gripped, action


def _pick(hand, q, block, goal):
  del goal
  gripped, reach = _pick_phases(hand, q, block)
  lift = jnp.append(_move(hand, _xyz(hand[:2], CARRY_Z + 0.04)), _CLOSE)
  return jnp.where(gripped, lift, reach)


def _place(hand, q, block, goal):
  gripped, reach = _pick_phases(hand, q, block)
  err = goal[:2] - block[:2]
  dist = jnp.linalg.norm(err)
  # Heights from the hand, not the block: the block may sit higher or lower in the grasp.
  set_down = hand[2] - (block[2] - scene_lib.BLOCK_HALF)   # hand height that puts it on the table
  carry = jnp.append(_move(hand, _xyz(hand[:2] + err, _funnel(dist, PLACE_IN, PLACE_OUT,
                                                              set_down - 0.002, CARRY_Z))), _CLOSE)
  low = (hand[2] < RELEASE_HAND_Z) | (block[2] < scene_lib.BLOCK_HALF + 0.006)
  release = (dist < RELEASE_XY) & low
  let_go = jnp.append(jnp.zeros(3), _OPEN)
  on_goal = (dist < tasks_lib.GOAL_RADIUS - 0.01) & (block[2] < scene_lib.BLOCK_HALF + 0.006)
  leave = jnp.append(_move(hand, _xyz(hand[:2], HOVER_Z)), _OPEN)
  return _select([gripped & release, gripped, on_goal], [let_go, carry, leave, reach])


def _push(hand, q, block, goal):
  del q
  d = goal[:2] - block[:2]
  dist = jnp.linalg.norm(d)
  u = d / jnp.maximum(dist, 1e-6)
  perp = jnp.array([-u[1], u[0]])
  standoff = scene_lib.BLOCK_HALF + scene_lib.FINGER_RADIUS
  rel = hand[:2] - block[:2]
  along, lat = rel @ u, rel @ perp
  pre = block[:2] - u * (standoff + 0.015)
  behind = (along < -standoff + 0.01) & (along > -standoff - 0.04) & (jnp.abs(lat) < 0.015)
  low = hand[2] < 0.03
  push_target = _xyz(hand[:2] + u * jnp.minimum(scene_lib.MAX_DELTA, dist) - perp * lat,
                     jnp.float32(PUSH_Z))
  # Into the pre-push point down a funnel; climb first when low and not behind the block, so
  # the fingers never sweep the block (or another) on the way round.
  to_pre = jnp.linalg.norm(hand[:2] - pre)
  approach = _xyz(pre, _funnel(to_pre, PUSH_IN, PUSH_OUT, PUSH_Z, HOVER_Z))
  climb = (to_pre > PUSH_OUT) & (hand[2] < HOVER_Z - 0.03)
  action = _select(
      [dist < 0.008, behind & low, climb],
      [jnp.zeros(3), _move(hand, push_target), _move(hand, _xyz(hand[:2], HOVER_Z)),
       _move(hand, approach)])
  return jnp.append(action, _CLOSE)


def expert_action(priv: jax.Array) -> jax.Array:
  """float [PRIVILEGED_DIM] privileged state (tasks.privileged) -> float [4] action in [-1, 1]."""
  p = tasks_lib.Privileged.unpack(priv)
  hand, q, goal, block = p.hand, p.opening, p.goal, p.blocks[p.block_id]
  branches = [lambda: _pick(hand, q, block, goal), lambda: _push(hand, q, block, goal),
              lambda: _place(hand, q, block, goal)]
  return jnp.stack([b() for b in branches])[p.task_id]


def expert_policy(params: Any, obs: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """Rollout policy contract: obs["privileged"] float [N, PRIVILEGED_DIM] -> chunk float [N, 1, 4].

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


def camera_slots(cameras: Sequence[str]) -> tuple[tuple[str, str], ...]:
  """(pipeline camera slot, episode image key) per rendered camera, in order.

  The first camera is the 'primary' slot ('image', as in the OXE datasets); the scene's 'wrist'
  camera is the 'wrist' slot ('wrist_image'); one more camera may take the 'secondary' slot.
  """
  if not cameras:
    raise ValueError("cameras is empty; name one or more of scene.CAMERAS")
  scene_lib.check_cameras(cameras, "cameras")
  slots = [("primary", "image")] + [("wrist", "wrist_image") if c == "wrist"
                                    else ("secondary", f"{c}_image") for c in cameras[1:]]
  names = [s for s, _ in slots]
  if len(set(names)) != len(names) or len(set(cameras)) != len(cameras):
    raise ValueError(f"cameras={tuple(cameras)} map to camera slots {names}: at most one each of "
                     f"'primary' (the first camera), 'wrist' (the 'wrist' camera) and "
                     f"'secondary' (any other), no camera twice")
  return tuple(slots)


def random_policy(params: Any, obs: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """Uniform actions in [-1, 1], chunk float [N, 1, 4] (a success floor; run with execute_steps=1)."""
  del params
  return jax.random.uniform(rng, (obs["state"].shape[0], 1, 4), minval=-1.0, maxval=1.0)


def collect_demos(out_dir: str, name: str, *, tasks: Sequence[str] = tasks_lib.TASKS,
                  episodes_per_task: int = 4, horizon: int = 60, seed: int = 0,
                  image_size: int = 64, only_successful: bool = True,
                  cameras: Sequence[str] = ("front",),
                  image_encoding: str = "png", noise: float = 0.0, layout_repeats: int = 1,
                  post_success_steps: int = 0, post_success_tasks: Sequence[str] | None = None,
                  env_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
  """Runs the expert in the compiled rollout and writes the episodes as an RLDS dataset.

  Episodes end `post_success_steps` control steps after their first success (like the Meta-World
  demos; within `horizon`). Those steps matter for place: the release takes one or two control
  steps before success, so without them an episode holds almost no "let go" label and cloned
  policies carried the block to the goal and never let go (docs/results/mjx_runs.md). `post_success_tasks`
  (None: all) limits them to some tasks: on push they cost half its successes (docs/results/mjx_runs.md, run 25).
  Returns (dataset directory, rollout summary). Observations: one uint8 [T, S, S, 3] image per camera, keyed as
  `camera_slots(cameras)` says ('image' for the first), 'state' float32 [T, 4]; action float32
  [T, 4]; language_instruction the episode's instruction.
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
  keys = tuple(k for _, k in camera_slots(cameras))
  if post_success_steps < 0:
    raise ValueError(f"post_success_steps={post_success_steps} must be >= 0")
  for t in post_success_tasks or ():
    if t not in tasks:
      raise ValueError(f"post_success_tasks names {t!r}, which is not among tasks={tuple(tasks)}")
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise={noise} must be in [0, 1] (std of the hand action, in action units)")
  env = rollout_lib.EnvParams(tasks=tuple(tasks), execute_steps=1, image_size=image_size,
                              cameras=tuple(cameras), record=True, layout_repeats=layout_repeats,
                              **(env_kwargs or {}))
  n = episodes_per_task * len(tasks)
  result = rollout_lib.rollout(noisy_expert_policy, jnp.float32(noise), env, jax.random.key(seed),
                               n, horizon)
  # Labels: the expert's action in each recorded state (execute_steps=1: one state per step).
  relabel_with_expert(result)
  episodes = demo_episodes(result, only_successful, post_success_steps, image_keys=keys,
                           post_success_tasks=post_success_tasks)
  if not episodes:
    raise RuntimeError(f"no successful expert episode among {n}; nothing to write")
  path = writer.write_rlds_dataset(episodes, out_dir, name, progress=False,
                                   image_encoding=image_encoding,
                                   description=f"{name}: MJX tabletop scripted-expert "
                                               f"demonstrations cut at first success "
                                               f"(m2vla_jax.sim.mjx.experts).")
  return path, rollout_lib.summarize(result)


def demo_spec(*, tasks: Sequence[str], episodes_per_task: int, horizon: int, seed: int,
              image_size: int, cameras: Sequence[str], noise: float, layout_repeats: int,
              post_success_steps: int = 0, post_success_tasks: Sequence[str] | None = None,
              image_encoding: str = "png") -> dict[str, Any]:
  """The demo cache's spec (`demo_cache`) of `collect_demos` with these arguments (the others at
  their defaults) and the experts' VERSION: everything that changes the recorded episodes.

  Post-success steps are written as they act: the tasks that keep them, none when no task does.
  """
  kept = [t for t in tasks if post_success_tasks is None or t in post_success_tasks]
  post = int(post_success_steps) if kept else 0
  return demo_cache.canonical({
      "simulator": "mjx", "experts_version": VERSION, "tasks": list(tasks),
      "episodes_per_task": int(episodes_per_task), "horizon": int(horizon), "seed": int(seed),
      "image_size": int(image_size), "cameras": list(cameras), "noise": float(noise),
      "layout_repeats": int(layout_repeats), "post_success_steps": post,
      "post_success_tasks": kept if post else [], "image_encoding": image_encoding})


def demo_name(spec: Mapping[str, Any]) -> str:
  """Demo cache name of a `demo_spec`: tasks, cameras, size and demos per task, and the hash."""
  short = "-".join(t.split("_")[0] for t in spec["tasks"])
  return demo_cache.cache_name(f"mjx_{short}_{'-'.join(spec['cameras'])}_{spec['image_size']}px_"
                               f"n{spec['episodes_per_task']}", spec)


def relabel_with_expert(result: dict[str, Any]) -> None:
  """In place: `actions` become the clean expert action of every recorded state (the executed
  ones move to `executed_actions`). Needs a rollout recorded with `execute_steps=1`."""
  result["executed_actions"] = result["actions"]
  result["actions"] = np.asarray(jax.vmap(jax.vmap(expert_action))(result["privileged"]))


def demo_episodes(result: dict[str, Any], only_successful: bool = True,
                  post_success_steps: int = 0, image_keys: Sequence[str] = ("image",),
                  post_success_tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Rollout output recorded with `EnvParams(record=True)` -> writer episodes, cut
  `post_success_steps` steps after the first success (at the rollout's end if sooner); episodes
  of tasks outside `post_success_tasks` (None: all tasks) are cut at the first success.
  `image_keys`: the observation key of each rendered camera, in EnvParams.cameras order."""
  frames = np.asarray(result["frames"])            # [T, N, C, S, S, 3]
  states = np.asarray(result["states"])            # [T, N, 4]
  actions = np.asarray(result["actions"])          # [T, N, 4]
  if len(image_keys) != frames.shape[2]:
    raise ValueError(f"image_keys={tuple(image_keys)} name {len(image_keys)} cameras; the rollout "
                     f"rendered {frames.shape[2]}")
  episodes = []
  for i, ins in enumerate(result["instructions"]):
    ok = bool(result["success"][i])
    if only_successful and not ok:
      continue
    post = (post_success_steps if post_success_tasks is None
            or result["tasks"][i] in post_success_tasks else 0)
    t = min(int(result["success_step"][i]) + 1 + post, frames.shape[0]) if ok else frames.shape[0]
    episodes.append({
        "observation": {**{k: frames[:t, i, c] for c, k in enumerate(image_keys)},
                        "state": states[:t, i].astype(np.float32)},
        "action": actions[:t, i].astype(np.float32),
        "language_instruction": ins,
        "episode_metadata": {"task": result["tasks"][i], "success": ok},
    })
  return episodes

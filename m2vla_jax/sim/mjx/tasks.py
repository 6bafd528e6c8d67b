"""Language-conditioned tabletop tasks on the MJX scene: vocabulary, initial states, success, reward.

Owns: the task list, the instruction vocabulary (templates x block colours, so the instruction
decides both what to do and which block to do it with), parsing an instruction back to
(task, block) with a clear error for text outside a task's vocabulary, randomized initial states
from an rng (pure JAX), the per-step success test and a dense reward.

Tasks (three blocks: red, green, blue; one white goal square; positions and yaws random):
  pick_lift        lift the named block 5 cm off the table and hold it.
  push_to_target   push the named block onto the goal square (within 3 cm, still on the table).
  place_on_target  carry the named block onto the goal square and let go of it: like push, but the
                   block must have been lifted on the way (tracked in `EnvState.lifted`) and the
                   fingers released.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from mujoco import mjx
import numpy as np

from m2vla_jax.sim.mjx import scene as scene_lib

TASKS = ("pick_lift", "push_to_target", "place_on_target")
TEMPLATES = {
    "pick_lift": ("pick up the {c} block", "lift the {c} block",
                  "grasp the {c} block and raise it"),
    "push_to_target": ("push the {c} block to the white square", "slide the {c} block onto the goal",
                       "push the {c} block onto the white target"),
    "place_on_target": ("put the {c} block on the white square", "place the {c} block onto the goal",
                        "pick up the {c} block and set it down on the white target"),
}
LIFT_HEIGHT = 0.05        # pick success: block centre this far above its resting height
GOAL_RADIUS = 0.03        # push / place success: block centre within this xy distance of the goal
LIFTED_FLAG_Z = 0.05      # place: block centre once above this counts as carried
# Initial layout: blocks and goal take distinct cells of a 3 x 2 grid, jittered, so nothing
# overlaps at reset (no contact but block-table, which MJX and C MuJoCo agree on).
_CELLS = np.array([[x, y] for x in (-0.12, 0.0, 0.12) for y in (-0.09, 0.09)], np.float32)
_JITTER = 0.02
_MAX_YAW = 0.3


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction of the vocabulary and what it asks for."""
  task: str
  text: str
  block: int           # index into scene.COLORS

  @property
  def task_id(self) -> int:
    return TASKS.index(self.task)


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task={task!r} is unknown; use one of {TASKS}")


def vocabulary(task: str) -> tuple[Instruction, ...]:
  """Every instruction of `task` (templates x colours)."""
  check_task(task)
  return tuple(Instruction(task, t.format(c=c), k) for t in TEMPLATES[task]
               for k, c in enumerate(scene_lib.COLORS))


def parse(task: str, text: str) -> Instruction:
  """The vocabulary entry of `task` whose text is `text`; ValueError naming the vocabulary if none."""
  for ins in vocabulary(task):
    if ins.text == text:
      return ins
  raise ValueError(f"instruction {text!r} is not in the vocabulary of task {task!r}; use one of "
                   f"{[i.text for i in vocabulary(task)]}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EnvState:
  """One environment (vmapped: every leaf gains a leading env axis)."""
  data: mjx.Data
  task_id: jax.Array   # int32 []
  block: jax.Array     # int32 []  the block the instruction names
  lifted: jax.Array    # bool []   the named block was once above LIFTED_FLAG_Z


def initial_qpos(rng: jax.Array, scene: scene_lib.Scene) -> tuple[jax.Array, jax.Array]:
  """Random initial qpos float [nq] and goal position float [3]."""
  k_perm, k_jit, k_yaw, k_hand = jax.random.split(rng, 4)
  cells = jnp.asarray(_CELLS)[jax.random.permutation(k_perm, len(_CELLS))]
  xy = cells[:scene_lib.NUM_BLOCKS + 1] + jax.random.uniform(
      k_jit, (scene_lib.NUM_BLOCKS + 1, 2), minval=-_JITTER, maxval=_JITTER)
  yaw = jax.random.uniform(k_yaw, (scene_lib.NUM_BLOCKS,), minval=-_MAX_YAW, maxval=_MAX_YAW)
  hand = jnp.concatenate([jax.random.uniform(k_hand, (2,), minval=-0.03, maxval=0.03),
                          jnp.array([0.15])])
  qpos = jnp.zeros(scene.nq).at[scene_lib.HAND_QPOS].set(hand)
  qpos = qpos.at[scene_lib.FINGER_QPOS].set(scene_lib.FINGER_OPEN)
  for k in range(scene_lib.NUM_BLOCKS):
    pose = jnp.concatenate([xy[k], jnp.array([scene_lib.BLOCK_HALF]),
                            jnp.stack([jnp.cos(yaw[k] / 2), 0.0, 0.0, jnp.sin(yaw[k] / 2)])])
    qpos = qpos.at[scene.block_qpos[k]].set(pose)
  goal = jnp.concatenate([xy[-1], jnp.zeros(1)])
  return qpos, goal


def reset(scene: scene_lib.Scene, rng: jax.Array, task_id: jax.Array, block: jax.Array) -> EnvState:
  """A random initial state for (task_id, block); pure JAX, vmappable."""
  qpos, goal = initial_qpos(rng, scene)
  data = mjx.make_data(scene.mjx_model)
  ctrl = jnp.concatenate([qpos[scene_lib.HAND_QPOS], qpos[scene_lib.FINGER_QPOS]])
  # No mjx.forward here: mjx.step recomputes everything from qpos, and the renderer runs its own
  # kinematics, so a forward pass would only add compile time.
  # mjx.make_data (3.3.0) leaves mocap_quat all zeros (C MuJoCo's mj_makeData copies the body's
  # quaternion): a zero quaternion gives the goal pad a zero rotation matrix, and ray casting then
  # never hits it (the pad was invisible to every camera).
  data = data.replace(qpos=qpos, ctrl=ctrl, mocap_pos=goal[None],
                      mocap_quat=jnp.array([[1.0, 0.0, 0.0, 0.0]]))
  return EnvState(data=data, task_id=jnp.asarray(task_id, jnp.int32),
                  block=jnp.asarray(block, jnp.int32), lifted=jnp.asarray(False))


def block_positions(scene: scene_lib.Scene, qpos: jax.Array) -> jax.Array:
  """float [NUM_BLOCKS, 3] block centres."""
  return qpos[scene.block_qpos[:, :3]]


def finger_opening(qpos: jax.Array) -> jax.Array:
  """Mean finger joint position (0 closed, FINGER_OPEN open); touches a block at ~0.028."""
  return qpos[scene_lib.FINGER_QPOS].mean()


PRIVILEGED_DIM = 4 + 3 * scene_lib.NUM_BLOCKS + 3 + 2


class Privileged(NamedTuple):
  """The fields of a `privileged` vector (float [..., PRIVILEGED_DIM]), leading axes kept."""
  hand: Any        # [..., 3]
  opening: Any     # [...]
  blocks: Any      # [..., NUM_BLOCKS, 3] block centres
  goal: Any        # [..., 3]
  task_id: Any     # int32 [...]
  block_id: Any    # int32 [...] the named block

  @classmethod
  def unpack(cls, priv: Any) -> "Privileged":
    """Works on numpy and JAX arrays: the one place that knows the vector's column order."""
    if priv.shape[-1] != PRIVILEGED_DIM:
      raise ValueError(f"privileged state has {priv.shape[-1]} columns, expected {PRIVILEGED_DIM}")
    nb = scene_lib.NUM_BLOCKS
    return cls(hand=priv[..., 0:3], opening=priv[..., 3],
               blocks=priv[..., 4:4 + 3 * nb].reshape(priv.shape[:-1] + (nb, 3)),
               goal=priv[..., 4 + 3 * nb:7 + 3 * nb],
               task_id=priv[..., 7 + 3 * nb].astype(np.int32),
               block_id=priv[..., 8 + 3 * nb].astype(np.int32))


def privileged(scene: scene_lib.Scene, state: EnvState) -> jax.Array:
  """float [PRIVILEGED_DIM]: hand xyz, finger opening, block centres, goal xyz, task id, block id
  (read it back with `Privileged.unpack`)."""
  qpos = state.data.qpos
  return jnp.concatenate([qpos[scene_lib.HAND_QPOS], finger_opening(qpos)[None],
                          block_positions(scene, qpos).reshape(-1), state.data.mocap_pos[0],
                          state.task_id[None].astype(jnp.float32),
                          state.block[None].astype(jnp.float32)])


def proprio(state: EnvState) -> jax.Array:
  """float [4]: hand xyz and finger opening (raw units; the policy normalizes)."""
  qpos = state.data.qpos
  return jnp.concatenate([qpos[scene_lib.HAND_QPOS], finger_opening(qpos)[None]])


def _released(qpos: jax.Array) -> jax.Array:
  return finger_opening(qpos) > scene_lib.BLOCK_HALF + scene_lib.FINGER_RADIUS + 0.004


def success(scene: scene_lib.Scene, state: EnvState) -> jax.Array:
  """bool []: the instruction is fulfilled in this state."""
  qpos = state.data.qpos
  block = block_positions(scene, qpos)[state.block]
  hand = qpos[scene_lib.HAND_QPOS]
  held = jnp.linalg.norm(block - (hand + jnp.array([0.0, 0.0, 0.015]))) < 0.03
  lifted = (block[2] > scene_lib.BLOCK_HALF + LIFT_HEIGHT) & held
  on_goal = ((jnp.linalg.norm(block[:2] - state.data.mocap_pos[0, :2]) < GOAL_RADIUS)
             & (block[2] < scene_lib.BLOCK_HALF + 0.01))
  placed = on_goal & state.lifted & _released(qpos)
  return jnp.stack([lifted, on_goal, placed])[state.task_id]


def reward(scene: scene_lib.Scene, state: EnvState) -> jax.Array:
  """float []: dense shaping in [-~1, 0]: hand-to-block distance plus block-to-objective distance."""
  qpos = state.data.qpos
  block = block_positions(scene, qpos)[state.block]
  reach = jnp.linalg.norm(qpos[scene_lib.HAND_QPOS] - block)
  lift = jnp.maximum(0.0, scene_lib.BLOCK_HALF + LIFT_HEIGHT - block[2])
  to_goal = jnp.linalg.norm(block[:2] - state.data.mocap_pos[0, :2])
  objective = jnp.stack([lift, to_goal, to_goal])[state.task_id]
  return -(0.5 * reach + objective)


def update_flags(scene: scene_lib.Scene, state: EnvState) -> EnvState:
  block = block_positions(scene, state.data.qpos)[state.block]
  return dataclasses.replace(state, lifted=state.lifted | (block[2] > LIFTED_FLAG_Z))

"""The tabletop scene shared by the MJX tasks: MJCF, solver settings, and index bookkeeping.

Owns: the MuJoCo model (a floating two-finger gripper built from capsules and boxes over a table
with three coloured blocks and a goal pad), the physics settings that keep MJX fast and free of
the batched-Cholesky hang (see `PHYSICS_OPTIONS`), the action convention, and `Scene`, which
holds the C model, the MJX model and the qpos/geom indices the other modules use.

Action convention (float [4] in [-1, 1], like Meta-World): `a[:3]` moves the hand's servo
target to `hand_pos + MAX_DELTA * a[:3]` (so the action is Markov in the observation), `a[3]`
closes the fingers at +1 and opens them at -1.

qpos layout: [hand x, y, z, left finger, right finger, block_k (xyz, quat wxyz) for k in 0..2].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import mujoco
from mujoco import mjx
import numpy as np

COLORS = ("red", "green", "blue")
RGBA = {"red": (0.85, 0.15, 0.15, 1), "green": (0.15, 0.7, 0.2, 1), "blue": (0.15, 0.3, 0.85, 1)}
NUM_BLOCKS = len(COLORS)
BLOCK_HALF = 0.02        # blocks are 4 cm cubes
FINGER_RADIUS = 0.008
FINGER_OPEN = 0.05       # open finger target; gap = 2 q - 2 radius
# The joint limit lies beyond the open target: a finger resting exactly on its limit was where MJX
# (float32) and C MuJoCo disagreed most (2 mm on the first step).
FINGER_RANGE = FINGER_OPEN + 0.01
MAX_DELTA = 0.02         # m of servo-target offset per unit action
WORKSPACE_LO = np.array([-0.25, -0.25, 0.0], np.float32)
WORKSPACE_HI = np.array([0.25, 0.25, 0.25], np.float32)
HAND_QPOS = slice(0, 3)
FINGER_QPOS = slice(3, 5)
CAMERAS = ("front", "wrist", "table")

# Why these settings (jax 0.10.2, mujoco-mjx 3.3.0, XLA CPU):
# * jacobian="sparse" and solver="CG": a dense mass matrix is factorised with
#   `jax.scipy.linalg.cho_factor` (LAPACK spotrf), and Newton factorises its Hessian the same
#   way. Batched over 512 envs, the second call of jit(vmap(step)) deadlocked both XLA CPU
#   threads inside `lapack_spotrf_ffi` -> `ParallelBatchMap`. The sparse path factorises M with
#   plain gathers/scatters and CG never factorises, so no LAPACK custom call is left in the
#   compiled step (tests/sim/mjx/test_physics.py checks the lowered program and calls the 512-env
#   step 100 times under a timeout). Cost, measured on the shared 2-core CPU (load ~12): one
#   512-env physics step takes 0.2-0.4 s here vs 0.09-0.15 s with dense + Newton. With THIS model
#   dense + Newton did not hang in 5 calls at 512 envs (with or without 8 emulated devices), but
#   the hang was seen on another model and the LAPACK-free path removes it by construction.
# * Euler integrator: implicit joint damping through the same sparse factorisation.
# * CG iterations=20: the solver stops at its tolerance (~5 iterations on average here), but a cap
#   of 8 left it unconverged on some steps and resting blocks crept several cm in a second (in C
#   MuJoCo as well); 20 keeps them still (0.1 mm) at the same average cost.
PHYSICS_OPTIONS = dict(timestep=0.005, iterations=20, ls_iterations=10, solver="CG",
                       jacobian="sparse", integrator="Euler", cone="pyramidal")
SUBSTEPS = 4             # physics steps per control step: 20 ms control period


def check_cameras(cameras: Sequence[str], field: str) -> None:
  """A clear error naming `field` (the setting the caller reads) for an unknown camera name."""
  unknown = [c for c in cameras if c not in CAMERAS]
  if unknown:
    raise ValueError(f"{field}={tuple(cameras)}: camera {unknown[0]!r} is unknown; use some of "
                     f"{CAMERAS}")


def _mjcf() -> str:
  opts = " ".join(f'{k}="{v}"' for k, v in PHYSICS_OPTIONS.items())
  mats = "\n".join(f'    <material name="{c}" rgba="{" ".join(map(str, RGBA[c]))}"/>' for c in COLORS)
  # Collision bits: table 1, blocks 2, fingers 4. Blocks touch the table and fingers (not each
  # other: box-box pairs cost ~60% more compile time and contacts); fingers touch the
  # table and blocks but not each other (they overlap when closed); palm and pad are visual.
  blocks = "\n".join(f"""
    <body name="block_{c}" pos="0 0 {BLOCK_HALF}">
      <freejoint name="block_{c}"/>
      <geom name="block_{c}" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" material="{c}"
            contype="2" conaffinity="5" friction="1 0.005 0.0001" mass="0.05"/>
    </body>""" for c in COLORS)
  return f"""
<mujoco model="m2vla_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option {opts} gravity="0 0 -9.81"/>
  <visual><global offwidth="640" offheight="480"/><quality shadowsize="0"/></visual>
  <asset>
{mats}
    <material name="table" rgba="0.55 0.5 0.45 1"/>
    <material name="goal" rgba="0.95 0.95 0.95 1"/>
    <material name="gripper" rgba="0.25 0.25 0.28 1"/>
  </asset>
  <worldbody>
    <light name="sun" pos="0.3 0.3 1.2" dir="-0.25 -0.25 -1" directional="true"/>
    <geom name="table" type="plane" size="0.5 0.5 0.01" material="table" contype="1" conaffinity="0"/>
    <camera name="front" pos="0.5 0 0.45" xyaxes="0 1 0 -0.669 0 0.743" fovy="50"/>
    <camera name="table" pos="0.5 0 0.45" xyaxes="0 1 0 -0.669 0 0.743" fovy="31"/>
    <body name="goal" mocap="true" pos="0.1 0.1 0">
      <geom name="goal" type="box" size="0.035 0.035 0.001" pos="0 0 0.001" material="goal"
            contype="0" conaffinity="0"/>
    </body>
    <body name="hand" pos="0 0 0" gravcomp="1">
      <joint name="hand_x" type="slide" axis="1 0 0" damping="70"/>
      <joint name="hand_y" type="slide" axis="0 1 0" damping="70"/>
      <joint name="hand_z" type="slide" axis="0 0 1" damping="70"/>
      <inertial pos="0 0 0.07" mass="0.5" diaginertia="0.001 0.001 0.001"/>
      <geom name="palm" type="box" size="0.012 0.065 0.01" pos="0 0 0.07" material="gripper"
            contype="0" conaffinity="0"/>
      <camera name="wrist" pos="0 0 0.058" xyaxes="0 -1 0 1 0 0" fovy="75"/>
      <body name="finger_left" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_RANGE}" damping="2"/>
        <geom name="finger_left" type="capsule" fromto="0 0 {FINGER_RADIUS} 0 0 0.062"
              size="{FINGER_RADIUS}" material="gripper" contype="4" conaffinity="3"
              friction="1.5 0.005 0.0001" mass="0.03"/>
      </body>
      <body name="finger_right" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_RANGE}" damping="2"/>
        <geom name="finger_right" type="capsule" fromto="0 0 {FINGER_RADIUS} 0 0 0.062"
              size="{FINGER_RADIUS}" material="gripper" contype="4" conaffinity="3"
              friction="1.5 0.005 0.0001" mass="0.03"/>
      </body>
    </body>
{blocks}
  </worldbody>
  <actuator>
    <position name="hand_x" joint="hand_x" kp="2000" ctrlrange="-0.3 0.3"/>
    <position name="hand_y" joint="hand_y" kp="2000" ctrlrange="-0.3 0.3"/>
    <position name="hand_z" joint="hand_z" kp="2000" ctrlrange="-0.05 0.3"/>
    <position name="finger_left" joint="finger_left" kp="50" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="finger_right" joint="finger_right" kp="50" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>
"""


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
  """The compiled scene: C model, MJX model (closed over by jitted code, never passed as an
  argument: ~600 ms vs ~16 ms per call measured) and the indices other modules need."""
  model: mujoco.MjModel
  mjx_model: mjx.Model
  block_qpos: np.ndarray      # int [NUM_BLOCKS, 7] qpos addresses of each block's free joint
  block_geoms: np.ndarray     # int [NUM_BLOCKS] geom ids (segmentation ids of the blocks)
  geom_rgb: np.ndarray        # float32 [ngeom, 3] colour of each geom (from its material)
  camera_ids: dict

  @property
  def nq(self) -> int:
    return self.model.nq


def mjcf() -> str:
  """The scene's MJCF text (for C MuJoCo tools and tests)."""
  return _mjcf()


def to_mjx(model: mujoco.MjModel) -> mjx.Model:
  """`mjx.put_model` with a clear error for a model MJX cannot run (raised before compilation)."""
  try:
    return mjx.put_model(model)
  except NotImplementedError as e:
    raise ValueError(f"model cannot be converted to MJX: {e}. Use geometry pairs MJX supports (e.g. no cylinder-box) and "
                     f"the options in scene.PHYSICS_OPTIONS.") from e


@functools.lru_cache(maxsize=None)
def load() -> Scene:
  """Builds (once per process) the scene."""
  model = mujoco.MjModel.from_xml_string(_mjcf())
  ids = lambda kind, name: mujoco.mj_name2id(model, kind, name)
  block_qpos = np.array([model.jnt_qposadr[ids(mujoco.mjtObj.mjOBJ_JOINT, f"block_{c}")]
                         + np.arange(7) for c in COLORS])
  block_geoms = np.array([ids(mujoco.mjtObj.mjOBJ_GEOM, f"block_{c}") for c in COLORS])
  # mjx.ray (3.3.0) fails on a model without materials, so every geom has one (see _mjcf).
  assert (model.geom_matid >= 0).all(), "every geom needs a material"
  geom_rgb = model.mat_rgba[model.geom_matid, :3].astype(np.float32)
  return Scene(model=model, mjx_model=to_mjx(model), block_qpos=block_qpos,
               block_geoms=block_geoms, geom_rgb=geom_rgb,
               camera_ids={c: ids(mujoco.mjtObj.mjOBJ_CAMERA, c) for c in CAMERAS})


def ctrl_from_action(hand_pos: jax.Array, action: jax.Array) -> jax.Array:
  """float [3] hand position, float [4] action in [-1, 1] -> float [5] actuator targets."""
  action = jnp.clip(action, -1.0, 1.0)
  target = jnp.clip(hand_pos + MAX_DELTA * action[:3], WORKSPACE_LO, WORKSPACE_HI)
  finger = 0.5 * (1.0 - action[3]) * FINGER_OPEN
  return jnp.concatenate([target, jnp.stack([finger, finger])])


def ctrl_from_action_np(hand_pos: np.ndarray, action: np.ndarray) -> np.ndarray:
  """NumPy twin of `ctrl_from_action` for the C-MuJoCo loop (bench, tests)."""
  action = np.clip(action, -1.0, 1.0)
  target = np.clip(hand_pos + MAX_DELTA * action[:3], WORKSPACE_LO, WORKSPACE_HI)
  finger = 0.5 * (1.0 - action[3]) * FINGER_OPEN
  return np.concatenate([target, [finger, finger]])

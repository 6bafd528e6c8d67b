"""Scripted pick-and-place experts for LIBERO-Spatial and LIBERO-Object, driven by simulator poses.

Owns: reading which body is picked and where it goes from LIBERO's own task description, turning the
two bodies' collision geometry into a grasp plan (`plan_grasp`), the phase machine that turns the
end-effector, gripper and object poses into 7-d OSC delta actions (`expert_action`, pure numpy,
testable without LIBERO), and `run_expert_episode`, which runs one whole episode inside a
`LiberoEnv` (registered in `env._REMOTE_FUNCTIONS`, so `ProcessEnv.call('run_expert_episode', ...)`
runs it in the worker) and returns the observations, the executed actions and the outcome.

What the expert relies on (no English is parsed):
- the task's BDDL goal as LIBERO parsed it (`env.raw_env.env.parsed_problem['goal_state']`): a single
  `(On <object> <target>)` (LIBERO-Spatial: bowl on plate) or `(In <object> <target>_<region>)`
  (LIBERO-Object: item in the basket's `contain_region` site); the first argument is the body to
  pick, the second the body (or site, whose `parent_name` is the body) to place it on / in. LIBERO's
  `obj_of_interest` lists the same two names in that order, which is checked;
- the success predicates' geometry: `On` needs the object's body within 3 cm (xy) of the target's body
  and touching it; `In` needs the object's body inside the region site's box. So the expert puts the
  object's body origin over the target body's origin (On) or the region site (In);
- the collision geoms of every LIBERO object and fixture (`obj_body_id`; drawers and doors are their
  children), as oriented boxes after the no-op steps: the object's for the grasp height and whether
  it fits between the fingers, the target's for the release height (the top of the geom under the
  placement point: a plate's face, a basket's floor) and the carry height (its highest point: the
  basket's rim), the others as obstacles for the gripper;
- robosuite's Panda with OSC_POSE in world-frame delta mode: action xyz * 0.05 m and axis-angle *
  0.5 rad (the controller's `output_max`, checked) move the controller's goal from the current pose;
  the fingers close along the end-effector's y axis (world y in LIBERO's start pose, pointing down);
  gripper -1 opens, +1 closes; the arm's base (`robots[0].robot_model.root_body`) sets the reach.

Grasps (`plan_grasp`): the gripper keeps its start orientation, turned about the vertical by one of
`grasp_yaws_deg` (+-90 degrees; it is symmetric under a half turn). An object that some turn fits
within `max_grasp_width` along the fingers (LIBERO-Object's cans, bottles, cartons and boxes) is
grasped whole at its bounding-box centre, `grasp_depth` below its top (but not lower than
`floor_clearance` above its bottom). Wider objects (the 10.7 cm akita bowl, for a Panda opening of
8 cm) are grasped at the rim: the fingers straddle the wall, `rim_inset` inside the outer edge on the
finger axis and `rim_depth` below the top, on either side. Of the candidate turns and sides, the one
whose gripper volume (hand and fingers, swept down from the approach height) stays at least
`wanted_clearance` from the obstacles wins, preferring grasp points within the arm's comfortable
reach, then small turns: a bowl in the cabinet's drawer is taken across the drawer, a bowl next to
the cabinet from the side away from it, a far bowl from the near side.

Control (`expert_action`): every phase sets a goal point and the action is `position_gain * error`
(metres), at least `min_speed`, clipped to the phase's speed limit and to [-1, 1]; while the object
is held, the goal is for the object (its error drives the end effector), so where the object sits in
the hand does not matter. The rotation deltas hold the planned orientation with a proportional
correction. Phases: approach (above the grasp point, travelling high first), descend, grasp (close,
hold still), lift, transport (at carry height), lower, release, retreat, done. Descend and lower end
at the goal, or when they stop making progress (the fingers or the object rest on something), or
after `phase_timeout` steps; an object that does not rise with the hand sends the expert back to
approach (at most `max_regrasps` times).

Episodes (`run_expert_episode`): optional Gaussian noise on the position deltas (never the rotation
or the gripper) diversifies demonstrations. Without per-step images, the cameras' observables are
given a sampling rate so low that steps never render them (robosuite's public `modify_observable`;
only resets do), about ten times faster on CPUs; their rate is restored afterwards.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
  from m2vla_jax.sim.libero.env import LiberoEnv

ACTION_DIM = 7
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0
# robosuite 1.4 OSC_POSE `output_max`: what an action of 1 moves the goal by (m, rad); checked against
# the live controller in `run_expert_episode`.
OSC_POSITION_SCALE = 0.05
OSC_ROTATION_SCALE = 0.5
# Goal predicates the expert handles: (predicate, object, target) from the parsed BDDL goal.
PREDICATES = ("on", "in")
# robosuite 1.4's Panda gripper, open, pointing down (LIBERO's start pose), measured from its collision
# geoms: (centre relative to the grip site, half sizes), world axes; the hand is ~21 cm long along the
# finger axis (y) and sits 3-12 cm above the fingertips.
PANDA_GRIPPER_BOXES = (((0.0, 0.0, 0.075), (0.034, 0.104, 0.048)),   # hand
                       ((0.0, -0.05, 0.018), (0.012, 0.018, 0.031)),  # finger 1
                       ((0.0, 0.05, 0.018), (0.012, 0.018, 0.031)))   # finger 2
# A camera observable with this sampling rate (Hz) is never sampled by steps, only by forced updates
# (reset, set_init_state): episodes that record no images then render nothing per step.
_NEVER_HZ = 1e-9


class Phase(enum.IntEnum):
  """Phases of one pick-and-place, in order."""
  APPROACH = 0   # gripper open, to `approach_height` above the grasp point (high first)
  DESCEND = 1    # down to the grasp point
  GRASP = 2      # close the gripper, hold still
  LIFT = 3       # object up to carry height
  TRANSPORT = 4  # object over the placement point, at carry height
  LOWER = 5      # object down to the release height
  RELEASE = 6    # open the gripper, hold still
  RETREAT = 7    # end effector up, away from the object
  DONE = 8       # hold still, gripper open


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Gains, speeds, heights and tolerances of the expert (lengths in metres, speeds in action units).

  Attributes:
    position_gain: action per metre of position error (10: full speed beyond 10 cm).
    max_speed: speed limit while travelling (approach, lift, transport, retreat).
    fine_speed: speed limit within `slow_distance` of a contact goal (descend, lower).
    min_speed: smallest commanded speed (norm) while a goal is not reached.
    slow_distance: distance to a contact goal below which the speed limit is `fine_speed`.
    rotation_gain: action per radian of orientation error.
    max_rotation: limit of the rotation actions.
    approach_height: height above the grasp point where the descent starts.
    approach_gate: horizontal error above which the approach does not descend yet.
    lift_clearance: object bottom above the higher of its start bottom and the target's top, in transit.
    release_clearance: object bottom above the target's supporting surface when it is released.
    max_finger_depth: lowest the fingertips go below the target's top at the release (container walls).
    retreat_height: end-effector rise after the release.
    xy_tolerance: horizontal error that ends approach and transport.
    z_tolerance: vertical error that ends approach and lift.
    contact_tolerance: 3-d error that ends descend and lower.
    max_grasp_width: widest object (along the finger axis) grasped whole; wider ones at the rim.
    grasp_depth: grasp point below the top of a narrow object.
    floor_clearance: lowest grasp point above a narrow object's bottom (fingers must not hit its support).
    rim_depth: grasp point below the rim of a wide object.
    rim_inset: grasp point inside the outer edge of a wide object, on the finger axis.
    rim_side: +1 grasps a wide object's rim on the +finger-axis side, -1 on the other (when both are
      free).
    grasp_yaws_deg: turns of the gripper about the vertical (from its start orientation) to choose
      from, smaller turns preferred; the Panda's last joint starts at pi/4 with +-2.9 rad of range, so
      +-90 degrees stays within it.
    wanted_clearance: horizontal gap between the gripper's volume and the nearest obstacle that makes
      a grasp as good as any other.
    gripper_boxes: the open gripper's collision volume as (centre, half sizes) boxes relative to the
      grip site, axes as the start orientation's in the world (fingers along y, up is +z).
    grasp_steps: steps the gripper closes (and the arm holds still) before lifting.
    release_steps: steps the gripper opens before retreating.
    drop_distance: rise of the end effector relative to the object (from the grasp) meaning it slipped.
    phase_timeout: steps after which descend and lower give up waiting for the tolerance.
    stall_steps: steps without `stall_progress` towards the goal after which descend and lower end
      (the fingers or the object rest on something).
    stall_progress: the progress (m) that counts.
    comfortable_reach: horizontal distance from the arm's base beyond which grasp points are avoided
      (the Panda's wrist reaches about 0.8 m at table height, slowly near that).
    max_regrasps: missed grasps or drops that restart the approach before the expert carries on.
  """
  position_gain: float = 10.0
  max_speed: float = 1.0
  fine_speed: float = 0.5
  min_speed: float = 0.1
  slow_distance: float = 0.04
  rotation_gain: float = 1.0
  max_rotation: float = 0.3
  approach_height: float = 0.08
  approach_gate: float = 0.02
  lift_clearance: float = 0.06
  release_clearance: float = 0.01
  max_finger_depth: float = 0.04
  retreat_height: float = 0.08
  xy_tolerance: float = 0.008
  z_tolerance: float = 0.015
  contact_tolerance: float = 0.008
  max_grasp_width: float = 0.07
  grasp_depth: float = 0.03
  floor_clearance: float = 0.008
  rim_depth: float = 0.02
  rim_inset: float = 0.01
  rim_side: float = 1.0
  grasp_yaws_deg: tuple[float, ...] = (0.0, 15.0, -15.0, 30.0, -30.0, 45.0, -45.0, 60.0, -60.0, 75.0,
                                       -75.0, 90.0)
  wanted_clearance: float = 0.03
  gripper_boxes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
      PANDA_GRIPPER_BOXES)
  grasp_steps: int = 10
  release_steps: int = 6
  drop_distance: float = 0.04
  phase_timeout: int = 40
  stall_steps: int = 6
  stall_progress: float = 0.002
  comfortable_reach: float = 0.75
  max_regrasps: int = 2

  def __post_init__(self):
    for field in ("position_gain", "max_speed", "fine_speed", "rotation_gain", "xy_tolerance",
                  "z_tolerance", "contact_tolerance", "max_grasp_width", "drop_distance"):
      if getattr(self, field) <= 0:
        raise ValueError(f"ExpertConfig.{field}={getattr(self, field)}; use a positive value")
    for field in ("max_speed", "fine_speed", "max_rotation"):
      if not 0 <= getattr(self, field) <= 1:
        raise ValueError(f"ExpertConfig.{field}={getattr(self, field)}; actions live in [-1, 1], use "
                         f"a value in [0, 1]")
    if self.rim_side not in (-1.0, 1.0):
      raise ValueError(f"ExpertConfig.rim_side={self.rim_side}; use +1 or -1")
    for field in ("grasp_steps", "release_steps", "phase_timeout", "stall_steps"):
      if getattr(self, field) < 1:
        raise ValueError(f"ExpertConfig.{field}={getattr(self, field)}; use >= 1 step")
    if not self.grasp_yaws_deg or any(abs(y) > 90.0 for y in self.grasp_yaws_deg):
      raise ValueError(f"ExpertConfig.grasp_yaws_deg={self.grasp_yaws_deg}; give at least one turn in "
                       f"[-90, 90] degrees (the gripper is symmetric under a half turn)")
    if self.max_regrasps < 0:
      raise ValueError(f"ExpertConfig.max_regrasps={self.max_regrasps}; use >= 0")


@dataclasses.dataclass(frozen=True)
class GraspPlan:
  """Where to hold the object and where to put it, fixed for an episode (world frame, metres).

  Attributes:
    grasp_offset: end-effector position at the grasp minus the object's body position.
    place_offset: the object's body position at the release minus the target position.
    carry_z: the object's body height while it is lifted and carried.
    grip_quat: the end-effector orientation to hold, quaternion (x, y, z, w) (robosuite's order).
    rim_grasp: the object is wider than the gripper and is held by its rim.
    yaw_deg: the turn of `grip_quat` about the vertical from the start orientation, degrees.
  """
  grasp_offset: tuple[float, float, float]
  place_offset: tuple[float, float, float]
  carry_z: float
  grip_quat: tuple[float, float, float, float]
  rim_grasp: bool = False
  yaw_deg: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExpertInputs:
  """What the expert sees at one step (world frame).

  Attributes:
    eef_pos: float [3], end-effector (grip site) position.
    eef_quat: float [4], end-effector orientation, (x, y, z, w).
    gripper_qpos: float [2], the two finger joints (open Panda: about +0.04 / -0.04).
    object_pos: float [3], body position of the object to pick.
    target_pos: float [3], body position of the target (On) or position of its region site (In).
  """
  eef_pos: np.ndarray
  eef_quat: np.ndarray
  gripper_qpos: np.ndarray
  object_pos: np.ndarray
  target_pos: np.ndarray


@dataclasses.dataclass(frozen=True)
class ExpertState:
  """The phase machine's state.

  Attributes:
    phase: the current phase.
    steps_in_phase: steps spent in it before this one.
    regrasps: restarts of the approach so far.
    best_error: in descend and lower, the smallest distance to the goal so far (m).
    stalled: steps since `best_error` last improved by `stall_progress`.
  """
  phase: Phase = Phase.APPROACH
  steps_in_phase: int = 0
  regrasps: int = 0
  best_error: float = math.inf
  stalled: int = 0

  def next(self, phase: Phase, regrasp: bool = False, error: float = math.inf,
           stall_progress: float = 0.0) -> ExpertState:
    """The state after this step: `phase` (its counters restarted if the phase changed), with the
    distance to its goal `error` tracked for stall detection."""
    if phase != self.phase:
      return ExpertState(Phase(phase), 0, self.regrasps + int(regrasp), error, 0)
    if error < self.best_error - stall_progress:
      return ExpertState(self.phase, self.steps_in_phase + 1, self.regrasps, error, 0)
    return ExpertState(self.phase, self.steps_in_phase + 1, self.regrasps + int(regrasp),
                       self.best_error, self.stalled + 1)


# ----------------------------------------------------------------------------- rotations (x, y, z, w)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Hamilton product a * b of (x, y, z, w) quaternions."""
  ax, ay, az, aw = a
  bx, by, bz, bw = b
  return np.array([aw * bx + ax * bw + ay * bz - az * by,
                   aw * by - ax * bz + ay * bw + az * bx,
                   aw * bz + ax * by - ay * bx + az * bw,
                   aw * bw - ax * bx - ay * by - az * bz])


def quat_to_matrix(quat: np.ndarray) -> np.ndarray:
  """Rotation matrix [3, 3] of a (x, y, z, w) quaternion (normalised first)."""
  x, y, z, w = np.asarray(quat, np.float64) / np.linalg.norm(quat)
  return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                   [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                   [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rotation_error(goal_quat: np.ndarray, quat: np.ndarray) -> np.ndarray:
  """World-frame axis-angle [3] of the shortest rotation taking `quat` to `goal_quat`.

  OSC_POSE applies its rotation delta on the left (goal = R(delta) @ current), so this is the delta
  that would reach the goal.
  """
  q = np.asarray(quat, np.float64)
  inv = np.array([-q[0], -q[1], -q[2], q[3]]) / np.dot(q, q)
  err = quat_multiply(np.asarray(goal_quat, np.float64), inv)
  if err[3] < 0:  # q and -q are the same rotation: take the short way round
    err = -err
  sin_half = float(np.linalg.norm(err[:3]))
  if sin_half < 1e-12:
    return np.zeros(3)
  return err[:3] / sin_half * 2.0 * math.atan2(sin_half, err[3])


# ----------------------------------------------------------------------------- planning


_HEIGHT_SLACK = 0.005
_FOOTPRINT = (-1.0, -0.5, 0.0, 0.5, 1.0)


def quat_about_z(angle: float) -> np.ndarray:
  """(x, y, z, w) quaternion of a rotation by `angle` (rad) about the world z axis."""
  return np.array([0.0, 0.0, math.sin(angle / 2.0), math.cos(angle / 2.0)])


@dataclasses.dataclass(frozen=True)
class Box:
  """An oriented box in the world: a collision geom's bounding box in its own frame.

  Attributes:
    center: float [3], world position of the box's centre.
    rotation: float [3, 3], the box's axes as columns (world frame).
    half: float [3], half sizes along those axes.
  """
  center: np.ndarray
  rotation: np.ndarray
  half: np.ndarray

  def world_half(self) -> np.ndarray:
    """Half sizes [3] of the world-axis-aligned box around this one."""
    return np.abs(np.asarray(self.rotation)) @ np.asarray(self.half)

  def extent_along(self, direction: np.ndarray) -> tuple[float, float]:
    """(min, max) of the box's points projected on a world `direction` (unit)."""
    c = float(np.dot(self.center, direction))
    r = float(np.abs(np.asarray(self.rotation).T @ direction) @ np.asarray(self.half))
    return c - r, c + r

  def xy_distance(self, point: np.ndarray) -> float:
    """Signed horizontal distance from `point` to the box's footprint: positive outside, minus the depth
    inside. Exact for a box with an upright axis (turned about the vertical only); any other box is
    replaced by its world-axis-aligned bounds (larger, so the distance errs on the near side)."""
    rotation = np.asarray(self.rotation, np.float64)
    half = np.asarray(self.half, np.float64)
    upright = np.abs(rotation[2]) > 0.99  # which local axis points (nearly) up, if any
    if upright.sum() != 1:
      rotation, half = np.eye(3), self.world_half()
      upright = np.array([False, False, True])
    local = rotation.T @ (np.asarray(point, np.float64) - self.center)
    excess = np.where(upright, -np.inf, np.abs(local) - half)  # heights do not count
    if np.all(excess <= 0.0):
      return float(np.max(excess))
    gap = np.maximum(excess, 0.0) * np.sign(local)
    return float(np.linalg.norm((rotation @ gap)[:2]))


def axis_aligned(box: Box) -> Box:
  """`box`'s world-axis-aligned bounding box."""
  return Box(np.asarray(box.center, np.float64), np.eye(3), box.world_half())


def bounds(boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray]:
  """World (low [3], high [3]) corners around `boxes`."""
  if not boxes:
    raise ValueError("bounds of no boxes; pass at least one Box")
  lo = np.min([b.center - b.world_half() for b in boxes], axis=0)
  hi = np.max([b.center + b.world_half() for b in boxes], axis=0)
  return lo, hi


def plan_grasp(object_pos: Sequence[float], object_boxes: Sequence[Box], target_pos: Sequence[float],
               target_top: float, support_z: float, grip_quat: Sequence[float],
               obstacles: Sequence[Box] = (), config: ExpertConfig = ExpertConfig(),
               base_pos: Sequence[float] | None = None) -> GraspPlan:
  """The grasp and placement for an object and a target, from the bodies' geometry.

  The gripper keeps its start orientation (`grip_quat`) turned about the vertical by one of
  `config.grasp_yaws_deg`; the fingers close along its y axis. The object is grasped whole at its
  centre if some yaw puts it within `max_grasp_width` along the fingers, else at the rim (the rim
  point on the finger axis, on either side). Among the candidates, those whose open fingers are at
  least `wanted_clearance` (horizontally) from every obstacle in the height range the gripper sweeps
  while descending are as good as each other; then the one within the arm's comfortable reach (or
  the least beyond it), then the smallest turn, then `rim_side`. Failing that, the most clearance
  (the least penetration).

  Args:
    object_pos: the object's body position [3].
    object_boxes: the object's collision geoms.
    target_pos: where the object's body should end up, horizontally: the target's body (On) or its
      region site (In) [3].
    target_top: the highest point of the target body (a basket's rim): the carry height clears it.
    support_z: the top of the target's surface under `target_pos` (a plate's face, a basket's floor):
      the object is released `release_clearance` above it.
    grip_quat: the end-effector orientation at the start (x, y, z, w).
    obstacles: the collision geoms of the other bodies (objects and fixtures) in the scene.
    config: the expert's heights and limits.
    base_pos: the arm's base position [3]; grasp points farther than `comfortable_reach` from it
      (horizontally) rank after nearer ones of equal clearance. None: no preference.

  Returns:
    The plan. The release height is also kept high enough that the fingertips stay at most
    `max_finger_depth` below `target_top` (the hand must not hit a container's walls); the carry height
    puts the object's bottom `lift_clearance` above the higher of `target_top` and its start bottom.
  """
  object_pos = np.asarray(object_pos, np.float64)
  target_pos = np.asarray(target_pos, np.float64)
  if support_z > target_top:
    raise ValueError(f"support_z={support_z} is above target_top={target_top}; the support is a surface "
                     f"of the target, at or below its top")
  lo, hi = bounds(object_boxes)
  center = (lo + hi) / 2.0
  start_quat = np.asarray(grip_quat, np.float64)
  candidates = []  # (rim, yaw, side, grasp point [3], finger axis [3])
  for yaw in config.grasp_yaws_deg:
    quat = quat_multiply(quat_about_z(math.radians(yaw)), start_quat)
    finger = quat_to_matrix(quat)[:, 1]
    finger = np.array([finger[0], finger[1], 0.0]) / max(np.linalg.norm(finger[:2]), 1e-9)
    low, high = (np.array(v) for v in zip(*(b.extent_along(finger) for b in object_boxes)))
    width = float(high.max() - low.min())
    if width <= config.max_grasp_width:
      z = max(hi[2] - config.grasp_depth, lo[2] + config.floor_clearance)
      candidates.append((False, yaw, 0.0, np.array([center[0], center[1], z]), finger, quat))
    else:
      z = hi[2] - config.rim_depth
      for side in (config.rim_side, -config.rim_side):
        xy = center[:2] + side * finger[:2] * (width / 2.0 - config.rim_inset)
        candidates.append((True, yaw, side, np.array([xy[0], xy[1], z]), finger, quat))
  whole = [c for c in candidates if not c[0]]
  candidates = whole or candidates  # a whole-object grasp if any yaw allows one

  def clearance(candidate) -> float:
    # The gripper's volume at the grasp, turned by the candidate's yaw and swept up by the approach
    # height (the descent), against every obstacle that overlaps it in height: the horizontal gap.
    _, yaw, _, point, _, _ = candidate
    turn = quat_to_matrix(quat_about_z(math.radians(yaw)))
    gaps = []
    for center, half in config.gripper_boxes:
      center, half = np.asarray(center, np.float64), np.asarray(half, np.float64)
      low = point[2] + center[2] - half[2]
      high = point[2] + center[2] + half[2] + config.approach_height
      # A few millimetres of height overlap are contact, not collision (a drawer's wall just under the
      # hand).
      near = [b for b in obstacles
              if b.center[2] + b.world_half()[2] > low + _HEIGHT_SLACK
              and b.center[2] - b.world_half()[2] < high - _HEIGHT_SLACK]
      if not near:
        continue
      # Points over the box's footprint, spaced at most half a box apart, stand in for the footprint.
      grid = np.array([[sx * half[0], sy * half[1], 0.0] for sx in _FOOTPRINT for sy in _FOOTPRINT])
      points = point + (grid + center * [1.0, 1.0, 0.0]) @ turn.T
      gaps.extend(b.xy_distance(q) for b in near for q in points)
    return min(gaps, default=math.inf)

  def overreach(candidate) -> float:
    if base_pos is None:
      return 0.0
    reach = float(np.linalg.norm(candidate[3][:2] - np.asarray(base_pos, np.float64)[:2]))
    return round(max(reach - config.comfortable_reach, 0.0), 3)  # mm: nearly equal reaches tie

  def score(candidate):
    _, yaw, side, *_ = candidate
    return (-min(clearance(candidate), config.wanted_clearance), overreach(candidate), abs(yaw),
            side != config.rim_side)

  rim, yaw, _, point, _, quat = min(candidates, key=score)
  grasp_offset = point - object_pos
  above_bottom = object_pos[2] - lo[2]  # body origin above the object's bottom
  release_z = max(support_z + config.release_clearance + above_bottom,
                  target_top - config.max_finger_depth - grasp_offset[2])
  carry_z = max(target_top, lo[2]) + config.lift_clearance + above_bottom
  place_offset = np.array([0.0, 0.0, release_z - target_pos[2]])
  return GraspPlan(grasp_offset=tuple(float(v) for v in grasp_offset),
                   place_offset=tuple(float(v) for v in place_offset), carry_z=float(carry_z),
                   grip_quat=tuple(float(v) for v in quat), rim_grasp=bool(rim), yaw_deg=float(yaw))


# ----------------------------------------------------------------------------- control


def _move(error: np.ndarray, config: ExpertConfig, fine: bool = False) -> np.ndarray:
  """Proportional position action for a world-frame error (metres).

  Clipped per axis to `max_speed`, or to `fine_speed` within `slow_distance` of a `fine` goal (near
  contact), and raised to at least `min_speed` in norm so that the last millimetres do not crawl.
  """
  error = np.asarray(error, np.float64)
  move = config.position_gain * error
  norm = float(np.linalg.norm(move))
  if 0.0 < norm < config.min_speed:
    move *= config.min_speed / norm
  slow = fine and float(np.linalg.norm(error)) < config.slow_distance
  speed = config.fine_speed if slow else config.max_speed
  return np.clip(move, -speed, speed)


def expert_action(inputs: ExpertInputs, plan: GraspPlan, state: ExpertState,
                  config: ExpertConfig = ExpertConfig()) -> tuple[np.ndarray, ExpertState]:
  """One step of the phase machine.

  Args:
    inputs: the end effector, the gripper, the object and the target now.
    plan: the episode's grasp and placement (`plan_grasp`).
    state: the phase machine's state after the previous step (`ExpertState()` at the start).
    config: gains, speeds and tolerances.

  Returns:
    (action float64 [7] in [-1, 1]: delta xyz, delta axis-angle, gripper -1 open / +1 close; the
    state for the next step). The phase changes as soon as its exit condition holds, and the action
    is the new phase's.
  """
  eef = np.asarray(inputs.eef_pos, np.float64)
  obj = np.asarray(inputs.object_pos, np.float64)
  target = np.asarray(inputs.target_pos, np.float64)
  grasp_offset = np.asarray(plan.grasp_offset, np.float64)
  place = target + np.asarray(plan.place_offset, np.float64)
  grasp_point = obj + grasp_offset
  # The object slipped out (or was never held) if the hand rose away from it since the grasp.
  dropped = (eef - obj)[2] > grasp_offset[2] + config.drop_distance

  def stuck(error: float) -> bool:
    # No progress for `stall_steps` steps (the hand or the object rests on something), or too long.
    if state.steps_in_phase + 1 >= config.phase_timeout:
      return True
    return error >= state.best_error - config.stall_progress and state.stalled + 1 >= config.stall_steps

  phase, regrasp = state.phase, False
  # Exit conditions of the phase the previous step was in; the action below is the new phase's.
  if phase in (Phase.LIFT, Phase.TRANSPORT, Phase.LOWER) and dropped and (
      state.regrasps < config.max_regrasps):
    phase, regrasp = Phase.APPROACH, True
  elif phase == Phase.APPROACH:
    err = grasp_point + [0.0, 0.0, config.approach_height] - eef
    if np.linalg.norm(err[:2]) < config.xy_tolerance and abs(err[2]) < config.z_tolerance:
      phase = Phase.DESCEND
  elif phase == Phase.DESCEND:
    error = float(np.linalg.norm(grasp_point - eef))
    if error < config.contact_tolerance or stuck(error):
      phase = Phase.GRASP
  elif phase == Phase.GRASP:
    if state.steps_in_phase + 1 >= config.grasp_steps:
      phase = Phase.LIFT
  elif phase == Phase.LIFT:
    if obj[2] > plan.carry_z - config.z_tolerance:
      phase = Phase.TRANSPORT
  elif phase == Phase.TRANSPORT:
    if np.linalg.norm((place - obj)[:2]) < config.xy_tolerance:
      phase = Phase.LOWER
  elif phase == Phase.LOWER:
    error = float(np.linalg.norm(place - obj))
    if error < config.contact_tolerance or stuck(error):
      phase = Phase.RELEASE
  elif phase == Phase.RELEASE:
    if state.steps_in_phase + 1 >= config.release_steps:
      phase = Phase.RETREAT
  retreat_goal = place + grasp_offset + [0.0, 0.0, config.retreat_height]
  if phase == Phase.RETREAT and state.phase == Phase.RETREAT:
    if abs((retreat_goal - eef)[2]) < config.z_tolerance:
      phase = Phase.DONE

  # The new phase's action.
  move, gripper = np.zeros(3), GRIPPER_CLOSE
  if phase == Phase.APPROACH:
    goal = grasp_point + [0.0, 0.0, config.approach_height]
    if np.linalg.norm((goal - eef)[:2]) > config.approach_gate:
      goal[2] = max(goal[2], eef[2])  # travel high, descend only once above the grasp point
    move, gripper = _move(goal - eef, config), GRIPPER_OPEN
  elif phase == Phase.DESCEND:
    move, gripper = _move(grasp_point - eef, config, fine=True), GRIPPER_OPEN
  elif phase == Phase.GRASP:
    move = np.zeros(3)  # hold still while the fingers close
  elif phase == Phase.LIFT:
    # Straight up: the object's height error moves the hand; no horizontal motion while it clears.
    move = _move(np.array([0.0, 0.0, plan.carry_z - obj[2]]), config)
  elif phase == Phase.TRANSPORT:
    err = np.array([place[0] - obj[0], place[1] - obj[1], plan.carry_z - obj[2]])
    move = _move(err, config)
  elif phase == Phase.LOWER:
    move = _move(place - obj, config, fine=True)
  elif phase == Phase.RELEASE:
    move, gripper = np.zeros(3), GRIPPER_OPEN
  elif phase == Phase.RETREAT:
    goal = np.array([eef[0], eef[1], retreat_goal[2]])  # straight up, whatever the hand's xy
    move, gripper = _move(goal - eef, config), GRIPPER_OPEN
  else:
    move, gripper = np.zeros(3), GRIPPER_OPEN
  rotate = np.clip(config.rotation_gain * rotation_error(plan.grip_quat, inputs.eef_quat),
                   -config.max_rotation, config.max_rotation)
  action = np.concatenate([move, rotate, [gripper]])
  # Descend and lower track their distance to the goal, to notice a stall.
  error = math.inf
  if phase == Phase.DESCEND:
    error = float(np.linalg.norm(grasp_point - eef))
  elif phase == Phase.LOWER:
    error = float(np.linalg.norm(place - obj))
  return np.clip(action, -1.0, 1.0), state.next(phase, regrasp, error, config.stall_progress)


def add_position_noise(action: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
  """`action` with N(0, noise_std^2) added to its position deltas (gripper and rotation kept), clipped."""
  if noise_std < 0:
    raise ValueError(f"noise_std={noise_std}; use >= 0 (0 disables the noise)")
  action = np.array(action, np.float64)
  if noise_std > 0:
    action[:3] += rng.normal(0.0, noise_std, 3)
  return np.clip(action, -1.0, 1.0)


# ----------------------------------------------------------------------------- inside LIBERO


def task_bodies(env: LiberoEnv) -> dict[str, str]:
  """The task's object, target body and target position source, from LIBERO's parsed BDDL goal.

  Returns:
    {'predicate': 'on' | 'in', 'object': body to pick, 'target': body placed on / into,
     'target_site': the region site of an 'in' goal ('' for 'on')}.

  Raises:
    ValueError: a goal the expert does not handle (more than one predicate, or another predicate).
  """
  robosuite_env = env.raw_env.env
  goal = [list(g) for g in robosuite_env.parsed_problem["goal_state"]]
  if len(goal) != 1 or len(goal[0]) != 3 or str(goal[0][0]).lower() not in PREDICATES:
    raise ValueError(f"task {env.task_index} ({env.instruction!r}) has goal {goal}; the scripted expert "
                     f"handles one (On object target) or (In object region) goal")
  predicate, obj, where = str(goal[0][0]).lower(), str(goal[0][1]), str(goal[0][2])
  site = ""
  if where in robosuite_env.obj_body_id:
    target = where
  elif where in robosuite_env.object_sites_dict:
    site, target = where, str(robosuite_env.object_sites_dict[where].parent_name)
  else:
    raise ValueError(f"goal target {where!r} is neither an object nor a region site of task "
                     f"{env.task_index}")
  interest = list(robosuite_env.obj_of_interest)
  if interest[:2] != [obj, target]:
    raise ValueError(f"obj_of_interest {interest} disagrees with the goal {goal}: expected "
                     f"[{obj!r}, {target!r}] first")
  return {"predicate": predicate, "object": obj, "target": target, "target_site": site}


def geom_boxes(env: LiberoEnv, body: str) -> list[Box]:
  """The collision geoms of LIBERO object or fixture `body` and the bodies under it (drawers, doors)."""
  sim = env.raw_env.sim
  model, data = sim.model, sim.data
  root = env.raw_env.env.obj_body_id[body]
  parents = np.asarray(model.body_parentid)
  boxes = []
  for g in range(model.ngeom):
    if not (model.geom_contype[g] or model.geom_conaffinity[g]):
      continue  # visual-only geoms touch nothing
    b = int(model.geom_bodyid[g])
    while b not in (0, root):
      b = int(parents[b])
    if b != root:
      continue
    aabb = np.asarray(model.geom_aabb[g], np.float64)  # in the geom's frame: centre [3], half sizes [3]
    rotation = np.asarray(data.geom_xmat[g], np.float64).reshape(3, 3)
    boxes.append(Box(np.asarray(data.geom_xpos[g], np.float64) + rotation @ aabb[:3], rotation,
                     aabb[3:].copy()))
  if not boxes:
    raise ValueError(f"body {body!r} has no collision geoms; the expert cannot size it")
  return boxes


def plan_episode(env: LiberoEnv, bodies: dict[str, str], inputs: ExpertInputs,
                 config: ExpertConfig) -> GraspPlan:
  """`plan_grasp` from the simulator's geometry now (after the no-op steps)."""
  target_boxes = geom_boxes(env, bodies["target"])
  # The target's surface under the placement point: the highest of its geoms whose footprint holds it
  # (a plate's face, a basket's floor rather than its walls).
  under = [b.center[2] + b.world_half()[2] for b in target_boxes
           if b.xy_distance(inputs.target_pos) <= 0.0]
  target_top = float(bounds(target_boxes)[1][2])
  support_z = float(max(under)) if under else target_top
  obstacles = [box for name in env.raw_env.env.obj_body_id if name != bodies["object"]
               for box in geom_boxes(env, name)]
  base = np.asarray(env.raw_env.sim.data.body_xpos[env.raw_env.sim.model.body_name2id(
      env.raw_env.env.robots[0].robot_model.root_body)])
  return plan_grasp(inputs.object_pos, geom_boxes(env, bodies["object"]), inputs.target_pos,
                    target_top, support_z, inputs.eef_quat, obstacles, config, base)


def expert_inputs(env: LiberoEnv, bodies: dict[str, str]) -> ExpertInputs:
  """The expert's view of the simulator now (positions from MuJoCo, the hand from the last obs)."""
  robosuite_env = env.raw_env.env
  data = env.raw_env.sim.data
  raw = env.last_raw_observation
  if bodies["target_site"]:
    target_pos = np.array(data.get_site_xpos(bodies["target_site"]))
  else:
    target_pos = np.array(data.body_xpos[robosuite_env.obj_body_id[bodies["target"]]])
  return ExpertInputs(eef_pos=np.array(raw["robot0_eef_pos"], np.float64),
                      eef_quat=np.array(raw["robot0_eef_quat"], np.float64),
                      gripper_qpos=np.array(raw["robot0_gripper_qpos"], np.float64),
                      object_pos=np.array(data.body_xpos[robosuite_env.obj_body_id[bodies["object"]]]),
                      target_pos=target_pos)


def _set_camera_sampling(env: LiberoEnv, rate_hz: float) -> None:
  """Sets the camera observables' sampling rate (robosuite's public `modify_observable`)."""
  from m2vla_jax.sim.libero import env as libero_env  # pylint: disable=g-import-not-at-top
  robosuite_env = env.raw_env.env
  for camera in libero_env.CAMERAS:
    robosuite_env.modify_observable(f"{camera}_image", "sampling_rate", rate_hz)


def run_expert_episode(env: LiberoEnv, init_index: int, noise_std: float = 0.0, seed: int = 0,
                       record_every_step: bool = True, config: ExpertConfig | None = None,
                       steps_after_success: int = 5, max_steps: int | None = None) -> dict[str, Any]:
  """Runs the scripted expert for one episode of `env`'s task from benchmark init state `init_index`.

  The episode follows the evaluation protocol (`LiberoEnv.reset`: init state, no-op steps; at most
  `env.max_episode_steps` steps) and ends `steps_after_success` steps after the goal first holds.

  Args:
    env: the task's environment (in the worker, when called through `ProcessEnv.call`).
    init_index: benchmark init state.
    noise_std: std of the Gaussian noise added to the position deltas (action units; 0: none).
    seed: seed of that noise.
    record_every_step: return the images of every step. If False, no images are returned and the
      cameras are not rendered during the episode (several times faster); states are kept.
    config: the expert's parameters (None: `ExpertConfig()`).
    steps_after_success: steps run after the goal first holds (the hand lets go and rises).
    max_steps: stop after this many steps (None: the protocol's limit, `env.max_episode_steps`).

  Returns:
    {'instruction', 'init_index', 'success' (bool), 'success_step' (steps taken when the goal first
     held, -1 if never), 'num_steps', 'actions' float32 [T, 7] (as executed: clipped to [-1, 1],
     gripper in {-1, +1}), 'states' float32 [T, 8] and, if record_every_step, 'images' uint8
     [T, 2, S, S, 3] (the observation each action was taken from), 'phases' int8 [T],
     'final_state' float32 [8], 'object', 'target', 'rim_grasp'}.
  """
  config = config or ExpertConfig()
  if max_steps is not None and max_steps < 1:
    raise ValueError(f"max_steps={max_steps}; use >= 1 or None for the protocol's limit")
  controller = env.raw_env.env.robots[0].controller
  scale = np.asarray(controller.output_max, np.float64)
  if not np.allclose(scale, [OSC_POSITION_SCALE] * 3 + [OSC_ROTATION_SCALE] * 3):
    raise ValueError(f"the arm's controller scales actions by {scale.tolist()}; the expert's gains "
                     f"assume OSC_POSE's {OSC_POSITION_SCALE} m / {OSC_ROTATION_SCALE} rad")
  rng = np.random.default_rng(seed)
  if not record_every_step:
    _set_camera_sampling(env, _NEVER_HZ)
  try:
    obs = env.reset(init_index)
    bodies = task_bodies(env)
    inputs = expert_inputs(env, bodies)
    plan = plan_episode(env, bodies, inputs, config)
    state = ExpertState()
    states, images, actions, phases = [], [], [], []
    success_step = -1
    for _ in range(min(env.max_episode_steps, max_steps or env.max_episode_steps)):
      action, state = expert_action(inputs, plan, state, config)
      action = add_position_noise(action, noise_std, rng)
      if env.config.binarize_gripper:
        action[6] = GRIPPER_CLOSE if action[6] > 0 else GRIPPER_OPEN
      states.append(obs["state"])
      if record_every_step:
        images.append(obs["images"])
      actions.append(action)
      phases.append(int(state.phase))
      obs, _, success, truncated, _ = env.step(action)
      if success and success_step < 0:
        success_step = env.steps
      if truncated or (success_step >= 0 and env.steps >= success_step + steps_after_success):
        break
      inputs = expert_inputs(env, bodies)
  finally:
    if not record_every_step:
      _set_camera_sampling(env, float(env.raw_env.env.control_freq))
  result = {"instruction": env.instruction, "init_index": int(init_index),
            "success": success_step >= 0, "success_step": int(success_step),
            "num_steps": len(actions), "actions": np.asarray(actions, np.float32).reshape(-1, ACTION_DIM),
            "states": np.asarray(states, np.float32), "phases": np.asarray(phases, np.int8),
            "final_state": np.asarray(obs["state"], np.float32), "object": bodies["object"],
            "target": bodies["target"], "rim_grasp": plan.rim_grasp}
  if record_every_step:
    result["images"] = np.asarray(images, np.uint8)
  return result

"""The scripted LIBERO experts: planning and the phase machine (pure), and whole episodes (LIBERO).

The pure tests drive `experts.expert_action` against a small kinematic stand-in for the simulator (the
hand follows the commanded deltas, the fingers close over a few steps, a grasped object moves with the
hand and drops onto its support when let go), so they run without LIBERO. The episode tests need the
`[libero]` extra and are skipped without it.
"""
import dataclasses
import importlib.util
import math

import numpy as np
import pytest

from m2vla_jax.sim.libero import env as libero_env
from m2vla_jax.sim.libero import experts

HAVE_LIBERO = importlib.util.find_spec("libero") is not None
needs_libero = pytest.mark.skipif(not HAVE_LIBERO, reason="LIBERO not installed (extra [libero])")

# LIBERO's default hand orientation (x, y, z, w): pointing down, fingers closing along world y.
DOWN = np.array([1.0, 0.0, 0.0, 0.0])
Phase = experts.Phase


def box(lo, hi) -> experts.Box:
  lo, hi = np.asarray(lo, float), np.asarray(hi, float)
  return experts.Box((lo + hi) / 2, np.eye(3), (hi - lo) / 2)


def yawed_box(center, half, yaw_deg) -> experts.Box:
  return experts.Box(np.asarray(center, float),
                     experts.quat_to_matrix(experts.quat_about_z(math.radians(yaw_deg))),
                     np.asarray(half, float))


# ----------------------------------------------------------------------------- rotations


def test_rotation_error_is_the_left_delta():
  np.testing.assert_allclose(experts.rotation_error(DOWN, DOWN), np.zeros(3), atol=1e-12)
  turned = experts.quat_multiply(experts.quat_about_z(0.3), DOWN)
  np.testing.assert_allclose(experts.rotation_error(turned, DOWN), [0.0, 0.0, 0.3], atol=1e-12)
  np.testing.assert_allclose(experts.rotation_error(DOWN, turned), [0.0, 0.0, -0.3], atol=1e-12)
  # q and -q are one rotation: the error takes the short way.
  np.testing.assert_allclose(experts.rotation_error(-turned, DOWN), [0.0, 0.0, 0.3], atol=1e-12)
  # Applying the delta on the left (what OSC_POSE does) reaches the goal.
  r = experts.quat_to_matrix(experts.quat_about_z(0.3)) @ experts.quat_to_matrix(DOWN)
  np.testing.assert_allclose(r, experts.quat_to_matrix(turned), atol=1e-12)


def test_box_geometry():
  b = yawed_box([0.0, 0.0, 0.5], [0.1, 0.02, 0.05], 90.0)  # long side along world y
  np.testing.assert_allclose(b.world_half(), [0.02, 0.1, 0.05], atol=1e-12)
  np.testing.assert_allclose(b.extent_along(np.array([1.0, 0.0, 0.0])), (-0.02, 0.02), atol=1e-12)
  # Inside the footprint (whatever the height): minus the depth to its nearest side.
  assert b.xy_distance(np.array([0.0, 0.05, 3.0])) == pytest.approx(-0.02)
  assert b.xy_distance(np.array([0.0, 0.095, 0.5])) == pytest.approx(-0.005)
  assert b.xy_distance(np.array([0.05, 0.0, 0.5])) == pytest.approx(0.03)
  # A box tilted off the vertical is measured by its (larger) world bounds.
  tilt = math.radians(40.0)
  tilted = experts.Box(np.zeros(3), np.array([[1.0, 0.0, 0.0], [0.0, math.cos(tilt), -math.sin(tilt)],
                                              [0.0, math.sin(tilt), math.cos(tilt)]]),
                       np.array([0.01, 0.01, 0.1]))
  reach_y = tilted.world_half()[1]
  assert reach_y > 0.06
  assert tilted.xy_distance(np.array([0.0, reach_y + 0.02, 0.0])) == pytest.approx(0.02)
  assert tilted.xy_distance(np.array([0.0, reach_y - 0.01, 0.0])) < 0.0
  lo, hi = experts.bounds([b, box([0.3, 0.3, 0.0], [0.4, 0.4, 0.1])])
  np.testing.assert_allclose(lo, [-0.02, -0.1, 0.0], atol=1e-12)
  np.testing.assert_allclose(hi, [0.4, 0.4, 0.55], atol=1e-12)


# ----------------------------------------------------------------------------- planning


def test_plan_narrow_object_grasped_whole_at_its_centre():
  config = experts.ExpertConfig()
  obj = np.array([0.1, -0.2, 0.05])
  can = [box([0.07, -0.23, 0.0], [0.13, -0.17, 0.1])]  # 6 cm wide, 10 cm tall, body at mid-height
  plan = experts.plan_grasp(obj, can, target_pos=[0.0, 0.3, 0.07], target_top=0.14, support_z=0.016,
                            grip_quat=DOWN, config=config)
  assert not plan.rim_grasp and plan.yaw_deg == 0.0
  np.testing.assert_allclose(plan.grasp_offset, [0.0, 0.0, 0.1 - config.grasp_depth - 0.05], atol=1e-12)
  np.testing.assert_allclose(plan.grip_quat, DOWN, atol=1e-12)
  # Released above the basket's floor (its bottom release_clearance over it), but with the fingertips
  # no deeper than max_finger_depth under the rim; carried with the bottom lift_clearance over the rim.
  release_z = max(0.016 + config.release_clearance + 0.05,
                  0.14 - config.max_finger_depth - plan.grasp_offset[2])
  np.testing.assert_allclose(plan.place_offset, [0.0, 0.0, release_z - 0.07], atol=1e-12)
  assert plan.carry_z == pytest.approx(0.14 + config.lift_clearance + 0.05)


def test_plan_flat_object_grasp_stays_above_its_support():
  config = experts.ExpertConfig()
  butter = [box([-0.04, -0.02, 0.0], [0.04, 0.02, 0.017])]
  plan = experts.plan_grasp([0.0, 0.0, 0.0085], butter, [0.0, 0.3, 0.07], 0.14, 0.016, DOWN,
                            config=config)
  assert not plan.rim_grasp and plan.yaw_deg == 0.0  # 4 cm across the fingers
  assert plan.grasp_offset[2] + 0.0085 == pytest.approx(config.floor_clearance)


def test_plan_turns_the_gripper_to_the_narrow_side():
  # An 8 x 4 cm box with its long side along world y (the default finger axis): too wide untwisted.
  long_box = [yawed_box([0.0, 0.0, 0.02], [0.04, 0.02, 0.02], 90.0)]
  plan = experts.plan_grasp([0.0, 0.0, 0.02], long_box, [0.0, 0.3, 0.0], 0.02, 0.01, DOWN)
  assert not plan.rim_grasp and abs(plan.yaw_deg) >= 45.0
  finger = experts.quat_to_matrix(np.asarray(plan.grip_quat))[:, 1]
  low, high = long_box[0].extent_along(finger)
  assert high - low <= experts.ExpertConfig().max_grasp_width


def test_plan_wide_bowl_is_grasped_at_a_free_rim():
  config = experts.ExpertConfig()
  bowl = [box([-0.0535, -0.0535, 0.9], [0.0535, 0.0535, 0.951])]
  free = experts.plan_grasp([0.0, 0.0, 0.9], bowl, [0.2, 0.0, 0.9], 0.92, 0.91, DOWN, config=config)
  assert free.rim_grasp and free.yaw_deg == 0.0
  # rim_side=+1: the +finger-axis side; the default hand's y axis is world -y.
  np.testing.assert_allclose(free.grasp_offset,
                             [0.0, -(0.0535 - config.rim_inset), 0.951 - config.rim_depth - 0.9],
                             atol=1e-9)
  # A wall beyond the preferred rim point, within reach of the hand (~10 cm each way along the
  # fingers): the other side is free, so it wins, untwisted.
  wall = box([-0.2, -0.2, 0.85], [0.2, -0.16, 1.0])
  other = experts.plan_grasp([0.0, 0.0, 0.9], bowl, [0.2, 0.0, 0.9], 0.92, 0.91, DOWN, [wall], config)
  assert other.yaw_deg == 0.0 and other.grasp_offset[1] == pytest.approx(0.0535 - config.rim_inset)
  # Walls on both y sides (a drawer): the hand turns so that the fingers straddle the rim along x.
  walls = [wall, box([-0.2, 0.16, 0.85], [0.2, 0.2, 1.0])]
  turned = experts.plan_grasp([0.0, 0.0, 0.9], bowl, [0.2, 0.0, 0.9], 0.92, 0.91, DOWN, walls, config)
  assert abs(turned.yaw_deg) >= 60.0 and abs(turned.grasp_offset[0]) > 0.03
  # A low obstacle (under the fingertips) does not count.
  low = box([-0.2, -0.2, 0.0], [0.2, -0.16, 0.85])
  same = experts.plan_grasp([0.0, 0.0, 0.9], bowl, [0.2, 0.0, 0.9], 0.92, 0.91, DOWN, [low], config)
  assert same.grasp_offset == free.grasp_offset


def test_plan_errors_name_the_argument():
  with pytest.raises(ValueError, match="support_z=0.5 is above target_top=0.1"):
    experts.plan_grasp([0, 0, 0], [box([0, 0, 0], [0.01, 0.01, 0.01])], [0, 0, 0], 0.1, 0.5, DOWN)
  with pytest.raises(ValueError, match="pass at least one Box"):
    experts.plan_grasp([0, 0, 0], [], [0, 0, 0], 0.1, 0.05, DOWN)


@pytest.mark.parametrize("kwargs,field", [({"position_gain": 0.0}, "position_gain"),
                                          ({"max_speed": 1.5}, "max_speed"),
                                          ({"rim_side": 0.5}, "rim_side"),
                                          ({"grasp_steps": 0}, "grasp_steps"),
                                          ({"max_regrasps": -1}, "max_regrasps"),
                                          ({"grasp_yaws_deg": ()}, "grasp_yaws_deg")])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"ExpertConfig.{field}="):
    experts.ExpertConfig(**kwargs)


# ----------------------------------------------------------------------------- the phase machine


@dataclasses.dataclass
class KinematicScene:
  """A stand-in for the simulator: the hand moves by what OSC_POSE would command (perfect tracking),
  the fingers take a few steps to close, a grasped object rides along and falls to `floor_z` when let go.
  """
  eef: np.ndarray
  obj: np.ndarray
  target: np.ndarray
  floor_z: float
  quat: np.ndarray = dataclasses.field(default_factory=lambda: DOWN.copy())
  width: float = 0.08  # finger opening
  held: bool = False
  offset: np.ndarray | None = None  # object minus hand while held
  slip: bool = False  # the object is never picked up

  def inputs(self) -> experts.ExpertInputs:
    return experts.ExpertInputs(self.eef.copy(), self.quat.copy(),
                                np.array([self.width / 2, -self.width / 2]), self.obj.copy(),
                                self.target.copy())

  def step(self, action: np.ndarray) -> None:
    self.eef = self.eef + experts.OSC_POSITION_SCALE * 0.8 * action[:3]  # the arm lags its goal
    delta = experts.OSC_ROTATION_SCALE * action[3:6]
    angle = float(np.linalg.norm(delta))
    if angle > 0:
      axis = delta / angle
      dq = np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])
      self.quat = experts.quat_multiply(dq, self.quat)
    closing = action[6] > 0
    self.width = max(self.width - 0.02, 0.01) if closing else min(self.width + 0.02, 0.08)
    if closing and self.width <= 0.01 and not self.held and not self.slip:
      if np.linalg.norm(self.eef - self.obj) < 0.06:
        self.held, self.offset = True, self.obj - self.eef
    if not closing and self.held:
      self.held = False
    if self.held:
      self.obj = self.eef + self.offset
    else:
      self.obj = np.array([self.obj[0], self.obj[1], max(self.floor_z, self.obj[2] - 0.05)])


def run_scene(scene: KinematicScene, plan: experts.GraspPlan, config=experts.ExpertConfig(),
              steps: int = 300):
  state, phases, actions = experts.ExpertState(), [], []
  for _ in range(steps):
    action, state = experts.expert_action(scene.inputs(), plan, state, config)
    assert action.shape == (7,) and np.all(np.abs(action) <= 1.0)
    phases.append(state.phase)
    actions.append(action)
    scene.step(action)
    if state.phase == Phase.DONE:
      break
  return phases, np.asarray(actions), state


def _scene_and_plan(start_eef=(-0.2, 0.0, 0.3)):
  obj = np.array([0.1, -0.2, 0.05])
  can = [box([0.07, -0.23, 0.0], [0.13, -0.17, 0.1])]
  target = np.array([0.0, 0.3, 0.07])
  plan = experts.plan_grasp(obj, can, target, 0.14, 0.016, DOWN)
  return KinematicScene(np.array(start_eef), obj, target, floor_z=0.05), plan


def test_phases_run_in_order_and_place_the_object():
  scene, plan = _scene_and_plan()
  phases, actions, state = run_scene(scene, plan)
  order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
  assert order == list(Phase), order
  assert state.regrasps == 0
  # The object was let go over the target, and fell onto its floor there.
  np.testing.assert_allclose(scene.obj[:2], scene.target[:2], atol=0.012)
  # Gripper: open until the grasp, closed while holding, open from the release on.
  phases = np.asarray(phases)
  closed = np.isin(phases, [Phase.GRASP, Phase.LIFT, Phase.TRANSPORT, Phase.LOWER])
  np.testing.assert_array_equal(actions[:, 6], np.where(closed, 1.0, -1.0))
  # Still while the fingers move.
  np.testing.assert_array_equal(actions[np.isin(phases, [Phase.GRASP, Phase.RELEASE]), :3], 0.0)
  assert np.sum(phases == Phase.GRASP) == experts.ExpertConfig().grasp_steps


def test_approach_stays_high_until_above_the_object():
  scene, plan = _scene_and_plan(start_eef=(-0.2, 0.0, 0.12))  # starts below the approach height
  action, state = experts.expert_action(scene.inputs(), plan, experts.ExpertState())
  assert state.phase == Phase.APPROACH
  assert action[2] >= 0.0  # no descent while far away horizontally
  np.testing.assert_allclose(action[:2], [1.0, -1.0])  # clipped, full speed towards it
  # Above the grasp point (within the gate), it descends to the approach height.
  above = dataclasses.replace(scene.inputs(), eef_pos=scene.obj + plan.grasp_offset + [0.0, 0.0, 0.2])
  action, _ = experts.expert_action(above, plan, experts.ExpertState())
  assert action[2] < 0.0 and action[6] == experts.GRIPPER_OPEN


def test_actions_are_clipped_and_rotation_is_held():
  scene, plan = _scene_and_plan()
  config = experts.ExpertConfig()
  tilted = experts.quat_multiply(np.array([math.sin(0.5), 0.0, 0.0, math.cos(0.5)]), DOWN)  # 1 rad
  inputs = dataclasses.replace(scene.inputs(), eef_quat=tilted, eef_pos=np.array([5.0, 5.0, 5.0]))
  action, _ = experts.expert_action(inputs, plan, experts.ExpertState(), config)
  np.testing.assert_allclose(action[:3], [-1.0, -1.0, 0.0])  # far away: back, at this height
  np.testing.assert_allclose(action[3:6], [-config.max_rotation, 0.0, 0.0], atol=1e-12)
  # A small tilt gets a proportional correction.
  slight = experts.quat_multiply(np.array([math.sin(0.01), 0.0, 0.0, math.cos(0.01)]), DOWN)
  action, _ = experts.expert_action(dataclasses.replace(scene.inputs(), eef_quat=slight), plan,
                                    experts.ExpertState(), config)
  np.testing.assert_allclose(action[3:6], [-0.02 * config.rotation_gain, 0.0, 0.0], atol=1e-9)


def test_descend_times_out_into_grasp():
  scene, plan = _scene_and_plan()
  config = experts.ExpertConfig(phase_timeout=5)
  stuck = dataclasses.replace(scene.inputs(), eef_pos=scene.obj + plan.grasp_offset + [0, 0, 0.05])
  state = experts.ExpertState(Phase.DESCEND)
  for k in range(4):
    _, state = experts.expert_action(stuck, plan, state, config)
    assert state.phase == Phase.DESCEND and state.steps_in_phase == k + 1
  action, state = experts.expert_action(stuck, plan, state, config)
  assert state.phase == Phase.GRASP and state.steps_in_phase == 0 and action[6] == 1.0


def test_a_slipped_object_restarts_the_approach_then_gives_up():
  scene, plan = _scene_and_plan()
  scene.slip = True
  config = experts.ExpertConfig(max_regrasps=1)
  phases, _, state = run_scene(scene, plan, config, steps=400)
  order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
  # One restart after the first lift leaves the object behind, then it carries on regardless.
  assert order[:5] == [Phase.APPROACH, Phase.DESCEND, Phase.GRASP, Phase.LIFT, Phase.APPROACH]
  assert state.regrasps == 1
  assert order.count(Phase.APPROACH) == 2


def test_position_noise_spares_rotation_and_gripper():
  action = np.array([0.2, -0.3, 0.1, 0.05, 0.0, -0.05, 1.0])
  np.testing.assert_array_equal(experts.add_position_noise(action, 0.0, np.random.default_rng(0)), action)
  a = experts.add_position_noise(action, 0.1, np.random.default_rng(3))
  b = experts.add_position_noise(action, 0.1, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[3:], action[3:])
  assert not np.array_equal(a[:3], action[:3])
  assert np.all(np.abs(experts.add_position_noise(np.ones(7), 5.0, np.random.default_rng(0))) <= 1.0)
  with pytest.raises(ValueError, match="noise_std=-0.1"):
    experts.add_position_noise(action, -0.1, np.random.default_rng(0))


def test_expert_is_a_remote_function_of_the_environment():
  remote = libero_env._REMOTE_FUNCTIONS  # pylint: disable=protected-access
  assert remote["run_expert_episode"] is experts.run_expert_episode


# ----------------------------------------------------------------------------- LIBERO


@pytest.mark.slow
@needs_libero
@pytest.mark.parametrize("suite,task", [("libero_spatial", 0), ("libero_object", 0)])
def test_expert_succeeds_in_libero(suite, task):
  # Small renders: only resets and the short recorded episode render (rendering costs ~10x physics).
  config = libero_env.EnvConfig(suite=suite, image_size=32, render_size=32)
  with libero_env.ProcessEnv(task, config) as env:
    result = env.call("run_expert_episode", 0, 0.0, 0, False)
    assert result["success"], (suite, task, result["num_steps"])
    t = result["num_steps"]
    # Cut a few steps after the goal first held, well within the protocol's limit.
    assert t == result["success_step"] + 5 and t < libero_env.SUITE_MAX_STEPS[suite]
    assert result["actions"].shape == (t, 7) and result["states"].shape == (t, 8)
    assert np.all(np.abs(result["actions"]) <= 1.0)
    assert set(np.unique(result["actions"][:, 6])) == {-1.0, 1.0}  # grasped and let go
    assert result["instruction"] == env.instruction and "images" not in result
    assert result["rim_grasp"] == (suite == "libero_spatial")  # the bowl is wider than the gripper
    # The first steps again, recorded: the observation each action was taken from, and the same
    # deterministic actions (no noise).
    recorded = env.call("run_expert_episode", 0, 0.0, 0, True, None, 5, 6)
    assert recorded["num_steps"] == 6 and not recorded["success"]
    assert recorded["images"].shape == (6, 2, 32, 32, 3) and recorded["images"].dtype == np.uint8
    assert not np.array_equal(recorded["images"][0], recorded["images"][-1])  # the hand moved
    np.testing.assert_allclose(recorded["actions"], result["actions"][:6], atol=1e-3)
    np.testing.assert_allclose(recorded["states"], result["states"][:6], atol=1e-4)
    # Noise moves the position deltas only, reproducibly.
    noisy = env.call("run_expert_episode", 0, 0.3, 1, False, None, 5, 3)
    again = env.call("run_expert_episode", 0, 0.3, 1, False, None, 5, 3)
    np.testing.assert_array_equal(noisy["actions"], again["actions"])
    assert not np.allclose(noisy["actions"][:, :3], result["actions"][:3, :3])

"""LIBERO under the evaluation protocol: images, state, no-op steps, step limits, init states.

The protocol constants and the pure helpers are checked everywhere; the simulator tests need the
`[libero]` extra and are skipped without it (the package itself imports without LIBERO).
"""
import importlib.util
import math

import numpy as np
import pytest

from m2vla_jax.sim.libero import env as libero_env

HAVE_LIBERO = importlib.util.find_spec("libero") is not None
needs_libero = pytest.mark.skipif(not HAVE_LIBERO, reason="LIBERO not installed (extra [libero])")


def test_protocol_step_limits():
  # openpi examples/libero/main.py and OpenVLA run_libero_eval.py.
  expected = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
  for suite, steps in expected.items():
    assert libero_env.EnvConfig(suite=suite).episode_steps == steps
  assert libero_env.EnvConfig(suite="libero_goal", max_episode_steps=5).episode_steps == 5
  config = libero_env.EnvConfig()
  assert (config.image_size, config.render_size, config.num_noop_steps, config.seed) == (224, 256,
                                                                                          10, 7)


@pytest.mark.parametrize("kwargs,field", [({"suite": "libero_100"}, "suite"),
                                          ({"image_size": 4}, "image_size"),
                                          ({"num_noop_steps": -1}, "num_noop_steps"),
                                          ({"episode_seeding": "once"}, "episode_seeding"),
                                          ({"max_episode_steps": 0}, "max_episode_steps")])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"EnvConfig.{field}="):
    libero_env.EnvConfig(**kwargs)


def test_quat2axisangle():
  # 90 degrees about z, (x, y, z, w) order.
  s = math.sqrt(0.5)
  np.testing.assert_allclose(libero_env.quat2axisangle(np.array([0.0, 0.0, s, s])),
                             [0.0, 0.0, math.pi / 2], atol=1e-12)
  np.testing.assert_array_equal(libero_env.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])),
                                np.zeros(3))
  # robosuite's formula keeps angles above pi for w < 0 (no shortest-rotation normalisation).
  angle = 1.5 * math.pi
  quat = np.array([math.sin(angle / 2), 0.0, 0.0, math.cos(angle / 2)])
  np.testing.assert_allclose(libero_env.quat2axisangle(quat), [angle, 0.0, 0.0], atol=1e-12)


@pytest.fixture(scope="module")
def env():
  # Small renders and a 3-step limit keep it fast; render_size == image_size, so the images are
  # the raw ones rotated, with no resize in between.
  config = libero_env.EnvConfig(suite="libero_spatial", image_size=64, render_size=64,
                                max_episode_steps=3)
  with libero_env.ProcessEnv(0, config) as e:
    yield e


@pytest.mark.slow
@needs_libero
def test_reset_images_state_and_noops(env):
  assert env.num_init_states == 50 and "black bowl" in env.instruction
  obs = env.reset(0)
  raw = env.call("raw_observation")
  # No-op steps ran in the simulator, and are not counted as policy steps.
  assert env.call("simulator_steps") == libero_env.NUM_NOOP_STEPS and env.steps == 0
  # Images: (agentview, wrist), each the raw render rotated by 180 degrees.
  assert obs["images"].shape == (2, 64, 64, 3) and obs["images"].dtype == np.uint8
  assert obs["image_mask"].tolist() == [True, True]
  for k, camera in enumerate(libero_env.CAMERAS):
    raw_image = raw[f"{camera}_image"]
    np.testing.assert_array_equal(obs["images"][k], raw_image[::-1, ::-1])
    assert not np.array_equal(obs["images"][k], raw_image)  # the scene is not symmetric
  # State: eef position, axis-angle (robosuite's own conversion), two finger joints.
  from robosuite.utils import transform_utils  # pylint: disable=g-import-not-at-top
  state = obs["state"]
  assert state.shape == (libero_env.STATE_DIM,) and state.dtype == np.float32
  np.testing.assert_allclose(state[:3], raw["robot0_eef_pos"], atol=1e-6)
  np.testing.assert_allclose(state[3:6],
                             transform_utils.quat2axisangle(raw["robot0_eef_quat"].copy()),
                             atol=1e-5)
  np.testing.assert_allclose(state[6:], raw["robot0_gripper_qpos"], atol=1e-6)
  assert state[6] > 0 > state[7]  # open Panda fingers sit at +q / -q


@pytest.mark.slow
@needs_libero
def test_step_limit_and_action_errors(env):
  env.reset(0)
  with pytest.raises(ValueError, match="LIBERO takes \\[7\\]"):
    env.step(np.zeros(6))
  with pytest.raises(ValueError, match="init_index=50"):
    env.reset(50)
  env.reset(0)
  truncated = []
  for _ in range(3):
    obs, _, success, trunc, _ = env.step(np.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, -1.0]))
    truncated.append(trunc)
    assert not success
  assert truncated == [False, False, True] and env.steps == 3
  assert env.call("simulator_steps") == libero_env.NUM_NOOP_STEPS + 3
  with pytest.raises(RuntimeError, match="episode already ended"):
    env.step(np.zeros(7))


@pytest.mark.slow
@needs_libero
def test_init_states_restore_object_poses(env):
  env.reset(0)
  first = env.call("object_poses")
  for _ in range(3):
    env.step(np.array([0.8, 0.0, -0.8, 0.0, 0.0, 0.0, 1.0]))  # disturb the scene
  env.reset(1)
  other = env.call("object_poses")
  env.reset(0)
  again = env.call("object_poses")
  assert first.keys() == again.keys() and "plate_1" in first
  moved = max(np.abs(first[k][:3] - other[k][:3]).max() for k in first)
  assert moved > 1e-3, "init states 0 and 1 should place objects differently"
  # Fixtures included: their placement is drawn at reset, from the per-init-state seed.
  for name in first:
    np.testing.assert_allclose(again[name], first[name], atol=1e-6, err_msg=name)

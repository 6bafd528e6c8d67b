"""LIBERO under the evaluation protocol: images, state, no-op steps, step limits, init states.

The protocol constants and the pure helpers are checked everywhere; the simulator tests need the
`[libero]` extra and are skipped without it (the package itself imports without LIBERO).
"""
import dataclasses
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from m2vla_jax.data import loader
from m2vla_jax.sim.libero import env as libero_env
from m2vla_jax.sim.libero import evaluate as libero_eval
import support

REPO = str(support.REPO)
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
def test_reflections_off_changes_only_the_images(env):
  """`reflections=False` (bench/libero.py's fast, not-for-reporting row) survives LIBERO's model
  rebuild at reset: same state, different pixels."""
  reference = env.reset(0)
  config = dataclasses.replace(env.config, reflections=False)
  with libero_env.ProcessEnv(0, config) as plain:
    for _ in range(2):   # the second reset rebuilds the model again
      obs = plain.reset(0)
      np.testing.assert_allclose(obs["state"], reference["state"], atol=1e-6)
      assert not np.array_equal(obs["images"], reference["images"])


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


@pytest.mark.slow
@needs_libero
def test_closed_loop_evaluation_in_worker_processes(tmp_path):
  env_config = libero_env.EnvConfig(suite="libero_spatial", image_size=64, render_size=64,
                                    max_episode_steps=3)
  config = libero_eval.EvalConfig(env=env_config, tasks=(0,), episodes_per_task=2, batch_size=2,
                                  execute_steps=2, num_videos=1)
  result = libero_eval.evaluate(libero_eval.RandomChunkPolicy(horizon=2), config, str(tmp_path))
  records = result["episode_records"]
  assert [(r["task"], r["init_state"], r["reason"], r["steps"]) for r in records] == [
      ("libero_spatial/0", 0, "timeout", 3), ("libero_spatial/0", 1, "timeout", 3)]
  assert "black bowl" in records[0]["instruction"]
  assert (tmp_path / "libero_spatial.json").exists() and (tmp_path / "libero_spatial.png").exists()
  assert [p.name for p in (tmp_path / "libero_spatial_videos").iterdir()] == ["libero_spatial_0_0.gif"]


def _libero_config(arg):
  from m2vla_jax.training import config_base  # pylint: disable=g-import-not-at-top
  return config_base.load_config_file(os.path.join(REPO, "configs", "libero.py")).get_config(arg)


def test_libero_config_builds_every_suite_backbone_and_row():
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import config_base, validation  # pylint: disable=g-import-not-at-top
  for suite in ("spatial", "object", "goal", "10"):
    c = _libero_config(f"suite={suite}")
    assert oxe.resolve_mixture(c.data.pipeline.datasets) == {f"libero_{suite}_no_noops": 1.0}
    assert c.model.horizon == loader.pipeline_config(c).horizon == 8 and c.data.pipeline.cameras == ("primary", "wrist")
  c = _libero_config("suite=all")
  assert len(oxe.resolve_mixture(c.data.pipeline.datasets)) == 4
  paligemma = _libero_config("")
  assert set(paligemma.required_fields) == {"data.pipeline.data_dir", "init.checkpoint", "data.tokenizer"}
  with pytest.raises(config_base.ConfigError, match="init.checkpoint"):
    validation.validate_config(paligemma)           # REQUIRED fields are named before any work
  pretrained = _libero_config("backbone=dinov2_gemma3,method=lora,rank=8")
  assert pretrained.required_fields == ["data.pipeline.data_dir"]
  assert pretrained.model.adapter.kind == "lora" and pretrained.model.adapter.rank == 8
  mole = _libero_config("method=mole")
  assert mole.policy == "mole_vla" and mole.model.router.num_skip == 9 and mole.model.vlm == "paligemma_3b"
  assert [tuple(g) for g in mole.optimizer.groups] == [("router", "vlm/router/.*", 2e-5)]
  for arg, match in [("suite=libero_100", "suite="), ("backbone=siglip", "backbone="),
                     ("method=dora", "method="), ("queries=some", "queries=")]:
    with pytest.raises(config_base.ConfigError, match=match):
      _libero_config(arg)


# ------------------------------------------------------------------ the evaluation, on fake envs
class _FakeLibero:
  """LiberoEnv's interface: succeeds once the summed x action reaches 1 + init_index / 10."""
  num_init_states = 50

  def __init__(self, task_index, config):
    self.task_index, self.config = task_index, config
    self.instruction = f"do task {task_index}"
    self.steps, self.x, self.goal = 0, 0.0, 0.0
    self.max_episode_steps = config.episode_steps

  def reset(self, init_index):
    self.steps, self.x, self.goal = 0, 0.0, 1.0 + init_index / 10
    s = self.config.image_size
    return {"images": np.zeros((2, s, s, 3), np.uint8), "image_mask": np.ones((2,), bool),
            "state": np.zeros((libero_env.STATE_DIM,), np.float32)}

  def step(self, action):
    assert np.shape(action) == (libero_env.ACTION_DIM,)
    self.steps += 1
    self.x += float(action[0])
    s = self.config.image_size
    obs = {"images": np.zeros((2, s, s, 3), np.uint8), "image_mask": np.ones((2,), bool),
           "state": np.full((libero_env.STATE_DIM,), self.x, np.float32)}
    return obs, 0.0, self.x >= self.goal, self.steps >= self.max_episode_steps, {}

  def close(self):
    pass


def test_libero_evaluation_runs_the_protocol_episodes_and_writes_the_report(tmp_path):
  env = libero_env.EnvConfig(suite="libero_object", image_size=8, max_episode_steps=12)
  config = libero_eval.EvalConfig(env=env, tasks=(3, 7), episodes_per_task=4, batch_size=3,
                                  execute_steps=2, num_videos=1)
  calls = []

  def policy(obs):
    calls.append(obs)
    return np.full((len(obs["instruction"]), 2, libero_env.ACTION_DIM), 0.25)

  result = libero_eval.evaluate(policy, config, str(tmp_path), env_factory=_FakeLibero)
  records = result["episode_records"]
  assert [(r["task"], r["init_state"]) for r in records] == [
      (f"libero_object/{t}", i) for t in (3, 7) for i in range(4)]
  # 0.25 per step: init state i needs ceil((1 + i / 10) / 0.25) steps: 4, 5, 5, 6.
  assert [r["steps"] for r in records[:4]] == [4, 5, 5, 6] and all(r["success"] for r in records)
  assert records[0]["instruction"] == "do task 3" and result["mean_success"] == 1.0
  assert result["instructions"]["libero_object/7"] == "do task 7"
  assert calls[0]["images"].shape == (3, 2, 8, 8, 3) and calls[0]["state"].shape == (3, 8)
  assert calls[0]["task"][0] == "libero_object/3"
  with open(tmp_path / "libero_object.json") as f:
    assert json.load(f)["per_task"]["libero_object/3"]["successes"] == 4
  assert os.listdir(tmp_path / "libero_object_videos") == ["libero_object_3_0.gif"]
  # All tasks of a suite: ten for the headline suites.
  assert len(libero_eval.episodes_of(libero_eval.EvalConfig(episodes_per_task=2), 10)) == 20


def test_libero_evaluation_names_bad_settings():
  with pytest.raises(ValueError, match="EvalConfig.execute_steps=0"):
    libero_eval.EvalConfig(execute_steps=0)
  with pytest.raises(ValueError, match="EvalConfig.tasks"):
    libero_eval.EvalConfig(tasks=())
  config = libero_eval.EvalConfig(env=libero_env.EnvConfig(image_size=8, max_episode_steps=2), tasks=(0,),
                                  episodes_per_task=51, batch_size=1, num_videos=0)
  records = libero_eval.evaluate(lambda obs: np.zeros((1, 5, 7)), config,
                                 env_factory=_FakeLibero)["episode_records"]
  assert records[-1]["reason"].startswith("env_error at reset: ValueError: init state 50 does not exist")
  with pytest.raises(ValueError, match="--checkpoint is required"):
    libero_eval.make_policy("checkpoint")


def test_standardized_gripper_maps_to_libero_commands():
  # Registry convention (1 open, 0 closed) -> LIBERO's (-1 opens, +1 closes); deltas unchanged.
  actions = np.array([[[0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0], [0, 0, 0, 0, 0, 0, 0.0]]])
  out = libero_eval.env_actions(actions)
  np.testing.assert_array_equal(out[..., :6], actions[..., :6])
  np.testing.assert_array_equal(out[0, :, 6], [-1.0, 1.0])
  wrapped = libero_eval.StandardizedPolicy(lambda obs: actions)
  np.testing.assert_array_equal(wrapped({}), out)

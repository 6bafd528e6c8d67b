"""The C-MuJoCo loop (c_rollout) against the compiled MJX rollout, and its input errors.

References:
* The compiled rollout on the same episodes (same rng -> same initial states, instructions and
  policy rng) with the scripted expert, a closed-loop policy of the privileged state. The physics
  differ in precision only (MJX float32 vs C float64; positions agree within 1e-3 over 100
  steps, tests/sim/mjx/test_physics.py), which can move a phase switch of the expert by a step, and in
  contact-rich pushes can change the path more (measured: success steps differed by up to 23
  control steps in 4 of 24 episodes, the outcome in none). Tolerance: the outcome (success
  within the horizon) is the same in at least 11 of 12 episodes, and pick_lift, where the only
  contact is the grasp, reaches success within 3 control steps of the compiled rollout.
* For the camera: `render.render` of a full `mjx.put_data(model, C MjData)` must equal, pixel for
  pixel, what the C loop renders from the C state's qpos/mocap in its template data (the renderer
  recomputes the kinematics from them; depth within 1e-6 m for a different fusion).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mujoco  # noqa: E402
from mujoco import mjx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.sim.mjx import c_rollout  # noqa: E402
from m2vla_jax.sim.mjx import experts  # noqa: E402
from m2vla_jax.sim.mjx import render  # noqa: E402
from m2vla_jax.sim.mjx import rollout as rl  # noqa: E402
from m2vla_jax.sim.mjx import scene as scene_lib  # noqa: E402
from m2vla_jax.sim.mjx import tasks  # noqa: E402

N_ENVS, HORIZON = 12, 80
ENV = rl.EnvParams(execute_steps=1, render=False)


@pytest.mark.slow
def test_c_loop_reproduces_the_compiled_expert_episodes():
  rng = jax.random.key(3)
  compiled = rl.rollout(experts.expert_policy, None, ENV, rng, N_ENVS, HORIZON)
  c = c_rollout.c_rollout(experts.expert_policy, None, ENV, rng, N_ENVS, HORIZON)
  assert c["instructions"] == compiled["instructions"] and c["tasks"] == compiled["tasks"]
  assert not c["nonfinite"].any()
  agree = c_rollout.compare(compiled, c)
  # MJX and C MuJoCo integrate contacts in different float code, so an episode that ends within a
  # step of the horizon can flip; allow two of 12. A wiring bug (action order, state or camera of the
  # wrong env) breaks most episodes, and success_step below pins the timing.
  assert agree["same_outcome"] >= N_ENVS - 2, (compiled["success"], c["success"])
  assert c["success"].mean() >= 0.8 and compiled["success"].mean() >= 0.8
  pick = np.array([t == "pick_lift" for t in c["tasks"]]) & c["success"] & compiled["success"]
  assert pick.sum() >= 3
  np.testing.assert_allclose(c["success_step"][pick], compiled["success_step"][pick], atol=3)
  # the same report format as the compiled rollout
  s = rl.report(c)
  assert s["episodes"] == N_ENVS and set(s["per_task"]) == set(tasks.TASKS)
  np.testing.assert_allclose(s["mean_success"], np.mean(
      [c["success"][[t == task for t in c["tasks"]]].mean() for task in tasks.TASKS]))


def test_images_of_the_c_state_equal_put_data_rendering():
  scene = scene_lib.load()
  m = scene.model
  qpos, goal = c_rollout.initial_states(ENV, jax.random.key(0), 1)
  d = mujoco.MjData(m)
  d.qpos[:], d.mocap_pos[0] = qpos[0], goal[0]
  rs = np.random.default_rng(0)
  for _ in range(30):   # move the hand and fingers somewhere else
    d.ctrl[:] = scene_lib.ctrl_from_action_np(d.qpos[:3], rs.uniform(-1, 1, 4))
    for _ in range(scene_lib.SUBSTEPS):
      mujoco.mj_step(m, d)
  ref = jax.jit(lambda data: render.render(scene, data, ("table", "front"), 24, 24))(
      mjx.put_data(m, d))
  template = mjx.put_data(m, mujoco.MjData(m))
  states = c_rollout.mjx_states(template, d.qpos[None], d.mocap_pos[None], d.mocap_quat[None],
                                jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                                jnp.zeros(1, bool))
  got = jax.jit(jax.vmap(lambda data: render.render(scene, data, ("table", "front"), 24, 24)))(
      states.data)
  np.testing.assert_array_equal(np.asarray(got["seg"][0]), np.asarray(ref["seg"]))
  np.testing.assert_array_equal(np.asarray(got["rgb"][0]), np.asarray(ref["rgb"]))
  np.testing.assert_allclose(np.asarray(got["depth"][0]), np.asarray(ref["depth"]), atol=1e-6)
  # the goal pad and all three blocks are in the policy camera's view
  seg = np.asarray(ref["seg"][0])
  goal_id = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "goal")
  for g in [*scene.block_geoms, goal_id]:
    assert (seg == g).any(), g


def test_layout_repeats_share_initial_states():
  env = rl.EnvParams(layout_repeats=3, render=False)
  qpos, goal = c_rollout.initial_states(env, jax.random.key(0), 7)
  for a, b in ((0, 1), (0, 2), (3, 5), (6, 6)):
    np.testing.assert_array_equal(qpos[a], qpos[b])
    np.testing.assert_array_equal(goal[a], goal[b])
  assert np.abs(qpos[0] - qpos[3]).max() > 1e-3 and np.abs(qpos[3] - qpos[6]).max() > 1e-3
  assert [e.block for e in env.episodes(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_invalid_inputs_fail_before_any_step():
  with pytest.raises(ValueError, match="horizon=0"):
    c_rollout.c_rollout(experts.expert_policy, None, ENV, jax.random.key(0), 4, 0)
  with pytest.raises(ValueError, match="n_envs=-1"):
    c_rollout.c_rollout(experts.expert_policy, None, ENV, jax.random.key(0), -1, 10)
  with pytest.raises(TypeError, match="EnvParams"):
    c_rollout.c_rollout(experts.expert_policy, None, {"tasks": ("pick_lift",)},
                        jax.random.key(0), 4, 10)
  with pytest.raises(TypeError, match="callable"):
    c_rollout.c_rollout(None, None, ENV, jax.random.key(0), 4, 10)
  with pytest.raises(ValueError, match="record"):
    c_rollout.c_rollout(experts.expert_policy, None, rl.EnvParams(record=True),
                        jax.random.key(0), 4, 10)
  with pytest.raises(ValueError, match="layout_repeats=0"):
    rl.EnvParams(layout_repeats=0)
  with pytest.raises(ValueError, match="task='stack' is unknown"):
    rl.EnvParams(tasks=("stack",))
  with pytest.raises(ValueError, match="in the vocabulary of none"):
    rl.EnvParams(tasks=("push_to_target",), instructions=("lift the red block",))
  a = {"instructions": ["lift the red block"], "success": np.array([True])}
  b = {"instructions": ["lift the blue block"], "success": np.array([True])}
  with pytest.raises(ValueError, match="not the same episodes"):
    c_rollout.compare(a, b)

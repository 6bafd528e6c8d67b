"""The same closed-loop episodes as `rollout.rollout`, stepped by C MuJoCo from Python.

Owns `c_rollout` (reported with `rollout.report`): a reference loop that plays the compiled rollout's
episodes with the physics moved out of XLA, to show that a policy's success in the compiled MJX
program is not an artefact of MJX. What is shared with the compiled rollout, and what is not:

  same     scene XML (`scene.load().model`), initial states (`tasks.initial_qpos` on the same rng
           split), instruction assignment and tokens (`EnvParams.episodes` / `tokenize`), action ->
           actuator targets (`scene.ctrl_from_action_np`, the numpy twin of `ctrl_from_action`),
           `SUBSTEPS` physics steps per control step, chunk execution (a policy call every
           `execute_steps` control steps, rng `fold_in(k_policy, call)`), the observation
           (`rollout.observe`), the success / reward / lifted-flag functions (`tasks.*`, the same
           jitted JAX functions) and the scoring rules (first success, non-finite = failure).
  differs  physics: `mujoco.mj_step` on float64 MjData per environment instead of `mjx.step` in
           float32. Camera images: the JAX ray-cast renderer (`render.render`) applied to the C
           state: each C MjData's qpos and mocap pose (everything the renderer reads; it recomputes
           the kinematics from them) placed into an mjx.Data made by `mjx.put_data` from a C
           MjData. `mujoco.Renderer` (OpenGL) is not used here: TensorFlow (the training data
           pipeline) and EGL crash in one process, and the renderer is validated against
           mujoco.Renderer separately (tests/sim/mjx/test_render.py).

Returns the compiled rollout's result format, so `rollout.summarize` / `rollout.report` apply.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
from mujoco import mjx
import numpy as np

from m2vla_jax.sim.mjx import rollout as rollout_lib
from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks as tasks_lib


def mjx_states(template: mjx.Data, qpos: jax.Array, mocap_pos: jax.Array, mocap_quat: jax.Array,
               task_id: jax.Array, block: jax.Array, lifted: jax.Array) -> tasks_lib.EnvState:
  """Batched EnvState [N] from C state arrays: qpos [N, nq], mocap_pos/quat [N, nmocap, 3/4]."""
  def one(q, mp, mq, t, b, l):
    data = template.replace(qpos=q.astype(jnp.float32), mocap_pos=mp.astype(jnp.float32),
                            mocap_quat=mq.astype(jnp.float32))
    return tasks_lib.EnvState(data=data, task_id=t, block=b, lifted=l)
  return jax.vmap(one)(qpos, mocap_pos, mocap_quat, task_id, block, lifted)


@functools.lru_cache(maxsize=16)
def _compiled(policy_fn: rollout_lib.PolicyFn, env: rollout_lib.EnvParams, n_envs: int):
  """(act, score): jitted observation + policy, and jitted flag update + success + reward."""
  scene = scene_lib.load()
  template = mjx.put_data(scene.model, mujoco.MjData(scene.model))

  def act(params, k_policy, call, qpos, mocap_pos, mocap_quat, task_id, block, lifted, tokens,
          token_mask):
    states = mjx_states(template, qpos, mocap_pos, mocap_quat, task_id, block, lifted)
    obs = rollout_lib.observe(scene, env, states, tokens, token_mask)
    chunk = policy_fn(params, obs, jax.random.fold_in(k_policy, call))
    e = env.execute_steps
    if chunk.ndim != 3 or chunk.shape[0] != n_envs or chunk.shape[1] < e or chunk.shape[2] != 4:
      raise ValueError(f"policy_fn returned shape {chunk.shape}; expected [N={n_envs}, H>="
                       f"execute_steps={e}, 4]")
    return chunk.astype(jnp.float32)

  def score(qpos, mocap_pos, mocap_quat, task_id, block, lifted):
    states = mjx_states(template, qpos, mocap_pos, mocap_quat, task_id, block, lifted)
    states = jax.vmap(functools.partial(tasks_lib.update_flags, scene))(states)
    ok = jax.vmap(functools.partial(tasks_lib.success, scene))(states)
    rew = jax.vmap(functools.partial(tasks_lib.reward, scene))(states)
    return ok, rew, states.lifted

  return jax.jit(act), jax.jit(score)


def initial_states(env_params: rollout_lib.EnvParams, rng: jax.Array, n_envs: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """qpos float64 [N, nq] and goal float64 [N, 3] of the compiled rollout's episodes for `rng`."""
  scene = scene_lib.load()
  k_reset, _ = jax.random.split(rng)
  qpos, goal = jax.vmap(lambda k: tasks_lib.initial_qpos(k, scene))(
      rollout_lib.reset_keys(env_params, k_reset, n_envs))
  return np.asarray(qpos, np.float64), np.asarray(goal, np.float64)


def c_rollout(policy_fn: rollout_lib.PolicyFn, policy_params: Any,
              env_params: rollout_lib.EnvParams, rng: jax.Array, n_envs: int, horizon: int
              ) -> dict[str, Any]:
  """`rollout.rollout`'s episodes with C MuJoCo physics (see the module docstring).

  Returns numpy: success bool [N], success_step int32 [N], returns float [N], nonfinite bool [N],
  final_qpos float64 [N, nq]; host lists tasks, instructions, the env params, horizon and
  wall_s {'policy', 'physics', 'score'} (seconds per part of the loop).
  """
  rollout_lib.check_args(policy_fn, env_params, n_envs, horizon)
  if env_params.record:
    raise ValueError("c_rollout does not record frames; use EnvParams(record=False)")
  n, e = int(n_envs), env_params.execute_steps
  n_calls = math.ceil(horizon / e)
  scene = scene_lib.load()
  m = scene.model
  episodes = env_params.episodes(n)
  tokens, token_mask = env_params.tokenize([x.text for x in episodes])
  task_id = np.array([x.task_id for x in episodes], np.int32)
  block = np.array([x.block for x in episodes], np.int32)
  qpos0, goal = initial_states(env_params, rng, n)
  _, k_policy = jax.random.split(rng)
  act, score = _compiled(policy_fn, env_params, n)

  datas = []
  for i in range(n):
    d = mujoco.MjData(m)          # mocap_quat: the goal body's quaternion (identity)
    d.qpos[:] = qpos0[i]
    d.mocap_pos[0] = goal[i]
    d.ctrl[:] = np.concatenate([qpos0[i, scene_lib.HAND_QPOS], qpos0[i, scene_lib.FINGER_QPOS]])
    datas.append(d)
  mocap_pos = np.stack([d.mocap_pos.copy() for d in datas])
  mocap_quat = np.stack([d.mocap_quat.copy() for d in datas])

  lifted = np.zeros(n, bool)
  succ = np.zeros(n, bool)
  bad = np.zeros(n, bool)
  succ_step = np.full(n, -1, np.int32)
  ret = np.zeros(n, np.float64)
  wall = {"policy": 0.0, "physics": 0.0, "score": 0.0}
  with jax.transfer_guard("allow"):
    for r in range(n_calls):
      t0 = time.perf_counter()
      qpos = np.stack([d.qpos for d in datas])
      chunk = np.asarray(act(policy_params, k_policy, r, qpos, mocap_pos, mocap_quat, task_id,
                             block, lifted, tokens, token_mask), np.float64)
      wall["policy"] += time.perf_counter() - t0
      for k in range(e):
        t = r * e + k
        valid = t < horizon
        action = chunk[:, k]
        t0 = time.perf_counter()
        for i, d in enumerate(datas):
          d.ctrl[:] = scene_lib.ctrl_from_action_np(d.qpos[scene_lib.HAND_QPOS], action[i])
          for _ in range(scene_lib.SUBSTEPS):
            mujoco.mj_step(m, d)
        qpos = np.stack([d.qpos for d in datas])
        t1 = time.perf_counter()
        ok, rew, lifted = (np.asarray(x) for x in score(qpos, mocap_pos, mocap_quat, task_id,
                                                         block, lifted))
        wall["physics"] += t1 - t0
        wall["score"] += time.perf_counter() - t1
        finite = np.isfinite(qpos).all(-1) & np.isfinite(action).all(-1)
        bad |= ~finite & valid & ~succ
        ok = ok & finite & ~bad
        ret += np.where(valid & ~succ & finite, rew, 0.0)
        succ_step = np.where(ok & ~succ & valid, t, succ_step).astype(np.int32)
        succ |= ok & valid
  return {"success": succ, "success_step": succ_step, "returns": ret, "nonfinite": bad,
          "final_qpos": np.stack([d.qpos.copy() for d in datas]),
          "tasks": [x.task for x in episodes], "instructions": [x.text for x in episodes],
          "env_params": env_params, "horizon": int(horizon), "wall_s": wall}


def compare(compiled: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
  """Per-episode agreement of two results of the same episodes (same rng, env, n, horizon)."""
  if compiled["instructions"] != c["instructions"]:
    raise ValueError("compare: the two results are not the same episodes (instructions differ)")
  same = np.asarray(compiled["success"]) == np.asarray(c["success"])
  return {"episodes": int(same.size), "same_outcome": int(same.sum()),
          "compiled_only": int((compiled["success"] & ~c["success"]).sum()),
          "c_only": int((c["success"] & ~compiled["success"]).sum()),
          "compiled_success": float(np.mean(compiled["success"])),
          "c_success": float(np.mean(c["success"]))}


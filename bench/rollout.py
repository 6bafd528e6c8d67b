"""Closed-loop throughput: compiled MJX rollout vs a C-MuJoCo loop with mujoco.Renderer.

Both loops run the same episodes (same initial states, same horizon, same action-chunk schedule)
with the same policy: a jitted JAX function of the camera image and the privileged state (the
scripted expert plus a small random linear read-out of the 16x16-pooled image, so the image is
really consumed and XLA cannot drop the renderer). MJX: one jitted program per env count (reset,
ray-cast rendering, policy, physics, scoring), timed on its second call. C: one MjData per env,
mj_step, mujoco.Renderer (EGL) for each env at every policy call, the policy on the stacked batch.

Env steps are control steps (scene.SUBSTEPS physics steps each). Prints a table; the last number
on the last line is the MJX/C throughput ratio at the largest env count.

  MUJOCO_GL=egl python bench/rollout.py [--envs 1,64,512] [--horizon 40]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from m2vla_jax.sim.mjx import experts  # noqa: E402
from m2vla_jax.sim.mjx import rollout as rl  # noqa: E402
from m2vla_jax.sim.mjx import scene as scene_lib  # noqa: E402
from m2vla_jax.sim.mjx import tasks  # noqa: E402

_W = np.random.default_rng(0).normal(0, 1e-3, (16 * 16 * 3, 4)).astype(np.float32)


def bench_policy(params, obs, rng):
  """Expert + small linear read-out of the pooled front image; chunk [N, E, 4]."""
  del rng
  img = obs["images"][:, 0].astype(jnp.float32) / 255.0            # [N, S, S, 3]
  n, s = img.shape[0], img.shape[1]
  pooled = img.reshape(n, 16, s // 16, 16, s // 16, 3).mean((2, 4)).reshape(n, -1)
  act = jax.vmap(experts.expert_action)(obs["privileged"]) + pooled @ params["w"]
  return jnp.repeat(jnp.clip(act, -1, 1)[:, None], params["e"].shape[0], 1)


def run_mjx(env: rl.EnvParams, params, n: int, horizon: int) -> tuple[float, float, np.ndarray]:
  t0 = time.perf_counter()
  out = rl.rollout(bench_policy, params, env, jax.random.key(0), n, horizon)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = rl.rollout(bench_policy, params, env, jax.random.key(0), n, horizon)
  return n * horizon / (time.perf_counter() - t0), compile_s, out["success"]


def run_c(env: rl.EnvParams, params, n: int, horizon: int) -> tuple[float, np.ndarray]:
  scene = scene_lib.load()
  m = scene.model
  eps = env.episodes(n)
  # The rollout's own initial states (same rng split) so both loops play the same episodes.
  k_reset, _ = jax.random.split(jax.random.key(0))
  qpos, goal = jax.vmap(lambda k: tasks.initial_qpos(k, scene))(jax.random.split(k_reset, n))
  qpos, goal = np.asarray(qpos, np.float64), np.asarray(goal, np.float64)
  datas = []
  for i in range(n):
    d = mujoco.MjData(m)
    d.qpos[:] = qpos[i]
    d.mocap_pos[0] = goal[i]
    d.ctrl[:] = np.concatenate([qpos[i, :3], qpos[i, 3:5]])
    mujoco.mj_forward(m, d)
    datas.append(d)
  policy = jax.jit(bench_policy)
  renderer = mujoco.Renderer(m, env.image_size, env.image_size)
  renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
  renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
  task_ids = np.array([e.task_id for e in eps], np.float32)
  blocks = np.array([e.block for e in eps], np.float32)
  success = np.zeros(n, bool)
  # warm the policy's compile outside the timed loop (the MJX timing excludes compiles too)
  dummy = {"images": np.zeros((n, 1, env.image_size, env.image_size, 3), np.uint8),
           "privileged": np.zeros((n, 18), np.float32)}
  jax.block_until_ready(policy(params, dummy, None))
  t0 = time.perf_counter()
  try:
    for t in range(horizon):
      if t % env.execute_steps == 0:
        images = []
        for d in datas:
          renderer.update_scene(d, camera="front")
          images.append(renderer.render())
        priv = np.stack([np.concatenate([
            d.qpos[:3], [d.qpos[3:5].mean()], d.qpos[scene.block_qpos[:, :3]].reshape(-1),
            d.mocap_pos[0]]) for d in datas]).astype(np.float32)
        priv = np.concatenate([priv, task_ids[:, None], blocks[:, None]], 1)
        chunk = np.asarray(policy(params, {"images": np.stack(images)[:, None],
                                           "privileged": priv}, None))
      for i, d in enumerate(datas):
        d.ctrl[:] = scene_lib.ctrl_from_action_np(d.qpos[:3], chunk[i, t % env.execute_steps])
        for _ in range(scene_lib.SUBSTEPS):
          mujoco.mj_step(m, d)
        b = d.qpos[scene.block_qpos[eps[i].block, :3]]
        if eps[i].task == "pick_lift":
          success[i] |= b[2] > scene_lib.BLOCK_HALF + tasks.LIFT_HEIGHT
  finally:
    renderer.close()
  return n * horizon / (time.perf_counter() - t0), success


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--envs", default="1,64,512")
  ap.add_argument("--horizon", type=int, default=40)
  ap.add_argument("--image_size", type=int, default=64)
  ap.add_argument("--execute_steps", type=int, default=4)
  args = ap.parse_args()
  env = rl.EnvParams(execute_steps=args.execute_steps, image_size=args.image_size)
  params = {"w": jnp.asarray(_W), "e": jnp.zeros(args.execute_steps)}
  rows = []
  print(f"{'envs':>5} {'mjx steps/s':>12} {'mjx compile s':>14} {'C steps/s':>10} {'ratio':>7}",
        flush=True)
  for n in [int(x) for x in args.envs.split(",")]:
    mjx_sps, compile_s, _ = run_mjx(env, params, n, args.horizon)
    c_sps, _ = run_c(env, params, n, args.horizon)
    rows.append((n, mjx_sps, c_sps))
    print(f"{n:>5} {mjx_sps:>12.1f} {compile_s:>14.1f} {c_sps:>10.1f} {mjx_sps / c_sps:>7.2f}",
          flush=True)
  n, mjx_sps, c_sps = rows[-1]
  print(f"control steps/s with policy + {args.image_size}px renderer in the loop at {n} envs: "
        f"MJX {mjx_sps:.1f} vs C MuJoCo + mujoco.Renderer {c_sps:.1f}, ratio {mjx_sps / c_sps:.2f}")


if __name__ == "__main__":
  main()

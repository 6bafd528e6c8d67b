"""Meta-World simulation throughput: env steps/s with a policy in the loop, rendered frames/s.

For each batch size B (environments in worker processes, stepped in parallel):
  physics   env steps/s without rendering (random actions)
  loop      env steps/s with a cheap chunked policy in the loop (random chunks of 4, executed
            open-loop, cameras rendered at each re-planning step), i.e. the evaluation loop
  render    camera frames/s with rendering at every step (primary + wrist), our fast settings
  reference the same with Meta-World's default visual settings (shadows, reflections, 4x MSAA)

  MUJOCO_GL=egl python bench/sim.py [--batches 1,8,32] [--size 224] [--steps 40]
Last line: fast / default rendered frames/s at the largest batch (higher is better).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("MUJOCO_GL", "egl")

from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld  # noqa: E402
from m2vla_jax.sim.metaworld import env as metaworld_env  # noqa: E402


def _step_all(envs, actions, render):
  for env, a in zip(envs, actions):
    env.step_async(a, render=render)
  return [env.step_wait() for env in envs]


def _run(envs, steps, render_every, rng, policy=None):
  """Steps every env `steps` times; returns elapsed seconds (resets at the step limit)."""
  obs = [env.reset(metaworld_env.episode_seed(env.task, i, "eval")) for i, env in enumerate(envs)]
  chunk = None
  t0 = time.perf_counter()
  for t in range(steps):
    k = t % 4
    if policy is not None and k == 0:
      batch = {"task": [e.task for e in envs], "images": np.stack([o["images"] for o in obs])}
      chunk = policy(batch)
    actions = chunk[:, k] if chunk is not None else rng.uniform(-1, 1, (len(envs), 4))
    render = render_every > 0 and (t + 1) % render_every == 0
    results = _step_all(envs, actions, render)
    obs = [r[0] if render else o for r, o in zip(results, obs)]
    for env, r in zip(envs, results):
      if r[3]:
        env.reset(0, render=False)
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--steps", type=int, default=40)
  a = p.parse_args()
  tasks = metaworld_env.suite_tasks("mt10")
  rng = np.random.default_rng(0)
  policy = evaluate_metaworld.RandomChunkPolicy(horizon=4)
  rows = []
  for b in [int(x) for x in a.batches.split(",")]:
    row = {"B": b}
    for label, fast in (("render", True), ("reference", False)):
      cfg = metaworld_env.EnvConfig(image_size=a.size, fast_render=fast)
      envs = [metaworld_env.ProcessEnv(tasks[i % len(tasks)], cfg) for i in range(b)]
      try:
        if fast:
          row["physics"] = b * 4 * a.steps / _run(envs, 4 * a.steps, 0, rng)
          row["loop"] = b * 4 * a.steps / _run(envs, 4 * a.steps, 4, rng, policy)
        n = a.steps if fast else max(4, a.steps // 4)
        row[label] = b * n * len(cfg.cameras) / _run(envs, n, 1, rng)
      finally:
        for env in envs:
          env.close()
    rows.append(row)
    print(f"  B={b}: {row}", flush=True)
  print(f"Meta-World MT10 tasks, {a.size}px, 2 cameras, {os.cpu_count()} cores, MUJOCO_GL="
        f"{os.environ.get('MUJOCO_GL')}")
  print(f"{'B':>4} {'physics steps/s':>16} {'loop steps/s':>13} {'fast frames/s':>14} "
        f"{'default frames/s':>17}")
  for r in rows:
    print(f"{r['B']:>4} {r['physics']:>16.0f} {r['loop']:>13.0f} {r['render']:>14.1f} "
          f"{r['reference']:>17.1f}")
  last = rows[-1]
  print(f"fast / default rendered frames/s at B={last['B']}: {last['render'] / last['reference']:.2f}")


if __name__ == "__main__":
  main()

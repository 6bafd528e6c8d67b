"""Success of the scripted LIBERO experts (sim/libero/experts.py): per task, over benchmark init states.

Each (suite, task) runs in its own `ProcessEnv` worker (at most `--workers` at once), which plays the
expert (`run_expert_episode`, no per-step rendering, images not recorded) from init states
0..`--inits`-1 under the evaluation protocol (init state, 10 no-op steps, the suite's step limit).
Prints, per task: successes / episodes, the mean episode length (steps the expert took, cut 5 steps
after success; failures count the step limit or where they stopped) and the mean step at which the
goal first held; then per suite, and the wall time.

  MUJOCO_GL=egl python bench/libero_experts.py [--suites libero_spatial,libero_object] [--tasks 0-9]
                                               [--inits 10] [--workers 2] [--noise-std 0.0]
Needs the [libero] extra (or --worker-python naming an interpreter that has it). Last line: the mean
success rate over all episodes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from m2vla_jax.sim.libero import env as libero_env  # noqa: E402


def parse_tasks(spec: str) -> list[int]:
  """'0-9' or '0,3,5' -> task indices."""
  tasks = []
  for part in spec.split(","):
    if "-" in part:
      first, last = part.split("-")
      tasks.extend(range(int(first), int(last) + 1))
    elif part:
      tasks.append(int(part))
  return tasks


def run_task(suite: str, task: int, inits: int, noise_std: float, seed: int,
             worker_python: str | None) -> dict:
  # Images are neither recorded nor rendered per step; the smallest size keeps resets cheap too.
  config = libero_env.EnvConfig(suite=suite, image_size=8, render_size=8, worker_python=worker_python)
  t0 = time.perf_counter()
  episodes = []
  with libero_env.ProcessEnv(task, config) as env:
    if inits > env.num_init_states:
      raise ValueError(f"--inits={inits}: {suite} task {task} has {env.num_init_states} init states")
    for i in range(inits):
      result = env.call("run_expert_episode", i, noise_std, seed + i, False)
      episodes.append({k: result[k] for k in ("success", "success_step", "num_steps", "rim_grasp")})
    instruction = env.instruction
  return {"suite": suite, "task": task, "instruction": instruction, "episodes": episodes,
          "wall_s": time.perf_counter() - t0}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suites", default="libero_spatial,libero_object")
  parser.add_argument("--tasks", default="0-9", help="task indices: '0-9' or '0,2,5'")
  parser.add_argument("--inits", type=int, default=10, help="init states 0..inits-1 per task")
  parser.add_argument("--workers", type=int, default=2, help="environments run at once")
  parser.add_argument("--noise-std", type=float, default=0.0, help="position-delta noise (action units)")
  parser.add_argument("--seed", type=int, default=0, help="noise seed of init state 0 (+i for state i)")
  parser.add_argument("--worker-python", default=None, help="interpreter with LIBERO for the workers")
  args = parser.parse_args()
  os.environ.setdefault("MUJOCO_GL", "egl")
  suites = [s for s in args.suites.split(",") if s]
  jobs = [(suite, task) for suite in suites for task in parse_tasks(args.tasks)]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
    # Threads only wait on their worker processes' pipes; the simulation runs in the workers.
    futures = [pool.submit(run_task, suite, task, args.inits, args.noise_std, args.seed,
                           args.worker_python) for suite, task in jobs]
    rows = [f.result() for f in futures]
  wall = time.perf_counter() - t0

  print(f"scripted experts, init states 0..{args.inits - 1}, noise std {args.noise_std}, "
        f"{args.workers} workers; {os.cpu_count()} CPUs visible")
  print(f"{'suite':<15} {'task':>4} {'success':>8} {'mean len':>8} {'succ@':>6} {'wall s':>7}  instruction")
  all_success = []
  for suite in suites:
    suite_success = []
    for row in (r for r in rows if r["suite"] == suite):
      eps = row["episodes"]
      success = np.array([e["success"] for e in eps])
      lengths = np.array([e["num_steps"] for e in eps])
      at = [e["success_step"] for e in eps if e["success"]]
      suite_success.extend(success.tolist())
      print(f"{suite:<15} {row['task']:>4} {f'{success.sum()}/{len(eps)}':>8} {lengths.mean():>8.1f} "
            f"{(np.mean(at) if at else float('nan')):>6.1f} {row['wall_s']:>7.0f}  {row['instruction']}")
    print(f"{suite:<15} {'all':>4} {f'{sum(suite_success)}/{len(suite_success)}':>8}  "
          f"success rate {np.mean(suite_success):.3f}")
    all_success.extend(suite_success)
  print(f"wall time {wall:.0f} s for {len(all_success)} episodes")
  print(f"mean success rate: {np.mean(all_success):.3f}")


if __name__ == "__main__":
  main()

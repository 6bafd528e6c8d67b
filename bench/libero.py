"""LIBERO environment throughput: policy steps/s with both cameras rendered, at 128 and 224 px.

Each size runs one `ProcessEnv` (the evaluation path: worker process, pickled observations) on
one LIBERO-Spatial task, rendered directly at that size (render_size = image_size, no resize),
plus the protocol's own setting (render 256, resize to 224) for reference. Steps send small
random actions (seeded) so the arm moves; the first steps after reset are not timed. Rendering
settings are LIBERO's own (shadows, reflections, multisampling untouched), so the images are the
ones reported numbers use, except the last row: reflections off (`EnvConfig(reflections=False)`),
which changes the images and is marked NOT FOR REPORTED NUMBERS (LIBERO's lights cast no shadows,
so there is no shadow setting to turn off).

  MUJOCO_GL=egl python bench/libero.py [--suite libero_spatial] [--task 0] [--steps 30]
Needs the [libero] extra. Last line: the ratio of steps/s at 224 px to steps/s at 128 px.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from m2vla_jax.sim.libero import env as libero_env  # noqa: E402

WARMUP_STEPS = 3


def measure(suite: str, task: int, image_size: int, render_size: int, steps: int,
            reflections: bool = True) -> dict:
  config = libero_env.EnvConfig(suite=suite, image_size=image_size, render_size=render_size,
                                reflections=reflections)
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  with libero_env.ProcessEnv(task, config) as env:
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs = env.reset(0)
    reset = time.perf_counter() - t0
    assert obs["images"].shape == (2, image_size, image_size, 3), obs["images"].shape
    actions = np.concatenate([rng.uniform(-0.3, 0.3, (WARMUP_STEPS + steps, 6)),
                              -np.ones((WARMUP_STEPS + steps, 1))], axis=1)
    for a in actions[:WARMUP_STEPS]:
      env.step(a)
    t0 = time.perf_counter()
    for a in actions[WARMUP_STEPS:]:
      env.step(a)
    elapsed = time.perf_counter() - t0
  return {"image": image_size, "render": render_size, "build_s": build, "reset_s": reset,
          "steps_per_s": steps / elapsed, "reflections": reflections}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", default="libero_spatial")
  parser.add_argument("--task", type=int, default=0)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  if args.steps > libero_env.SUITE_MAX_STEPS[args.suite] - WARMUP_STEPS:
    raise SystemExit(f"--steps={args.steps} exceeds the suite's step limit minus {WARMUP_STEPS}")
  os.environ.setdefault("MUJOCO_GL", "egl")
  rows = [measure(args.suite, args.task, size, render, args.steps)
          for size, render in ((128, 128), (224, 224),
                               (libero_env.IMAGE_SIZE, libero_env.RENDER_SIZE))]
  rows.append(measure(args.suite, args.task, 224, 224, args.steps, reflections=False))
  print(f"{args.suite} task {args.task}, {args.steps} timed steps, cameras: "
        f"{', '.join(libero_env.CAMERAS)}; {os.cpu_count()} CPUs visible, MUJOCO_GL="
        f"{os.environ['MUJOCO_GL']}")
  print(f"{'image px':>8} {'render px':>9} {'steps/s':>8} {'ms/step':>8} {'build s':>8} "
        f"{'reset s':>8}")
  for r in rows:
    note = "  (protocol: render 256, resize)" if r["render"] != r["image"] else ""
    if not r["reflections"]:
      note = "  reflections off: images change, NOT FOR REPORTED NUMBERS"
    print(f"{r['image']:>8} {r['render']:>9} {r['steps_per_s']:>8.2f} "
          f"{1000 / r['steps_per_s']:>8.1f} {r['build_s']:>8.1f} {r['reset_s']:>8.1f}{note}")
  ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
  print(f"steps/s at 224 px / steps/s at 128 px: {ratio:.3f}")


if __name__ == "__main__":
  main()

"""Training throughput of the debug config on CPU: steps/s, examples/s and MFU of the jitted train step.

The reference for MFU is measured in the same run: the FLOP/s this machine reaches on a dense float32
matmul (jitted, [N, N] @ [N, N]), i.e. MFU here is "fraction of this CPU's practical matmul peak". The
step's FLOPs come from XLA's cost analysis of the compiled step (`perf.step_flops`), the same number
the trainer logs as perf/mfu on accelerators with a known peak.

  python bench/train.py [--steps 20] [--batch 16] [--devices 1]
Last line: the MFU ratio (train-step FLOP/s / matmul FLOP/s).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--devices", type=int, default=1, help="emulated CPU devices (data-parallel mesh)")
  ap.add_argument("--matmul", type=int, default=1024)
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import perf  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  spec = importlib.util.spec_from_file_location("debug", os.path.join(REPO, "configs", "debug.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(f"steps={args.steps + 3},batch={args.batch}")

  data = trainer.build_data(config, "train")
  batches = [next(data) for _ in range(args.steps + 3)]
  s = trainer.setup(config, batches[0])
  step = jax.jit(train_state.make_train_step(s.policy, s.tx, s.schedule), donate_argnums=0,
                 in_shardings=(s.shardings, sharding_lib.batch_sharding(s.mesh)),
                 out_shardings=(s.shardings, sharding_lib.replicated(s.mesh)))
  gb = [sharding_lib.host_to_global(b, s.mesh) for b in batches]
  compiled = step.lower(s.state, gb[0]).compile()
  flops = perf.step_flops(compiled) or float("nan")
  state = s.state
  for b in gb[:3]:  # warm-up
    state, m = compiled(state, b)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for b in gb[3:]:
    state, m = compiled(state, b)
  jax.block_until_ready(state)
  dt = time.perf_counter() - t0
  steps_per_s = args.steps / dt

  n = args.matmul
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  reps = 10
  t0 = time.perf_counter()
  for _ in range(reps):
    out = mm(a)
  jax.block_until_ready(out)
  matmul_flops = 2 * n ** 3 * reps / (time.perf_counter() - t0)

  step_flops_per_s = flops * steps_per_s * args.devices  # cost analysis is per device (SPMD program)
  mfu = step_flops_per_s / matmul_flops
  rows = [
      ("debug config (toy policy), batch", f"{args.batch}"),
      ("devices", f"{args.devices}"),
      ("train step GFLOP (per device, XLA cost analysis)", f"{flops / 1e9:.4f}"),
      ("steps/s", f"{steps_per_s:.2f}"),
      ("examples/s", f"{steps_per_s * args.batch:.1f}"),
      ("train step GFLOP/s", f"{step_flops_per_s / 1e9:.3f}"),
      (f"reference: f32 matmul {n}x{n} GFLOP/s", f"{matmul_flops / 1e9:.2f}"),
  ]
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  print(f"MFU vs measured matmul peak (step FLOP/s / matmul FLOP/s): {mfu:.4f}")


if __name__ == "__main__":
  main()

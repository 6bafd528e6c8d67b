"""MSM retrieval time vs memory size and vs number of devices (emulated CPU devices by default).

For every device count n (one subprocess each, `--xla_force_host_platform_device_count=n`), the memory's
entry axis is sharded over n devices and `msm.retrieve` (per-shard top-K + global merge under
`jax.shard_map`) is timed for each memory size; n = 1 runs the same sharded code on one device. The
table reports the time per retrieval, the fitted exponent of time ~ size^e (goal: linear, e ≈ 1) and
the speed-up t(1 device) / t(n devices). Emulated devices share this machine's cores, so their
speed-up is bounded by the cores available (`os.cpu_count()`), not by the algorithm.

  python bench/msm.py [--sizes 1e3,1e4,1e5,1e6] [--devices 1,2,4,8] [--key-dim 192] [--queries 8]
Last line: speed-up of n_max devices over 1 device at the largest size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
  # Single-threaded Eigen per device: with intra-op threads, devices emulated on few cores can starve
  # each other's collective rendezvous (XLA aborts after 40 s). Same flag for every device count.
  # Always 8 emulated devices, of which the mesh uses n: with exactly 2 emulated devices on this 2-core
  # machine the CPU all-gather rendezvous deadlocks (XLA aborts after 40 s); 4 and 8 are fine.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={max(8, args.worker)} "
                             "--xla_cpu_multi_thread_eigen=false "
                             # Under load from other processes one device thread can reach the
                             # all-gather long after the rest; XLA aborts after 40 s by default.
                             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh
  from m2vla_jax.models import msm

  jax.config.update("jax_platforms", "cpu")
  n = args.worker
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  results = {}
  for size in [int(float(s)) for s in args.sizes.split(",")]:
    size = -(-size // 8) * 8  # divisible by every device count
    rng = np.random.default_rng(0)
    memory = {
        "keys": jnp.asarray(rng.normal(size=(size, args.key_dim)).astype(np.float32)),
        "values": jnp.asarray(rng.normal(size=(size, args.horizon, args.action_dim)).astype(np.float32)),
        "ids": jnp.arange(size, dtype=jnp.int32),
        "valid": jnp.ones((size,), bool),
        "ptr": jnp.zeros((), jnp.int32),
    }
    memory = jax.device_put(memory, msm.memory_sharding(mesh, "data"))
    queries = jnp.asarray(rng.normal(size=(args.queries, args.key_dim)).astype(np.float32))
    qids = jnp.arange(args.queries, dtype=jnp.int32)
    fn = jax.jit(lambda m, q, i: msm.retrieve(m, q, i, args.k, mesh=mesh, axis_name="data"))
    jax.block_until_ready(fn(memory, queries, qids))
    reps = max(3, int(2e8 // (size * args.key_dim * args.queries)))
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fn(memory, queries, qids)
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - t0) / reps)
    results[size] = best
    del memory
  print("RESULT " + json.dumps(results))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--key-dim", type=int, default=192, help="3 pooled layers x 64 (real: 3 x 2048)")
  p.add_argument("--queries", type=int, default=8)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--horizon", type=int, default=8)
  p.add_argument("--action-dim", type=int, default=7)
  p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)

  import numpy as np
  devices = [int(d) for d in args.devices.split(",")]
  table = {}
  for n in devices:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--sizes", args.sizes,
           "--key-dim", str(args.key_dim), "--queries", str(args.queries), "--k", str(args.k),
           "--horizon", str(args.horizon), "--action-dim", str(args.action_dim)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
      sys.exit(f"worker with {n} devices failed:\n{out.stderr[-3000:]}")
    table[n] = {int(k): v for k, v in json.loads(line[0][7:]).items()}

  sizes = sorted(table[devices[0]])
  print(f"MSM retrieval: {args.queries} queries, key dim {args.key_dim}, top-{args.k}, "
        f"{os.cpu_count()} CPU cores; ms per retrieval (best of 3)")
  print(f"{'entries':>10} " + " ".join(f"{f'{n} dev':>10}" for n in devices)
        + " " + " ".join(f"{f'x{n}':>7}" for n in devices[1:]))
  for s in sizes:
    row = f"{s:>10} " + " ".join(f"{table[n][s] * 1e3:>10.3f}" for n in devices)
    row += " " + " ".join(f"{table[devices[0]][s] / table[n][s]:>7.2f}" for n in devices[1:])
    print(row)
  print("fitted exponent e in time ~ entries^e (least squares on log-log, sizes >= 1e4):")
  fit_sizes = [s for s in sizes if s >= 1e4] or sizes
  for n in devices:
    e = np.polyfit(np.log([float(s) for s in fit_sizes]), np.log([table[n][s] for s in fit_sizes]), 1)[0]
    print(f"  {n} device(s): e = {e:.3f}")
  big = sizes[-1]
  print(f"speed-up {devices[-1]} devices vs {devices[0]} at {big} entries: "
        f"{table[devices[0]][big] / table[devices[-1]][big]:.3f}")


if __name__ == "__main__":
  main()

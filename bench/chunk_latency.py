"""Action-chunk latency of trained runs, side by side: one policy call (observation in, chunk out).

Loads each run's newest checkpoint (`InferencePolicy.from_workdir`: the policy its config names, M²-VLA,
MoLe-VLA, adapters merged or routed as in training) and times `sample_actions` on the run's own batch
geometry (its stored batch spec; random uint8 images, random instruction tokens, all masks on), at
each batch size, every run and batch size interleaved in each round so a load change on the shared
cores hits all alike (best of --rounds, and the median). The first run is the reference of the
ratios. Unlike the latency an evaluation records (`summary.json`'s `policy_latency`), all runs here
are timed in one process at one time, so their ratios are comparable.

  python bench/chunk_latency.py --run m2=/tmp/sim_pretrained_97_seed0 --run mole=/tmp/mole [--batch 1,8]
Last line: each run's batch-1 speed-up over the first run (best times); the last number is the last
run's (higher is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.inference.policy import InferencePolicy  # noqa: E402


def random_observation(spec: dict, batch: int, vocab: int, seed: int) -> dict:
  """A batch shaped by the run's stored batch spec: uint8 images, tokens in [1, vocab), masks on."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, v in spec.items():
    if not key.startswith("observation/"):
      continue
    shape, dtype = [batch] + list(v["shape"][1:]), np.dtype(v["dtype"])
    if dtype == np.bool_:
      flat[key] = np.ones(shape, bool)
    elif dtype == np.uint8:
      flat[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif np.issubdtype(dtype, np.integer):
      flat[key] = rng.integers(1, vocab, shape).astype(dtype)
    else:
      flat[key] = rng.standard_normal(shape).astype(dtype)
  return tree_util.unflatten(flat)["observation"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR; the first is the reference")
  p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--rounds", type=int, default=10)
  args = p.parse_args(argv)
  runs = []
  for item in args.run:
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise SystemExit(f"--run {item!r}: use LABEL=WORKDIR")
    runs.append((label, workdir))
  batches = [int(b) for b in args.batch.split(",") if b]

  calls = {}
  for label, workdir in runs:
    t = time.perf_counter()
    loaded = InferencePolicy.from_workdir(workdir)
    if not loaded.batch_spec:
      raise SystemExit(f"{workdir}: the run stored no batch spec; it cannot be timed here")
    vocab = int(getattr(loaded.policy.config, "vocab_size", 0) or 256)
    sample = jax.jit(loaded.policy.sample_actions)
    for b in batches:
      obs = random_observation(loaded.batch_spec, b, min(vocab, 256), seed=b)
      rng = jax.random.PRNGKey(0)
      calls[(label, b)] = (lambda s=sample, l=loaded, o=obs, r=rng:
                           np.asarray(s(l.params, l.state, o, r)))
    print(f"loaded {label}: {workdir} ({loaded.config.policy}) in {time.perf_counter() - t:.0f} s",
          flush=True)

  for fn in calls.values():   # compile
    fn()
  times = {k: [] for k in calls}
  for _ in range(args.rounds):
    for k, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)

  ref = runs[0][0]
  print(f"\n{'run':>16} {'batch':>5} {'best ms':>9} {'median ms':>10} {'vs ' + ref:>10}")
  for b in batches:
    for label, _ in runs:
      best, median = min(times[(label, b)]), float(np.median(times[(label, b)]))
      print(f"{label:>16} {b:>5} {best * 1e3:>9.1f} {median * 1e3:>10.1f} "
            f"{min(times[(ref, b)]) / best:>9.2f}x")
  b = batches[0]
  ratios = [min(times[(ref, b)]) / min(times[(label, b)]) for label, _ in runs[1:]] or [1.0]
  print(f"batch-{b} speed-up over {ref}: " + ", ".join(
      f"{label} {r:.2f}" for (label, _), r in zip(runs[1:], ratios)) + f" {ratios[-1]:.2f}")


if __name__ == "__main__":
  main()

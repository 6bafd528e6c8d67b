"""Action-chunk latency of trained runs, side by side: one policy call (observation in, chunk out).

Loads each run's newest checkpoint (`InferencePolicy.from_workdir`: the policy its config names, M²-VLA,
MoLe-VLA; LoRA folded into the weights as every loaded run is, VLA-GSE's routed experts as trained)
and times `sample_actions` on the run's own batch geometry (its stored batch spec; random uint8
images, random instruction tokens, all masks on), at each batch size, every run and batch size
interleaved in each round so a load change on the shared cores hits all alike (best of --rounds, and the median). The first run is the reference of the
ratios. Unlike the latency an evaluation records (`summary.json`'s `policy_latency`), all runs here
are timed in one process at one time, so their ratios are comparable.

With --skip_impls, a MoLe-VLA run's backbone alone (`VLM.apply`, no head) is also timed under each
layer-skipping implementation (`layer_skip.SKIP_IMPLS`) and at full depth, same rounds; those rows'
ratios are to the run's own full-depth backbone.

  python bench/chunk_latency.py --run m2=/tmp/sim_pretrained_97_seed0 --run mole=/tmp/mole [--batch 1,8]
      [--skip_impls auto,gather,loop,masked]
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
  p.add_argument("--skip_impls", default="", help="comma-separated; MoLe runs' backbones under each")
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
    sample = jax.jit(loaded.policy.sample_actions)
    for b in batches:
      # Token ids below 256 exist in every tokenizer here; the cost does not depend on which.
      obs = random_observation(loaded.batch_spec, b, 256, seed=b)
      rng = jax.random.PRNGKey(0)
      calls[(label, b)] = (lambda s=sample, l=loaded, o=obs, r=rng:
                           np.asarray(s(l.params, l.state, o, r)))
      if args.skip_impls and getattr(loaded.policy.vlm.config, "router", None) is not None:
        for impl in [i for i in args.skip_impls.split(",") if i] + ["full depth"]:
          kw = {"full_depth": True} if impl == "full depth" else {"skip_impl": impl}
          fn = jax.jit(lambda p, o, pol=loaded.policy, kw=kw: pol.vlm.apply(
              {"params": p}, *pol.vlm_inputs(o), **kw)["final"])
          calls[(f"{label} backbone {impl}", b)] = (
              lambda fn=fn, l=loaded, o=obs: jax.block_until_ready(fn(l.params["vlm"], o)))
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
  width = max(16, *(len(k[0]) for k in calls))
  print(f"\n{'run':>{width}} {'batch':>5} {'best ms':>9} {'median ms':>10} {'vs ' + ref:>10}")
  for b in batches:
    for label in dict.fromkeys(k[0] for k in calls):
      best, median = min(times[(label, b)]), float(np.median(times[(label, b)]))
      # Backbone rows against their own run's full-depth backbone; policy rows against the first run.
      base = label.split(" backbone ")[0] + " backbone full depth" if " backbone " in label else ref
      print(f"{label:>{width}} {b:>5} {best * 1e3:>9.1f} {median * 1e3:>10.1f} "
            f"{min(times[(base, b)]) / best:>9.2f}x")
  b = batches[0]
  ratios = [min(times[(ref, b)]) / min(times[(label, b)]) for label, _ in runs[1:]] or [1.0]
  print(f"batch-{b} speed-up over {ref}: " + ", ".join(
      f"{label} {r:.2f}" for (label, _), r in zip(runs[1:], ratios)) + f" {ratios[-1]:.2f}")


if __name__ == "__main__":
  main()

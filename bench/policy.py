"""Frozen-backbone M²-VLA vs the same model fully fine-tuned: train-step time, sampling time, optimizer memory.

Both arms use the trainer's own `train_state.make_init_fn` / `make_train_step` (AdamW, grad clipping)
on the same policy, batch and devices, in one run; only `trainable` differs:
  frozen:    the default M²-VLA rules (queries + head train, SigLIP and Gemma frozen)
  full:      [('.*', True)] (every parameter trains)
  head-only: queries frozen too (reference: the cost once no gradient crosses the backbone)
each for both `VLMConfig.query_attention` settings:
  readout (default, the paper's): the queries are a causal suffix the image/text prefix cannot see,
    run as a second pass over the prefix's key/value cache, so their gradient crosses only the
    query tokens of each layer.
  bidirectional: the queries sit inside the bidirectional prefix, so their gradient needs the
    activation backward through every prefix token of every VLM layer; freezing then saves the
    weight gradients and the optimizer, not that backward.
Frozen weights stay float32 here (`--frozen-dtype`), so the comparison isolates what freezing saves
(no weight gradients, no optimizer state/update for the backbone) from what bf16 storage saves.
The backbone is a small SigLIP + Gemma built from the tiny variants with wider fields (`--scale`), so
the CPU can run it; the head reads every 2nd layer.

  python bench/policy.py [--batch 8] [--iters 10] [--scale 1]
Last line: frozen/full train-step time ratio with the default readout queries (goal <= 0.5); the
optimizer-memory ratio (goal <= 0.3) is on the line before.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from m2vla_jax.models import gemma, siglip, vlm  # noqa: E402
from m2vla_jax.policies import m2vla  # noqa: E402
from m2vla_jax.training import train_state  # noqa: E402

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def backbone(scale: int, query_attention: str) -> vlm.VLMConfig:
  llm = gemma.get_config("gemma_tiny", width=256 * scale, depth=8, mlp_dim=1024 * scale, num_heads=4,
                         num_kv_heads=4, head_dim=64 * scale, vocab_size=2048)
  img = siglip.get_config("tiny/16", width=192 * scale, depth=6, mlp_dim=768 * scale, num_heads=4,
                          image_size=64, head_dim_out=llm.width)
  return vlm.VLMConfig(img=img, llm=llm, num_queries=16, max_text_tokens=16,
                       query_attention=query_attention)


def make_batch(b: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  return {
      "observation": {"images": r.integers(0, 256, (b, 2, 64, 64, 3), dtype=np.uint8),
                      "image_mask": np.ones((b, 2), bool), "state": r.normal(size=(b, 8)).astype(np.float32),
                      "tokens": r.integers(0, 2048, (b, 16)).astype(np.int32),
                      "token_mask": np.ones((b, 16), bool)},
      "actions": r.normal(size=(b, 8, 7)).astype(np.float32), "action_mask": np.ones((b, 8), bool),
      "frame_id": np.arange(b, dtype=np.int32),
  }


def interleaved_median(fns: dict, iters: int) -> dict:
  """Median seconds per call of each fn, timed round-robin (one call of each per round).

  Each fn is called once first (compilation, warm-up). Interleaving spreads load from other
  processes on a shared machine evenly over the arms, so their ratios stay meaningful.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--scale", type=int, default=1)
  p.add_argument("--frozen-dtype", default="float32", choices=sorted(DTYPES))
  args = p.parse_args()

  batch = make_batch(args.batch)
  example = jax.tree_util.tree_map(lambda x: x[:1], batch)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
  schedule = optax.constant_schedule(1e-4)
  results = {}
  for mode in vlm.QUERY_ATTENTION:
    config = dict(vlm=backbone(args.scale, mode), num_cameras=2, state_dim=8, horizon=8,
                  action_dim=7, head=dict(width=128, num_heads=4, head_dim=32, mlp_dim=512,
                                          num_blocks=4),
                  memory=dict(size=1024, k=4), frozen_dtype=args.frozen_dtype)
    # Third arm (reference only): queries frozen too, so no gradient has to cross the backbone.
    arms = {"frozen": m2vla.get_config().trainable, "full": [(".*", True)],
            "head-only": [("vlm/.*", False), (".*", True)]}
    for name, rules in arms.items():
      # The rules go to the policy too: it stops gradients at what its config freezes, so a
      # 'full' arm built on the default config would not differentiate the backbone at all.
      policy = m2vla.M2VLA({**config, "trainable": rules})
      results[mode, name] = prepare(policy, tx, schedule, batch, example, rules, args)
  for kind in ("step", "sample"):
    medians = interleaved_median({arm: r.pop(kind) for arm, r in results.items()}, args.iters)
    for arm, seconds in medians.items():
      results[arm][kind] = seconds

  u = results["readout", "full"]
  print(f"M²-VLA frozen backbone vs full fine-tuning; batch {args.batch}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores, params {u['total'] / 1e6:.2f}M")
  print(f"{'queries':>13} {'arm':>9} {'trainable':>12} {'step ms':>10} {'sample ms':>10} "
        f"{'opt state MB':>13} {'step/full':>10}")
  for (mode, name), r in results.items():
    ratio = r["step"] / results[mode, "full"]["step"]
    print(f"{mode:>13} {name:>9} {r['trainable'] / 1e6:>11.3f}M {r['step'] * 1e3:>10.1f} "
          f"{r['sample'] * 1e3:>10.1f} {r['opt_bytes'] / 2**20:>13.2f} {ratio:>10.3f}")
  b, bu = results["bidirectional", "frozen"], results["bidirectional", "full"]
  f = results["readout", "frozen"]
  print(f"bidirectional queries: train-step time ratio frozen/full: {b['step'] / bu['step']:.3f}")
  print(f"sample_actions time ratio frozen/full: {f['sample'] / u['sample']:.3f}")
  print(f"optimizer-state bytes ratio frozen/full (goal <= 0.3): {f['opt_bytes'] / u['opt_bytes']:.3f}")
  print(f"train-step time ratio frozen/full, readout queries (goal <= 0.5): "
        f"{f['step'] / u['step']:.3f}")


def prepare(policy, tx, schedule, batch, example, rules, args) -> dict:
  """One arm: its step and sampling callables, optimizer bytes and parameter counts."""
  init = train_state.make_init_fn(policy, tx, example, rules, DTYPES[args.frozen_dtype], False)
  ts = jax.jit(init)(jax.random.PRNGKey(0))
  # A filled memory so that retrieval and memory attention do real work.
  ts = ts.replace(policy_state=jax.jit(policy.loss)(ts.params(), ts.policy_state, batch,
                                                    jax.random.PRNGKey(1))[1][1])
  step = jax.jit(train_state.make_train_step(policy, tx, schedule))
  holder = [ts]

  def run_step():
    holder[0], metrics = step(holder[0], batch)
    return metrics["loss"]

  sample = jax.jit(policy.sample_actions)
  params = ts.params()
  return dict(
      step=run_step,
      sample=lambda: sample(params, holder[0].policy_state, batch["observation"],
                            jax.random.PRNGKey(2)),
      opt_bytes=tree_bytes(ts.opt_state),
      trainable=sum(x.size for x in ts.trainable.values()),
      total=sum(x.size for x in ts.trainable.values()) + sum(x.size for x in ts.frozen.values()))


if __name__ == "__main__":
  main()

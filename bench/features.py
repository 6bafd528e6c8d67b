"""Frozen-feature cache: a training step from cached features against the same step computing the frozen
backbone, same config, same process; and how fast the cache is built.

The policy is M²-VLA on 'dinov2s_gemma3_270m' (DINOv2 ViT-S/14 at 112 px, 16 pooled tokens per camera,
projector, the 18-layer Gemma 3 270M) with the whole VLM frozen, in two settings:

  queries train   (the paper's) the cache holds the prefix ('prefix_visual', 'prefix_key',
                  'prefix_value'); a step still runs the queries' pass through all 18 frozen layers,
                  forward and backward
  queries frozen  (configs/sim_pretrained.py's default) the cache holds the VLM's outputs ('visual',
                  'query'); a step runs only the action head

For each: 'live' is the trainer's jitted train step (state donated, as the trainer does) on raw
observations (DINOv2, projector, Gemma
prefix and queries every step), 'cached' the same step reading the cache, 'build' the jitted
`policy.frozen_features` (cache frames per second). The action head has one block per LLM layer (18
here), so even a head-only step is not free; the ratio says how much of a step the cache removes. Random weights: a step's time does not depend on
their values, and nothing is read from a hub.

  python bench/features.py [--batch 16] [--steps 3] [--vlm dinov2s_gemma3_270m] [--queries 16]
Last line: cached / live step time with the queries frozen (goal <= 0.1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _time(fn, steps: int) -> float:
  """Best wall time of one call over `steps` calls (after a warm-up call that compiles)."""
  import jax
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--vlm", default="dinov2s_gemma3_270m")
  p.add_argument("--queries", type=int, default=16)
  p.add_argument("--text-tokens", type=int, default=16)
  args = p.parse_args()

  import jax
  import numpy as np
  import optax
  from m2vla_jax.models import vlm as vlm_lib
  from m2vla_jax.policies import m2vla
  from m2vla_jax.training import train_state as ts_lib

  b, t = args.batch, args.text_tokens
  rows = {}
  for setting, rules in (("queries train", [("vlm/queries", True), ("vlm/.*", False), (".*", True)]),
                         ("queries frozen", [("vlm/.*", False), (".*", True)])):
    policy = m2vla.M2VLA({"vlm": args.vlm, "vlm_overrides": {"num_queries": args.queries},
                          "num_cameras": 1, "state_dim": 8, "action_dim": 4, "horizon": 8,
                          "trainable": rules, "frozen_dtype": "float32", "memory": {"size": 1024}})
    cfg = policy.vlm_config
    rng = np.random.default_rng(0)
    h, w = vlm_lib.image_hw(cfg.img)
    obs = {"images": rng.integers(0, 256, (b, 1, h, w, 3)).astype(np.uint8),
           "image_mask": np.ones((b, 1), bool),
           "tokens": rng.integers(1, 1000, (b, t)).astype(np.int32),
           "token_mask": np.arange(t)[None] < rng.integers(6, t + 1, (b, 1)),
           "state": rng.normal(size=(b, 8)).astype(np.float32)}
    batch = {"observation": obs, "actions": rng.normal(size=(b, 8, 4)).astype(np.float32),
             "action_mask": np.ones((b, 8), bool), "frame_id": np.arange(b, dtype=np.int32)}
    tx = optax.adamw(1e-4)
    state = jax.jit(ts_lib.make_init_fn(policy, tx, batch, rules, None, False))(jax.random.PRNGKey(0))
    params = state.params()
    stage = policy.cache_stage(params)
    build = jax.jit(lambda p, o, stage=stage, policy=policy: policy.frozen_features(p, o, stage))
    t_build = _time(lambda: build(params, obs), args.steps)
    cached = jax.device_get(build(params, obs))
    cached_obs = {k: v for k, v in obs.items() if k != "images"}
    cached_obs["frozen_features"] = cached
    cached_batch = {**batch, "observation": cached_obs}
    # Donated like the trainer's step, so the frozen weights pass through without a copy.
    step = jax.jit(ts_lib.make_train_step(policy, tx, optax.constant_schedule(1e-4), 1, 0.0),
                   donate_argnums=0)
    carry = [state]

    def run(b):
      carry[0], metrics = step(carry[0], b)
      return metrics["loss"]
    t_live = _time(lambda: run(batch), args.steps)
    t_cached = _time(lambda: run(cached_batch), args.steps)
    size = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(cached)) / b
    rows[setting] = (stage, t_live, t_cached, t_build, size)

  print(f"frozen-feature cache, {args.vlm}: {cfg.tokens_per_camera} image tokens, {t} text tokens, "
        f"{args.queries} queries, batch {b}, {os.cpu_count()} CPU cores; best of {args.steps}")
  print(f"{'setting':<15} {'stage':<8} {'live s':>8} {'cached s':>9} {'ratio':>6} {'build f/s':>10} "
        f"{'MiB/frame':>10}")
  for setting, (stage, t_live, t_cached, t_build, size) in rows.items():
    print(f"{setting:<15} {stage:<8} {t_live:>8.3f} {t_cached:>9.3f} {t_cached / t_live:>6.3f} "
          f"{b / t_build:>10.1f} {size / 2**20:>10.2f}")
  _, t_live, t_cached, _, _ = rows["queries frozen"]
  print(f"cached / live train step, queries frozen: {t_cached / t_live:.3f}")


if __name__ == "__main__":
  main()

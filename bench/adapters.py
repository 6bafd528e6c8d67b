"""Adapting the backbone: train-step time and optimizer memory of LoRA, VLA-GSE, full fine-tuning and
frozen M²-VLA on the same backbone, batch and head, in one run, as ratios to full fine-tuning.

Every arm is a config of the same policy (`policies/m2vla.py`) and goes through the trainer's own
`train_state.make_init_fn` / `make_train_step` (AdamW, global-norm clipping) and its `prepare` hook
(GSE's spectral initialisation); only `trainable` and `adapter` differ:
  full     every parameter trains
  lora     LoRA rank r on the LLM's linear layers (q/kv/o, gate/up, down), alpha = r
  gse      VLA-GSE at the same total rank r (1 generalized + 7 specialized experts, top-2)
  m2       M²-VLA's frozen backbone (queries + head train)
The backbone is `--vlm` with random weights (default 'dinov2s_gemma3_270m': DINOv2 ViT-S/14 at 112 px +
Gemma 3 270M, the configs/sim_pretrained.py backbone; its sizes, not its weights, set the cost), frozen
weights in float32; the image tower runs in every arm (no feature cache), so the ratios compare what
the methods add on top of one full forward.

  python bench/adapters.py [--batch 2] [--iters 3] [--vlm dinov2s_gemma3_270m] [--rank 16]
Last line: LoRA's train-step time as a ratio to full fine-tuning's.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from m2vla_jax.core import dtypes  # noqa: E402
from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.models import vlm as vlm_lib  # noqa: E402
from m2vla_jax.policies import m2vla  # noqa: E402
from m2vla_jax.training import train_state  # noqa: E402
import policy as bench_policy  # noqa: E402  (bench/policy.py: interleaved timing, byte counts)


def make_batch(config: vlm_lib.VLMConfig, b: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  h, w = vlm_lib.image_hw(config.img)
  t = config.max_text_tokens
  return {"observation": {"images": r.integers(0, 256, (b, 1, h, w, 3), dtype=np.uint8),
                          "image_mask": np.ones((b, 1), bool), "state": r.normal(size=(b, 4)).astype(np.float32),
                          "tokens": r.integers(1, min(1000, config.llm.vocab_size), (b, t)).astype(np.int32),
                          "token_mask": np.arange(t)[None] < r.integers(4, t + 1, (b, 1))},
          "actions": r.normal(size=(b, 8, 4)).astype(np.float32), "action_mask": np.ones((b, 8), bool),
          "frame_id": np.arange(b, dtype=np.int32)}


def arms(args) -> dict:
  base = dict(vlm=args.vlm, vlm_overrides={"max_text_tokens": 12}, num_cameras=1, state_dim=4, horizon=8,
              action_dim=4, msm=False, frozen_dtype="float32",
              head=dict(width=128, num_heads=4, head_dim=32, mlp_dim=256,
                        num_blocks=min(6, vlm_lib.get_config(args.vlm).llm.depth)))
  adapter = dict(targets="llm/.*", rank=args.rank, alpha=float(args.rank), svd="randomized")
  return {
      "full": {**base, "trainable": [(".*", True)]},
      "lora": {**base, "adapter": {**adapter, "kind": "lora"}, "trainable": m2vla.adapter_trainable_rules()},
      "gse": {**base, "adapter": {**adapter, "kind": "gse"}, "trainable": m2vla.adapter_trainable_rules()},
      "m2": base,
  }


def prepare(config: dict, batch: dict) -> dict:
  policy = m2vla.M2VLA(config)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
  example = jax.tree_util.tree_map(lambda x: x[:1], batch)
  init = train_state.make_init_fn(policy, tx, example, policy.trainable_rules,
                                  dtypes.DTYPES[policy.frozen_dtype], False)
  ts = jax.jit(init)(jax.random.PRNGKey(0))
  params, _ = policy.prepare(ts.params(), ts.policy_state)   # GSE: spectral init, as the trainer does
  flat_trainable = {k: v for k, v in tree_util.flatten(params).items() if k in ts.trainable}
  flat_frozen = {k: v for k, v in tree_util.flatten(params).items() if k in ts.frozen}
  ts = ts.replace(trainable=flat_trainable, frozen=flat_frozen)
  step = jax.jit(train_state.make_train_step(policy, tx, optax.constant_schedule(1e-5)), donate_argnums=0)
  holder = [ts]

  def run_step():
    holder[0], metrics = step(holder[0], batch)
    return metrics["loss"]

  trainable = sum(int(x.size) for x in ts.trainable.values())
  total = trainable + sum(int(x.size) for x in ts.frozen.values())
  return dict(step=run_step, opt_bytes=bench_policy.tree_bytes(ts.opt_state), trainable=trainable,
              total=total)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--vlm", default="dinov2s_gemma3_270m")
  p.add_argument("--rank", type=int, default=16)
  args = p.parse_args()
  configs = arms(args)
  batch = make_batch(vlm_lib.get_config(args.vlm, max_text_tokens=12), args.batch)
  results = {name: prepare(cfg, batch) for name, cfg in configs.items()}
  medians = bench_policy.interleaved_median({k: r.pop("step") for k, r in results.items()}, args.iters)
  full = results["full"]
  print(f"Backbone adaptation, {args.vlm} (random weights, float32), batch {args.batch}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores, "
        f"{full['total'] / 1e6:.1f}M parameters")
  print(f"{'arm':>6} {'trainable':>12} {'% of all':>9} {'step s':>8} {'opt state MB':>13} {'step/full':>10} "
        f"{'opt/full':>9}")
  for name, r in results.items():
    print(f"{name:>6} {r['trainable'] / 1e6:>11.3f}M {100 * r['trainable'] / r['total']:>8.3f}% "
          f"{medians[name]:>8.3f} {r['opt_bytes'] / 2**20:>13.1f} {medians[name] / medians['full']:>10.3f} "
          f"{r['opt_bytes'] / full['opt_bytes']:>9.4f}")
  print(f"GSE train-step time / full fine-tuning: {medians['gse'] / medians['full']:.3f}")
  print(f"LoRA train-step time / full fine-tuning: {medians['lora'] / medians['full']:.3f}")


if __name__ == "__main__":
  main()

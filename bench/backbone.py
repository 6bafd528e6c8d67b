"""Backbone forward throughput: our jitted Gemma vs transformers' torch forward, same config and weights.

Both run the text decoder (embedding, every layer, final norm; no LM head, which the policy never uses)
on a batch of random token sequences with a causal mask. transformers gets random weights, which go
through our converter (weights/hf.py), and the outputs are compared, so both sides compute the same
function. Also reports our achieved FLOP/s against the machine's matmul peak, measured in the same run
with a large jnp matmul of the same dtype. Dense attention FLOPs (the full T x T score matrix, which is
what both implementations compute) are counted.

  python bench/backbone.py [--variant gemma3_270m] [--seq 128] [--batch 8] [--dtype float32]
                           [--unroll 1] [--attn einsum|dot_product_attention] [--iters 5]
Last line: the ratio ours / torch tokens/s (higher is better).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def hf_text_config(cfg):
  """transformers config equivalent to a GemmaConfig."""
  import transformers as tf
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps)
  if cfg.version == 1:
    return tf.GemmaConfig(**common)
  common.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                layer_types=["sliding_attention" if l else "full_attention" for l in cfg.layer_is_local()],
                final_logit_softcapping=cfg.final_logit_softcap,
                attn_logit_softcapping=cfg.attn_logit_softcap)
  if cfg.version == 2:
    return tf.Gemma2Config(**common)
  return tf.Gemma3TextConfig(**common, rope_parameters={
      "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local},
      "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global}})


def forward_flops(cfg, batch: int, seq: int) -> float:
  d, n, k, h, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_token = 2 * d * h * (n + 2 * k) + 2 * n * h * d + 2 * 3 * d * f + 2 * 2 * seq * n * h
  return float(cfg.depth * batch * seq * per_token)


def timed_interleaved(fns: dict, rounds: int) -> dict:
  """Best wall time per function; one call of each per round, after a warm-up call of each.

  Interleaving means a load change on a shared machine hits every contender alike; the best of the
  rounds estimates the uncontended time.
  """
  for fn in fns.values():
    fn()
  best = {k: float("inf") for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t)
  return best


def matmul_fn(dtype, n: int):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return lambda: mm(a, b).block_until_ready()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="gemma3_270m")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--unroll", type=int, default=1, help="layer-scan unroll factor")
  p.add_argument("--attn", default="einsum", choices=["einsum", "dot_product_attention"])
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--skip_torch", action="store_true")
  a = p.parse_args(argv)

  import torch
  import transformers as tf
  from m2vla_jax.models import gemma
  from m2vla_jax.weights import hf, merge

  cfg = gemma.get_config(a.variant, dtype=a.dtype, remat_policy="none", scan_unroll=a.unroll,
                          attn_impl=a.attn)
  b, t = a.batch, a.seq
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  torch.manual_seed(0)
  hf_cfg = hf_text_config(cfg)
  ref_cls = {1: tf.GemmaModel, 2: tf.Gemma2Model, 3: tf.Gemma3TextModel}[cfg.version]
  ref = ref_cls(hf_cfg).eval()
  with torch.no_grad():  # non-zero norm scales so every parameter matters
    for name, prm in ref.named_parameters():
      if "norm" in name:
        prm.normal_(0.0, 0.1)
  state = ref.state_dict()

  model = gemma.Gemma(cfg)
  positions = jnp.tile(jnp.arange(t, dtype=jnp.int32)[None], (b, 1))
  mask = gemma.causal_mask(jnp.ones((b, t), bool))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((b, t, cfg.width)), positions, mask)
  params = merge.merge_params(shapes["params"], hf.convert_state_dict(state, "gemma", config=cfg))
  params = jax.device_put(params)
  if a.dtype == "bfloat16":  # weights stored as the compute dtype, like torch below
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)

  @jax.jit
  def ours(p, tok):
    x = model.apply({"params": p}, tok, method=model.embed)
    return model.apply({"params": p}, x, positions, mask)

  tok_dev = jax.device_put(tokens)
  out = ours(params, tok_dev)
  on_cpu = jax.default_backend() == "cpu"
  n_mm = 2048 if on_cpu else 8192
  fns = {"ours": lambda: jax.block_until_ready(ours(params, tok_dev)),
         "peak": matmul_fn(jnp.dtype(a.dtype), n_mm)}

  torch_s = None
  torch.set_grad_enabled(False)
  if not a.skip_torch:
    torch_dtype = torch.float32 if a.dtype == "float32" else torch.bfloat16
    ref = ref.to(torch_dtype)
    ids = torch.from_numpy(tokens).long()
    theirs = ref(input_ids=ids).last_hidden_state.float().numpy()
    ours_final = np.asarray(out["final"], np.float32)
    err = np.linalg.norm(ours_final - theirs) / np.linalg.norm(theirs)
    fns["torch"] = lambda: ref(input_ids=ids)
  best = timed_interleaved(fns, a.iters)
  ours_s, torch_s = best["ours"], best.get("torch")
  peak = 2 * n_mm ** 3 / best["peak"]
  flops = forward_flops(cfg, b, t)
  dev = jax.devices()[0].device_kind
  print(f"{a.variant} forward, batch {b} x seq {t}, {a.dtype}, scan unroll {a.unroll}, attention {a.attn}, device: {dev}"
        f" ({jax.device_count()} visible), torch threads {torch.get_num_threads()}, "
        f"best of {a.iters} interleaved rounds")
  print(f"{'impl':<8} {'ms/forward':>11} {'tokens/s':>10} {'TFLOP/s':>8} {'% of peak':>9}")
  for name, sec in (("ours", ours_s), ("torch", torch_s)):
    if sec is None:
      continue
    print(f"{name:<8} {sec * 1e3:>11.1f} {b * t / sec:>10.0f} {flops / sec / 1e12:>8.3f} "
          f"{100 * flops / sec / peak:>8.1f}%")
  print(f"matmul peak ({jnp.dtype(a.dtype).name}, measured): {peak / 1e12:.3f} TFLOP/s; "
        f"forward = {flops / 1e9:.1f} GFLOP")
  if torch_s is not None:
    print(f"final hidden state agreement: relative error {err:.2e}")
    print(f"ours / torch tokens/s ratio: {torch_s / ours_s:.2f}")


if __name__ == "__main__":
  main()

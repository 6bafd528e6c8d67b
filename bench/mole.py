"""MoLe-VLA layer skipping: a Gemma 3 270M-sized LLM forward with half its layers skipped vs full depth.

Same run, same random float32 weights, one bidirectional prefix of 64 image + 16 text token embeddings
(80 tokens: two 32-token cameras and a short instruction, the size of our DINOv2 / SigLIP-tiny
backbones' prefixes). Variants, each jitted and timed interleaved (best of --repeats rounds):
  full depth               the plain `Gemma` scan over all L layers;
  kept layers              only the k = L - skip chosen layers run (`layer_skip.run_kept_layers`):
                           a route shared by the batch at batch 1; at batch 8 one route for all
                           samples (what grouping equal routes gains at best) and distinct per-sample
                           routes, by 'gather' (vmap: every scan step gathers each sample's layer,
                           batched matmuls) or 'loop' (one sample after another, batch-1 scans);
  router + kept layers     the STAR router choosing the routes, then the kept layers: the real
                           inference cost. 'router 1024' has the reference widths (1024 / 512 / 8
                           heads / 2048, sized for a 4096-wide LLM: at batch 1 its ~35 MB of weights
                           cost about 1.5 Gemma 3 270M layers, since a CPU forward at batch 1 is bound
                           by reading weights); 'router 256' is scaled to this LLM (256 / 128 / 4 / 512);
  union                    batch 8: every layer that some sample keeps, batched and masked; a layer
                           nobody keeps is skipped by `lax.cond` (`layer_skip.run_union_layers`, the
                           'auto' default above batch 1): one route for all runs k layers, the
                           distinct random routes here cover (nearly) all L;
  masked                   every layer computed and masked (the public code's formulation).
GFLOP are XLA's own count (`compiled.cost_analysis()`), from separately compiled copies with the layer
scans fully unrolled (XLA counts a while loop's body once); for 'loop' the per-sample `lax.map` is a
loop too, so b - 1 more samples' layers are added; 'union' counts both branches of its cond, so its
rows show the layers it runs as a share of full depth's count. The timed programs keep the default scan.
Before the last line, each batch's largest difference between the skipping programs and the masked
full-depth one on the same routes: a fast path that computed something else would show there.

  python bench/mole.py [--skip 9] [--image_tokens 64] [--text_tokens 16] [--repeats 5] [--dtype bfloat16]
Last line: batch-1 speed-ups over full depth; the last number is router 256 + kept layers (higher is
better).
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m2vla_jax.models import gemma  # noqa: E402
from m2vla_jax.models import layer_skip  # noqa: E402
from backbone import timed_interleaved  # noqa: E402  (bench/backbone.py)


def random_params(shapes, seed: int):
  """Normal weights scaled by 1/sqrt(fan-in) so activations stay O(1) through 18 layers (no denormals
  or overflow to distort timings); the embedding table is never built (inputs are embeddings)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # RMSNorm: (1 + scale)
      return jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32)
    fan_in = s.shape[-2] if len(s.shape) > 1 else s.shape[-1]
    if "attn_vec_einsum" in name:
      fan_in = s.shape[-3] * s.shape[-2]
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="gemma3_270m")
  p.add_argument("--skip", type=int, default=None, help="layers skipped (default: half)")
  p.add_argument("--image_tokens", type=int, default=64)
  p.add_argument("--text_tokens", type=int, default=16)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (weights stay float32); bfloat16 is how a GPU would serve")
  a = p.parse_args(argv)

  def build(unroll):
    cfg = gemma.get_config(a.variant, dtype=a.dtype, remat_policy="none", scan_unroll=unroll)
    return cfg, gemma.Gemma(cfg)

  cfg, model = build(1)
  num_layers = cfg.depth
  skip = num_layers // 2 if a.skip is None else a.skip
  k = layer_skip.RouterConfig(num_skip=skip).kept(num_layers)
  routers = {"router 1024": layer_skip.STARRouter(layer_skip.RouterConfig(num_skip=skip), num_layers),
             "router 256": layer_skip.STARRouter(layer_skip.RouterConfig(
                 num_skip=skip, width=256, mlp_dim=128, num_heads=4, ff_dim=512), num_layers)}
  n_img, n_txt = a.image_tokens, a.text_tokens
  s = n_img + n_txt
  batches = [int(b) for b in a.batches.split(",")]
  b_max = max(batches)

  rng = np.random.default_rng(0)
  x_all = jnp.asarray(rng.standard_normal((b_max, s, cfg.width)), jnp.float32)
  valid = jnp.ones((b_max, s), bool)
  positions_all = jnp.tile(jnp.arange(s, dtype=jnp.int32)[None], (b_max, 1))
  mask_all = gemma.prefix_lm_mask(valid, valid)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_all[:1], positions_all[:1], mask_all[:1])
  params = {"params": {k_: v for k_, v in random_params(shapes, 1)["params"].items() if k_ != "embedder"}}
  img_mask, txt_mask = jnp.ones((b_max, n_img), bool), jnp.ones((b_max, n_txt), bool)
  router_params = {name: jax.jit(r.init)(jax.random.PRNGKey(2), x_all[:1, :n_img], img_mask[:1],
                                          x_all[:1, n_img:], txt_mask[:1]) for name, r in routers.items()}
  # Fixed distinct per-sample routes for the LLM-only rows (what a trained router might pick).
  route_rng = np.random.default_rng(3)
  ids_all = jnp.asarray(np.sort(np.stack([route_rng.permutation(num_layers)[:k] for _ in range(b_max)]),
                                axis=1), jnp.int32)
  gates_all = jnp.zeros((b_max, num_layers)).at[jnp.arange(b_max)[:, None], ids_all].set(1.0)

  def programs(mdl, b):
    """name -> (function of (llm params, router params, x), is 'loop')."""
    pos, msk = positions_all[:b], mask_all[:b]
    ids, gates = (ids_all[0], gates_all[:b]) if b == 1 else (ids_all[:b], gates_all[:b])

    def routed(impl, router=None, shared=False):
      def f(p, rp, x):
        r = {"ids": ids, "gates": gates}
        if shared:  # every sample on sample 0's route: the best case of grouping equal routes
          r = {"ids": ids_all[0], "gates": jnp.tile(gates_all[:1], (b, 1))}
        if router is not None:
          logits = routers[router].apply(rp[router], x[:, :n_img], img_mask[:b], x[:, n_img:],
                                         txt_mask[:b])
          r = layer_skip.route_from_logits(logits, skip)
          if b == 1:  # one sample: its route is shared by the (size-1) batch
            r = {"ids": r["ids"][0], "gates": r["gates"]}
        return mdl.apply(p, x, pos, msk, route=r, skip_impl=impl)["final"]
      return f

    out = {"full depth": lambda p, rp, x: mdl.apply(p, x, pos, msk)["final"]}
    if b == 1:
      out["kept layers"] = routed("gather")
      for name in routers:
        out[f"{name} + kept layers"] = routed("gather", name)
    else:
      out["kept layers, one route for all"] = routed("gather", shared=True)
      for impl in ("gather", "loop"):
        out[f"kept layers, per-sample {impl}"] = routed(impl)
      for name in routers:
        for impl in ("gather", "loop"):
          out[f"{name} + kept ({impl})"] = routed(impl, name)
      out["union, one route for all"] = routed("union", shared=True)
      out["union, per-sample routes"] = routed("union")
    out["masked (public code)"] = routed("masked")
    return out

  def flops(fn, b):
    c = jax.jit(fn).lower(params, router_params, x_all[:b]).compile().cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c["flops"])

  _, unrolled = build(num_layers)
  # Each batch's rows print as soon as they are measured (flushed): a run stopped by a time limit
  # (large batches compile many programs) keeps what it finished.
  dev = jax.devices()[0]
  print(f"{a.variant} ({num_layers} layers, width {cfg.width}) forward, {a.dtype}, prefix {n_img} image + "
        f"{n_txt} text tokens, {skip} of {num_layers} layers skipped (k = {k}); device {dev.device_kind}"
        f" ({dev.platform}), best of {a.repeats} interleaved rounds")
  print(f"{'variant':<34} {'batch':>5} {'ms':>9} {'speed-up':>9} {'GFLOP':>8} {'FLOP ratio':>10}",
        flush=True)
  rows, agreement = [], []
  for b in batches:
    timed = programs(model, b)
    counted = programs(unrolled, b)
    x = x_all[:b]
    jitted = {name: jax.jit(fn) for name, fn in timed.items()}
    fns = {name: (lambda f=f: jax.block_until_ready(f(params, router_params, x))) for name, f in jitted.items()}
    best = timed_interleaved(fns, a.repeats)
    # The skipping programs must compute what the masked full-depth one does on the same routes.
    ref = np.asarray(jitted["masked (public code)"](params, router_params, x), np.float64)
    same_route = ["kept layers"] if b == 1 else ["kept layers, per-sample gather",
                                                 "kept layers, per-sample loop", "union, per-sample routes"]
    agreement.append((b, max(float(np.max(np.abs(np.asarray(jitted[n](params, router_params, x),
                                                              np.float64) - ref)))
                             for n in same_route), float(np.max(np.abs(ref)))))
    counts = {name: flops(fn, b) for name, fn in counted.items()}
    # The 'loop' programs' per-sample lax.map is a while loop counted once: add the other b - 1 samples
    # (one sample's k layers = the LLM-only loop program's count).
    per_sample = counts.get("kept layers, per-sample loop", 0.0)
    # XLA counts both branches of the 'union' programs' lax.cond: count the layers they run instead,
    # as that share of full depth (the layer stack is all of an LLM-only program's work).
    union = {"union, one route for all": k,
             "union, per-sample routes": int(np.any(np.asarray(gates_all[:b]) > 0, axis=0).sum())}
    batch_rows = []
    for name in timed:
      if name in union:
        counts[name] = counts["full depth"] * union[name] / num_layers
      batch_rows.append((name, b, best[name],
                         counts[name] + ((b - 1) * per_sample if "loop" in name else 0)))
    _, _, base_sec, base_fl = batch_rows[0]   # full depth
    for name, _, sec, fl in batch_rows:
      print(f"{name:<34} {b:>5} {sec * 1e3:>9.1f} {base_sec / sec:>9.2f} {fl / 1e9:>8.2f} "
            f"{base_fl / fl:>10.2f}", flush=True)
    rows += batch_rows

  for b, diff, scale in agreement:
    print(f"batch {b}: skipping programs vs masked full depth on the same routes, max |diff| {diff:.2e}"
          f" (outputs up to {scale:.1f})")
  if 1 in batches:
    b1 = {r[0]: r[2] for r in rows if r[1] == 1}
    up = lambda name: b1["full depth"] / b1[name]
    print(f"batch-1 speed-up over full depth, {k} of {num_layers} layers: kept layers only "
          f"{up('kept layers'):.2f}, router 1024 + kept {up('router 1024 + kept layers'):.2f}, "
          f"router 256 + kept {up('router 256 + kept layers'):.2f}")


if __name__ == "__main__":
  main()

"""Gemma 1 / 2 / 3 decoder (linen) in the big_vision `ppp/gemma.py` parameter layout.

Owns the language half of the frozen backbone: token embedding, the scanned stack of decoder blocks and
the tied-embedding read-out. Unlike a plain language model it returns the hidden state after EVERY layer
(`hidden [L, B, T, D]`), because the action head reads one VLM layer per head block (Mixture-of-Layers).

Versions differ only through `GemmaConfig` fields, so one block serves all three:
  * Gemma 1: pre-norm blocks, MQA, RoPE base 10k, logits scaled by head_dim**-0.5.
  * Gemma 2: + post-attention / post-ffw norms, tanh soft-capping of attention logits (50) and of the
    final logits (30), local (sliding window) / global layers alternating, query_pre_attn_scalar.
  * Gemma 3: + RMS-norm of queries and keys (`_query_norm`, `_key_norm`), no soft-capping, 5 local : 1
    global layers, RoPE base 10k on local and 1M on global layers (optionally linearly scaled).

Sliding windows are symmetric over positions (|pos_q - pos_k| < window, as the original gemma library's
`_create_sliding_mask`), combined with whatever `attn_mask` allows. With a causal mask this equals
transformers' window; inside a bidirectional prefix transformers lets the prefix override the window,
which only differs for prefixes longer than the window (never the case for PaliGemma-sized prefixes).

Local vs global and the RoPE base are per-layer *scanned inputs*, so all layers keep one stacked set of
parameters under `layers/` (leading axis = layer) regardless of the pattern.

Parameter tree (leading L axis on everything under layers/):
  embedder/input_embedding [V, D]
  layers/pre_attention_norm/scale [L, D]
  layers/attn/q_einsum/w [L, N, D, H] and layers/attn/kv_einsum/w [L, 2, K, D, H]   (N != K)
  layers/attn/qkv_einsum/w [L, 3, N, D, H]                                          (N == K)
  layers/attn/attn_vec_einsum/w [L, N, H, D]
  layers/attn/_query_norm/scale, layers/attn/_key_norm/scale [L, H]                 (Gemma 3)
  layers/post_attention_norm/scale, layers/post_ffw_norm/scale [L, D]               (Gemma 2, 3)
  layers/pre_ffw_norm/scale [L, D]
  layers/mlp/gating_einsum [L, 2, D, F], layers/mlp/linear [L, F, D]
  final_norm/scale [D]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import layer_skip

# Masked attention logits; finite so that fully masked rows (padding queries) give a uniform softmax
# instead of NaN. Same constant as the reference gemma implementation.
_BIG_NEG = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Hyper-parameters of one Gemma decoder; `get_config` holds the published ones.

  Attributes:
    variant: name this config was built from (informational).
    version: 1, 2 or 3 (selects post-norms / QK-norm defaults in `get_config`; the module itself reads
      only the explicit fields below).
    width: model width D.
    depth: number of decoder layers L.
    mlp_dim: hidden width F of the gated MLP.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0).
    head_dim: H.
    vocab_size: V.
    norm_eps: RMSNorm epsilon.
    query_pre_attn_scalar: attention logits are scaled by this**-0.5 (None: head_dim).
    attn_logit_softcap: tanh soft-cap of attention logits (None: off).
    final_logit_softcap: tanh soft-cap of output logits (None: off).
    sliding_window: window of local layers; a query attends to keys with |pos_q - pos_k| < window.
    global_every: layer i (0-based) is global iff (i + 1) % global_every == 0; None: all global.
    rope_base_local, rope_base_global: RoPE max wavelength on local / global layers.
    rope_scale_global: linear RoPE scaling factor on global layers (positions divided by it).
    post_norms: Gemma 2/3 post-attention and post-ffw RMSNorms.
    qk_norm: Gemma 3 RMSNorm of queries and keys.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    remat_policy: 'none' (no rematerialisation) or a `jax.checkpoint_policies` name.
    scan_unroll: unroll factor of the layer scan (a speed knob).
    attn_impl: 'einsum' (explicit logits, float32 softmax, supports soft-capping) or
      'dot_product_attention' (`jax.nn.dot_product_attention`, which may pick a fused cuDNN kernel on
      GPU; no soft-capping).
  """
  variant: str
  version: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  norm_eps: float = 1e-6
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  global_every: int | None = None
  rope_base_local: float = 10_000.0
  rope_base_global: float = 10_000.0
  rope_scale_global: float = 1.0
  post_norms: bool = False
  qk_norm: bool = False
  dtype: str = "float32"
  remat_policy: str = "nothing_saveable"
  scan_unroll: int = 1
  attn_impl: str = "einsum"

  def __post_init__(self):
    if self.attn_impl not in ("einsum", "dot_product_attention"):
      raise ValueError(f"GemmaConfig.attn_impl={self.attn_impl!r}; use 'einsum' or 'dot_product_attention'")
    if self.attn_impl != "einsum" and self.attn_logit_softcap is not None:
      raise ValueError("GemmaConfig.attn_impl='dot_product_attention' cannot soft-cap attention logits "
                       "(attn_logit_softcap is set, e.g. Gemma 2); use attn_impl='einsum'")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.global_every is not None and self.sliding_window is None:
      raise ValueError("GemmaConfig.global_every is set but sliding_window is None; set both or neither")
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"GemmaConfig.remat_policy={self.remat_policy!r} is neither 'none' nor a name in "
                       f"jax.checkpoint_policies")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"GemmaConfig.dtype={self.dtype!r}; use 'float32' or 'bfloat16'")

  def layer_is_local(self) -> np.ndarray:
    """bool [L]: True for sliding-window (local) layers."""
    if self.global_every is None:
      return np.zeros((self.depth,), bool)
    return np.array([(i + 1) % self.global_every != 0 for i in range(self.depth)])

  def layer_rope(self) -> tuple[np.ndarray, np.ndarray]:
    """(base [L], position scale [L]) of each layer's RoPE."""
    local = self.layer_is_local()
    base = np.where(local, self.rope_base_local, self.rope_base_global).astype(np.float32)
    scale = np.where(local, 1.0, self.rope_scale_global).astype(np.float32)
    return base, scale


_VARIANTS: dict[str, dict[str, Any]] = {
    # Gemma 1 2B as used by PaliGemma (vocab extended by 1024 <loc> + 128 <seg> tokens).
    "gemma_2b": dict(version=1, width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1,
                     head_dim=256, vocab_size=257_152),
    # Gemma 2 2B as used by PaliGemma 2 (same extended vocab).
    "gemma2_2b": dict(version=2, width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4,
                      head_dim=256, vocab_size=257_152, query_pre_attn_scalar=256,
                      attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
                      global_every=2, post_norms=True),
    # google/gemma-3-270m config.json.
    "gemma3_270m": dict(version=3, width=640, depth=18, mlp_dim=2048, num_heads=4, num_kv_heads=1,
                        head_dim=256, vocab_size=262_144, query_pre_attn_scalar=256, sliding_window=512,
                        global_every=6, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
                        post_norms=True, qk_norm=True),
    # google/gemma-3-4b text tower (linear RoPE scaling 8 on global layers).
    "gemma3_4b": dict(version=3, width=2560, depth=34, mlp_dim=10_240, num_heads=8, num_kv_heads=4,
                      head_dim=256, vocab_size=262_208, query_pre_attn_scalar=256, sliding_window=1024,
                      global_every=6, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
                      rope_scale_global=8.0, post_norms=True, qk_norm=True),
    # Tiny variants for tests: N == K exercises the fused qkv_einsum path; the Gemma 2/3 ones have short
    # windows so that local and global layers differ at test sequence lengths.
    "gemma_tiny": dict(version=1, width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=2,
                       head_dim=16, vocab_size=128),
    # Twice gemma_tiny's width, for simulation suites trained from scratch (configs/mjx.py).
    "gemma_mini": dict(version=1, width=64, depth=2, mlp_dim=256, num_heads=4, num_kv_heads=4,
                       head_dim=16, vocab_size=128),
    "gemma2_tiny": dict(version=2, width=32, depth=4, mlp_dim=64, num_heads=4, num_kv_heads=2,
                        head_dim=8, vocab_size=128, query_pre_attn_scalar=12, attn_logit_softcap=50.0,
                        final_logit_softcap=30.0, sliding_window=4, global_every=2, post_norms=True),
    "gemma3_tiny": dict(version=3, width=32, depth=6, mlp_dim=64, num_heads=4, num_kv_heads=1,
                        head_dim=16, vocab_size=128, query_pre_attn_scalar=16, sliding_window=4,
                        global_every=3, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
                        post_norms=True, qk_norm=True),
}


def get_config(variant: str, **overrides) -> GemmaConfig:
  """Config of a named variant (see `_VARIANTS`), with field overrides (e.g. dtype='bfloat16')."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown Gemma variant {variant!r}; known: {sorted(_VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(GemmaConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown GemmaConfig field(s) {bad}; fields are {sorted(fields)}")
  return GemmaConfig(variant=variant, **{**_VARIANTS[variant], **overrides})


def causal_mask(input_mask: jax.Array) -> jax.Array:
  """[B, T] bool valid-token mask -> [B, T, T] bool: query t sees valid keys s <= t."""
  input_mask = jnp.asarray(input_mask, bool)
  t = input_mask.shape[-1]
  tri = jnp.tril(jnp.ones((t, t), bool))
  return tri[None] & input_mask[:, None, :] & input_mask[:, :, None]


def prefix_lm_mask(input_mask: jax.Array, prefix_mask: jax.Array) -> jax.Array:
  """Prefix-LM mask [B, T, T] bool (big_vision `make_attn_mask`).

  Prefix tokens (prefix_mask True) attend bidirectionally to every valid prefix token; the rest attend
  causally. Invalid (padding) tokens are never attended to and attend to nothing.

  Args:
    input_mask: [B, T] bool, True for real tokens.
    prefix_mask: [B, T] bool, True for tokens of the bidirectional prefix.
  """
  input_mask = jnp.asarray(input_mask, bool)
  prefix_mask = jnp.asarray(prefix_mask, bool)
  # A token's "block" id: all prefix tokens share block 0; each suffix token opens its own block.
  blocks = jnp.cumsum(~prefix_mask, axis=-1)
  allowed = blocks[:, None, :] <= blocks[:, :, None]
  return allowed & input_mask[:, None, :] & input_mask[:, :, None]


def _trunc_normal(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=())


def apply_rope(x: jax.Array, positions: jax.Array, base: jax.Array, scale: jax.Array) -> jax.Array:
  """Rotary embedding of x [B, T, N, H] at positions [B, T] (half-split convention, as Gemma).

  `base` and `scale` are (traced) scalars so that they can differ per scanned layer.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  radians = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
  radians = radians[..., None, :]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, multiplying by (1 + scale); returns the input dtype."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    normed = xf * jax.lax.rsqrt(var + self.eps)
    return (normed * (1.0 + scale)).astype(x.dtype)


class Einsum(nn.Module):
  """A named weight `w` applied with an einsum equation."""
  shape: tuple[int, ...]
  w_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param("w", self.w_init, self.shape, jnp.float32)
    return jnp.einsum(eqn, x, w.astype(self.dtype))


class Attention(nn.Module):
  """Grouped-query attention with per-layer RoPE base, optional sliding window, soft-cap and QK-norm."""
  config: GemmaConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, is_local, rope_base, rope_scale, ctx_kv=None,
               context=None):
    """Attention of x's tokens over [context tokens (if any); x's own tokens].

    Args:
      x: [B, T, D]; positions [B, T]; attn_mask [B, T, T] among x's tokens.
      ctx_kv: optional (key, value) [B, P, K, H] of context tokens computed by an earlier call of
        this layer (RoPE and QK-norm already applied), attended to but not recomputed.
      context: (ctx_positions [B, P], ctx_mask [B, T, P]) with ctx_kv.
    Returns:
      ([B, T, D], (key, value) [B, T, K, H] of x's own tokens, for a later call's ctx_kv).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    if n == k:
      qkv = Einsum((3, n, d, h), _trunc_normal((2,), (0, 1, 3)), dtype, name="qkv_einsum")
      q, key, value = qkv("BTD,CNDH->CBTNH", x)
    else:
      q = Einsum((n, d, h), _trunc_normal((1,), (0, 2)), dtype, name="q_einsum")("BTD,NDH->BTNH", x)
      kv = Einsum((2, k, d, h), _trunc_normal((2,), (0, 1, 3)), dtype, name="kv_einsum")
      key, value = kv("BSD,CKDH->CBSKH", x)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, name="_query_norm")(q)
      key = RMSNorm(cfg.norm_eps, name="_key_norm")(key)
    q = apply_rope(q, positions, rope_base, rope_scale)
    key = apply_rope(key, positions, rope_base, rope_scale)
    q = q * jnp.asarray((cfg.query_pre_attn_scalar or h) ** -0.5, dtype)
    own_kv = (key, value)

    b, t = q.shape[:2]
    mask, key_positions = attn_mask, positions
    if ctx_kv is not None:
      ctx_positions, ctx_mask = context
      key = jnp.concatenate([ctx_kv[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([ctx_kv[1].astype(value.dtype), value], axis=1)
      key_positions = jnp.concatenate([ctx_positions, positions], axis=1)
      mask = jnp.concatenate([ctx_mask, attn_mask], axis=-1)
    if cfg.sliding_window is not None:
      # Window over positions (not array indices) so that padding inside the sequence does not eat it.
      dist = jnp.abs(positions[:, :, None] - key_positions[:, None, :])
      mask = mask & ((dist < cfg.sliding_window) | ~is_local)
    if cfg.attn_impl == "dot_product_attention":
      encoded = jax.nn.dot_product_attention(q, key, value, mask=mask[:, None], scale=1.0)
    else:
      q = q.reshape(b, t, k, n // k, h)
      logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key).astype(jnp.float32)
      if cfg.attn_logit_softcap is not None:
        logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
      logits = jnp.where(mask[:, None, None], logits, _BIG_NEG)
      probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
      encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
    out = Einsum((n, h, d), _trunc_normal((0, 1), (2,)), dtype, name="attn_vec_einsum")
    return out("BTNH,NHD->BTD", encoded), own_kv


class FeedForward(nn.Module):
  """Gated GELU (tanh approximation) MLP."""
  config: GemmaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    w_gating = self.param("gating_einsum", _trunc_normal((1,), (0, 2)), (2, cfg.width, cfg.mlp_dim),
                          jnp.float32).astype(dtype)
    w_linear = self.param("linear", _trunc_normal((0,), (1,)), (cfg.mlp_dim, cfg.width),
                          jnp.float32).astype(dtype)
    gate = nn.gelu(jnp.dot(x, w_gating[0]), approximate=True)
    return jnp.dot(gate * jnp.dot(x, w_gating[1]), w_linear)


class Block(nn.Module):
  """One decoder layer; a scan body: (carry x, per-layer inputs) -> (x, (x, own key/value)).

  The per-layer inputs carry this layer's context key/value (or None); unused key/value outputs
  are dropped by the scan's dead-code elimination under jit.
  """
  config: GemmaConfig

  @nn.compact
  def __call__(self, x, layer_in, positions, attn_mask, context):
    cfg = self.config
    is_local, rope_base, rope_scale, ctx_kv = layer_in
    y = RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x)
    y, own_kv = Attention(cfg, name="attn")(y, positions, attn_mask, is_local, rope_base, rope_scale,
                                            ctx_kv, context)
    if cfg.post_norms:
      y = RMSNorm(cfg.norm_eps, name="post_attention_norm")(y)
    x = x + y
    y = RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x)
    y = FeedForward(cfg, name="mlp")(y)
    if cfg.post_norms:
      y = RMSNorm(cfg.norm_eps, name="post_ffw_norm")(y)
    x = x + y
    return x, (x, own_kv)


class _At(nn.Module):
  """A `Block` at module path `names` (nested pass-through scopes), so that applying it on its own to
  one layer's parameters looks, to a method interceptor, like the scanned layers of the full model."""
  config: GemmaConfig
  names: tuple[str, ...]

  @nn.compact
  def __call__(self, *args):
    head, *rest = self.names
    if rest:
      return _At(self.config, tuple(rest), name=head)(*args)
    return Block(self.config, name=head)(*args)

  def nest(self, params):
    """One layer's parameters -> the variables tree of this module."""
    for name in reversed(self.names):
      params = {name: params}
    return params


class Embedder(nn.Module):
  """The token embedding table `input_embedding [V, D]`, shared by input and output (tied)."""
  vocab_size: int
  width: int

  @nn.compact
  def table(self) -> jax.Array:
    return self.param("input_embedding", nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=1, out_axis=0), (self.vocab_size, self.width), jnp.float32)


class Gemma(nn.Module):
  """Gemma decoder returning every layer's hidden state.

  Methods:
    embed(tokens [B, T] int) -> [B, T, D] in the compute dtype, scaled by sqrt(D).
    __call__(x [B, T, D], positions [B, T] int, attn_mask [B, T, T] bool, context=None) ->
        {'hidden': [L, B, T, D] after each layer (before the final norm), 'final': [B, T, D] normed,
         'key', 'value': [L, B, T, K, H] every layer's keys (RoPE applied) and values}.
      `context` lets x's tokens also attend to P tokens run through the decoder before, without
      recomputing them (a KV cache, one entry per layer): {'key', 'value': [L, B, P, K, H] from that
      earlier call, 'positions': [B, P], 'mask': [B, T, P] bool (which context token each of x's
      tokens may see)}. Context tokens never see x's tokens, and no gradient flows through them
      unless their own inputs need one.
      `route` ({'ids': [k] or [B, k] int ascending, 'gates': [B, L]}, from `layer_skip`) runs only
      the kept layers (MoLe-VLA layer skipping; `skip_impl` 'gather' / 'loop' say how per-sample
      routes run, see `layer_skip.run_kept_layers`): 'hidden', 'key', 'value' then have k layers, a
      kept layer's output is multiplied by its gate, and a context must be the k-layer key/value of
      an earlier call with the same route. skip_impl='masked' computes every layer and masks
      (`layer_skip.run_masked_layers`; L layers out, 'ids' unused), 'union' the same without the
      layers no sample keeps (`layer_skip.run_union_layers`). 'final' is after the last layer
      that ran either way. Each layer runs at its usual module path (adapters apply) with a 'dropout'
      rng per layer and sample when one is given; values sown inside the layers are refused.
    logits(final [B, T, D]) -> [B, T, V] float32 (tied embedding, final soft-cap if configured).
  """
  config: GemmaConfig

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.width)
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    self.layers = nn.scan(
        block,
        # Per-layer dropout rngs and sown values (models/adapters.py: adapter dropout, GSE aux loss).
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.depth,
        unroll=cfg.scan_unroll,
    )(cfg)
    self.final_norm = RMSNorm(cfg.norm_eps)

  def embed(self, tokens: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.config.dtype)
    x = self.embedder.table()[(tokens,)].astype(dtype)  # gather first: never cast the whole table
    # Scale in the compute dtype, as the references do (sqrt(D) rounded to bf16 in bf16 runs).
    return x * jnp.sqrt(jnp.float32(self.config.width)).astype(dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, attn_mask: jax.Array,
               context: dict[str, jax.Array] | None = None, route: dict[str, jax.Array] | None = None,
               skip_impl: str = "gather") -> dict[str, jax.Array]:
    cfg = self.config
    n_run = cfg.depth
    if route is not None:
      skip_impl = layer_skip.resolve_impl(skip_impl, x.shape[0])
      n_run = self._check_route(route, skip_impl, x.shape[0])
    b, t, d = x.shape
    if d != cfg.width:
      raise ValueError(f"Gemma input x has width {d}, config.width is {cfg.width}")
    if positions.shape != (b, t):
      raise ValueError(f"Gemma positions has shape {positions.shape}, expected {(b, t)}")
    if attn_mask.shape != (b, t, t):
      raise ValueError(f"Gemma attn_mask has shape {attn_mask.shape}, expected {(b, t, t)}")
    ctx_kv, ctx = None, None
    if context is not None:
      p = context["positions"].shape[1]
      kv_shape = (n_run, b, p, cfg.num_kv_heads, cfg.head_dim)
      if context["key"].shape != kv_shape or context["value"].shape != kv_shape:
        raise ValueError(f"Gemma context key/value have shapes {context['key'].shape} / "
                         f"{context['value'].shape}, expected {kv_shape} (the 'key'/'value' that an "
                         f"earlier call on the context tokens returned, with the same route)")
      if context["mask"].shape != (b, t, p):
        raise ValueError(f"Gemma context mask has shape {context['mask'].shape}, expected {(b, t, p)}")
      ctx_kv = (context["key"], context["value"])
      ctx = (context["positions"].astype(jnp.int32), context["mask"].astype(bool))
    is_local = jnp.asarray(cfg.layer_is_local())
    base, scale = (jnp.asarray(a) for a in cfg.layer_rope())
    if self.is_initializing():
      self.embedder.table()  # so that init(x, positions, mask) also creates the (tied) embedding
    x = x.astype(cfg.dtype)
    positions, attn_mask = positions.astype(jnp.int32), attn_mask.astype(bool)
    if route is None:
      x, (hidden, (key, value)) = self.layers(x, (is_local, base, scale, ctx_kv), positions,
                                              attn_mask, ctx)
    else:
      if self.is_initializing():  # create the stacked parameters that the routed scan gathers from
        self.layers(x, (is_local, base, scale, None), positions, attn_mask, None)
      x, hidden, key, value = self._routed(x, positions, attn_mask, ctx_kv, ctx, route, skip_impl)
    return {"hidden": hidden, "final": self.final_norm(x), "key": key, "value": value}

  def _routed(self, x, positions, attn_mask, ctx_kv, ctx, route, skip_impl):
    """The layers a route keeps (`layer_skip`), each one `Block` applied to its slice of the stacked
    parameters at this scan's module path (so method interceptors, e.g. models/adapters.py, see the
    usual 'llm/layers/...' paths), with a per-layer, per-sample 'dropout' rng when one is given."""
    cfg = self.config
    is_local = jnp.asarray(cfg.layer_is_local())
    base, scale = (jnp.asarray(a) for a in cfg.layer_rope())
    block = _At(cfg, (*self.path, "layers"), parent=None)
    dropout = self.make_rng("dropout") if self.has_rng("dropout") else None

    def layer_fn(layer, step_kv, h, batch):
      params, (i, loc, rope_base, rope_scale) = layer
      pos, mask, context_, sample = batch
      rngs = {}
      if dropout is not None:
        rngs["dropout"] = jax.random.fold_in(jax.random.fold_in(dropout, i), sample[0])
      (h, (_, kv)), sown = block.apply({"params": block.nest(params)}, h,
                                       (loc, rope_base, rope_scale, step_kv), pos, mask, context_,
                                       rngs=rngs, mutable=["intermediates"])
      if jax.tree_util.tree_leaves(sown):
        raise ValueError("Gemma route: the decoder layers sow values (e.g. the GSE adapters' aux loss, "
                         "models/adapters.py), which layer skipping does not collect; run without a "
                         "route (VLMConfig.router=None) or without sowing adapters")
      return h, kv

    layers = (self.variables["params"]["layers"],
              (jnp.arange(cfg.depth, dtype=jnp.int32), is_local, base, scale))
    batch = (positions, attn_mask, ctx, jnp.arange(x.shape[0], dtype=jnp.int32))
    common = dict(remat_policy=cfg.remat_policy, unroll=cfg.scan_unroll)
    if skip_impl in layer_skip.ALL_SLOT_IMPLS:
      run = layer_skip.run_masked_layers if skip_impl == "masked" else layer_skip.run_union_layers
      x, hidden, (key, value) = run(layer_fn, layers, x, route["gates"], batch, ctx_kv, **common)
    else:
      x, hidden, (key, value) = layer_skip.run_kept_layers(
          layer_fn, layers, x, route["ids"], route["gates"], batch, ctx_kv, per_sample=skip_impl,
          **common)
    return x, hidden, key, value

  def _check_route(self, route, skip_impl: str, b: int) -> int:
    """Validates a route; returns how many layers it runs."""
    cfg = self.config
    if skip_impl not in layer_skip.SKIP_IMPLS:
      raise ValueError(f"Gemma skip_impl={skip_impl!r}; use one of {layer_skip.SKIP_IMPLS}")
    if np.shape(route.get("gates")) != (b, cfg.depth):
      raise ValueError(f"Gemma route['gates'] has shape {np.shape(route.get('gates'))}, expected "
                       f"{(b, cfg.depth)} (batch, layers)")
    if skip_impl in layer_skip.ALL_SLOT_IMPLS:
      return cfg.depth
    ids = route.get("ids")
    if ids is None or not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2) or (
        ids.ndim == 2 and ids.shape[0] != b) or not 0 < ids.shape[-1] <= cfg.depth:
      raise ValueError(f"Gemma route['ids'] must be int [k] or [B, k] with B={b}, 0 < k <= "
                       f"{cfg.depth}; got {None if ids is None else (ids.dtype, ids.shape)}")
    return ids.shape[-1]

  def logits(self, final: jax.Array) -> jax.Array:
    cfg = self.config
    logits = jnp.dot(final, self.embedder.table().astype(final.dtype).T).astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits

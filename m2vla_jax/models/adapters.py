"""Parameter-efficient adapters of a linen model's linear layers: LoRA and VLA-GSE.

Owns: the adapter configuration (`AdapterConfig`); the mechanism that wraps chosen linear layers of a
model without editing its modules (`wrap`, `init`, `apply`); the adapter parameters' names and layouts;
LoRA merging for inference and export (`merge_lora`); VLA-GSE's spectral initialisation
(`gse_spectral_init`), routing (`route`), expert mixture (`expert_sum`) and load-balancing loss
(`aux_loss`); and the path rule that says which parameters are adapters (`ADAPTER_PARAM_REGEX`,
`adapter_param_paths`). Which parameters train, their learning rates and the loss weighting belong to
the policy and the trainer.

Mechanism. `wrap(config)` installs a flax method interceptor (`nn.intercept_methods`) on the
`__call__` of `gemma.Einsum`, `gemma.FeedForward`, `nn.Dense` and `nn.DenseGeneral`. When the
'/'-joined path of a layer's weight (module path + weight name, relative to the module that `init` /
`apply` is called on, e.g. 'llm/layers/attn/q_einsum/w' for a `VLM`) fully matches `config.targets`
(as `core/freezing` rules match), the interceptor creates the adapter parameters in that module's own
scope, next to the weight, and adds the adapter's output to the layer's. Inside `nn.scan` they get the
leading layer axis like the weight: 'llm/layers/attn/q_einsum/w_lora_a' [L, D, r]. Outside `wrap` the
same model runs unadapted (a merged LoRA tree needs nothing else). Dropout draws from the 'dropout' rng
and the GSE aux loss is `sow`n into 'intermediates', so the backbone's layer scans split 'dropout' and
scan 'intermediates' (gemma / siglip / dinov2); `apply` refuses to return an aux loss it did not see
from every GSE layer, so a scan that drops sown values cannot silently zero it.

How an adapter maps onto each layer kind. Every wrapped weight is read as a matrix [d_in, d_out] (or
one per fused slice C) through a role per weight axis: i = input (contracted), o = output, s = slice of
a fused weight (`WEIGHT_ROLES`; the interceptor derives an einsum's roles from its equation and checks
them against the table, which the pure functions `merge_lora` / `gse_spectral_init` use):

  layer (weight)                        equation / use                 roles  d_in   d_out  slices
  Einsum q_einsum/w [N, D, H]           BTD,NDH->BTNH                  o i o  D      N*H    -
  Einsum kv_einsum/w [2, K, D, H]       BSD,CKDH->CBSKH                s o i o D     K*H    2 (k, v)
  Einsum qkv_einsum/w [3, N, D, H]      BTD,CNDH->CBTNH                s o i o D     N*H    3 (q, k, v)
  Einsum attn_vec_einsum/w [N, H, D]    BTNH,NHD->BTD                  i i o  N*H    D      -
  FeedForward gating_einsum [2, D, F]   gelu(x @ w[0]) * (x @ w[1])    s i o  D      F      2 (gate, up)
  FeedForward linear [F, D]             h @ w                          i o    F      D      -
  nn.Dense kernel [in, out]             x @ k                          i o    in     out    -
  nn.DenseGeneral kernel [*in, *out]    contracts `axis` (MHA q/k/v:   i..o.. prod(in) prod(out) -
                                        [W, h, hd]; out: [h, hd, W])

Fused weights get one adapter per slice C (own A, B, router, SVD), not one over the fused output: each
slice is a separate projection in the published models (transformers' q_proj / k_proj / v_proj,
gate_proj / up_proj, which is what the GSE reference wraps one by one), the projections' spectra differ
in scale, so one SVD of the concatenation would hand the leading components to whichever dominates,
and the `min(d_in, d_out) < rank` skip rule then means the same as in the reference (per projection).
An input (i) axis made of several weight axes is flattened in the weight's axis order, likewise the
outputs. FeedForward keeps both its weights in one module, so when one of them is targeted the
interceptor computes the gated MLP itself (the same expression as `gemma.FeedForward`; the LoRA-at-init
test pins the two together). Not wrapped: convolutions (patch embeddings), embeddings and the tied LM
head, norms: none is a linear layer of the kinds above.

Parameters (per wrapped weight P, siblings of it; [S] = the slice axis of fused weights, absent
otherwise; a leading [L] under nn.scan):
  LoRA  P_lora_a [S, d_in, r] (uniform +-1/sqrt(d_in), PEFT's kaiming_uniform(a=sqrt 5)),
        P_lora_b [S, r, d_out] (zeros, so the adapted model equals the base one at init).
        y = W x + (alpha / r) B A drop(x).
  GSE   P_gse_a [S, E, d_in, r_e], P_gse_b [S, E, r_e, d_out], P_gse_router [S, d_in, n_spec]
        (trainable), P_gse_scale [S, E] (the experts' scales s_i: constants, not trained).
        y = W' x + (1/n_gen) sum_gen s B A drop(x) + sum_{j in top-k} w_j s_j B_j A_j drop(x), each
        expert with its own dropout mask; the router (bias-free, per token, on the un-dropped input,
        float32) gives softmax probabilities over the specialized experts; the top-k are renormalised
        to sum 1. E = num_generalized + num_specialized, r_e = rank / E.
        At `init` A is uniform, B zero and W' = W (a LoRA-like start); `gse_spectral_init` then sets
        A, B, s from the truncated SVD of the (pretrained) W and stores W' = W - sum_i s_i B_i A_i in
        place of W. Layers with min(d_in, d_out) < rank are skipped, as the reference skips them.
  Aux   per wrapped GSE weight and call: n_spec * sum_e f_e P_e (Switch style, as the reference's
        `get_layer_loss`): f_e = (top-k selections of expert e) / tokens (so sum_e f_e = k), P_e = mean
        router probability, over every token the layer sees (padding included, as the reference does);
        the slices of a fused weight count as separate layers (summed). `aux_loss` averages the calls of one weight (the VLM's readout mode runs the LLM twice: prefix,
        then queries) and sums over weights and layers; the caller adds `config.aux_weight * aux`.

Reference: YuhuaJiang2002/VLA-GSE `gse_peft/gse/layer.py` (TopKGSELayer, GSELayer.update_layer),
`model.py` (skip rule, aux sum) and `config.py` (defaults), read for behaviour; nothing copied. Its
router is a bias-free torch Linear left at torch's default init (uniform +-1/sqrt(d_in)), which is
what `init` gives it here too; the SVD does not touch it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import re
import zlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.core import tree_util
from m2vla_jax.models import gemma

KINDS = ("lora", "gse")
SVD_METHODS = ("exact", "randomized")
DEFAULT_DROPOUT = {"lora": 0.0, "gse": 0.05}

# Trainable adapter leaves (at any depth of a tree: works on VLM params and on {'vlm': ...} trees).
ADAPTER_PARAM_REGEX = r"(?:.*/)?[^/]+_(?:lora_a|lora_b|gse_a|gse_b|gse_router)"
# Adapter constants that live in params but never train (GSE expert scales).
ADAPTER_CONSTANT_REGEX = r"(?:.*/)?[^/]+_gse_scale"
_AUX = "_gse_aux"

# Roles of a wrapped weight's axes by parameter name (last two path parts, else the last one):
# s = fused slice, i = input, o = output. 'kernel' (nn.Dense / nn.DenseGeneral) is input axes then
# output axes, split where the product of the leading axes equals d_in.
WEIGHT_ROLES = {
    "q_einsum/w": "oio",
    "kv_einsum/w": "soio",
    "qkv_einsum/w": "soio",
    "attn_vec_einsum/w": "iio",
    "gating_einsum": "sio",
    "linear": "io",
}
_SLICE_LETTER = "C"   # the einsum letter of a fused weight's slice axis (big_vision's convention)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which layers get adapters and how.

  Attributes:
    kind: 'lora' or 'gse' (VLA-GSE generalized + specialized experts).
    targets: regex over wrapped-weight paths relative to the module being init/applied (full match,
      as `core/freezing`); '.*' wraps every Einsum / FeedForward / Dense / DenseGeneral weight.
    rank: LoRA r; GSE total rank r, split evenly over the experts (rank / experts each).
    alpha: LoRA scale numerator (scale = alpha / rank). Unused by GSE (its scales are s_i).
    dropout: dropout on the adapter input (GSE: on each expert's input independently); None: the
      kind's default (LoRA 0.0, GSE 0.05, the reference's run).
    num_generalized: GSE experts always on with equal weight 1/num_generalized (reference run: 1; its
      config class defaults to 2).
    num_specialized: GSE experts chosen per token by the router.
    top_k: specialized experts per token.
    rho: spectral-init divisor: s_i B_i A_i = U_i S_i V_i^T / rho.
    eta: scale factor: s_i = sqrt(3 eta d_in / r_i).
    svd: 'exact' (full SVD, truncated) or 'randomized' (range finder, the reference's svd_lowrank).
    svd_iters: power iterations of the randomized range finder.
    svd_seed: seed of the randomized range finder (folded with each weight's path).
    svd_oversample: extra range-finder columns beyond rank (the reference uses none).
    balance_grad_scale: gradient-scale balancing: specialized s_j = s_base * mean_k(tr_k) / tr_j,
      tr = sum of the expert's singular values (reference: specialized_scaling_method='gsb').
    s_base: base scale of the balancing.
    balance_eps: lower clamp of tr_j in the balancing.
    aux_weight: weight of the load-balancing loss in the total loss (applied by the caller).
  """
  kind: str = "lora"
  targets: str = ".*"
  rank: int = 16
  alpha: float = 16.0
  dropout: float | None = None
  num_generalized: int = 1
  num_specialized: int = 7
  top_k: int = 2
  rho: float = 10.0
  eta: float = 1.0
  svd: str = "randomized"
  svd_iters: int = 2
  svd_seed: int = 42
  svd_oversample: int = 0
  balance_grad_scale: bool = False
  s_base: float = 2.0
  balance_eps: float = 1e-12
  aux_weight: float = 0.01

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"AdapterConfig.kind={self.kind!r}; use one of {KINDS}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"AdapterConfig.targets={self.targets!r} is not a regex ({e})") from None
    if self.dropout is None:
      object.__setattr__(self, "dropout", DEFAULT_DROPOUT[self.kind])
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"AdapterConfig.dropout={self.dropout} must be in [0, 1)")
    if self.rank < 1:
      raise ValueError(f"AdapterConfig.rank={self.rank} must be >= 1")
    if self.alpha <= 0:
      raise ValueError(f"AdapterConfig.alpha={self.alpha} must be > 0")
    if self.kind != "gse":
      return
    if self.num_generalized < 0 or self.num_specialized < 0 or self.num_experts < 1:
      raise ValueError(f"AdapterConfig.num_generalized={self.num_generalized} and num_specialized="
                       f"{self.num_specialized} must be >= 0 with at least one expert")
    if self.num_specialized and not 1 <= self.top_k <= self.num_specialized:
      raise ValueError(f"AdapterConfig.top_k={self.top_k} must be in [1, num_specialized="
                       f"{self.num_specialized}]; lower top_k or add specialized experts")
    if self.rank % self.num_experts:
      lo = max(self.num_experts, self.rank // self.num_experts * self.num_experts)
      raise ValueError(f"AdapterConfig.rank={self.rank} is not divisible by the number of experts "
                       f"num_generalized + num_specialized = {self.num_experts}; use rank={lo} or "
                       f"{lo + self.num_experts}, or change the expert counts")
    for name in ("rho", "eta", "s_base", "balance_eps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"AdapterConfig.{name}={getattr(self, name)} must be > 0")
    if self.svd not in SVD_METHODS:
      raise ValueError(f"AdapterConfig.svd={self.svd!r}; use one of {SVD_METHODS}")
    if self.svd_iters < 0 or self.svd_oversample < 0:
      raise ValueError(f"AdapterConfig.svd_iters={self.svd_iters} and svd_oversample="
                       f"{self.svd_oversample} must be >= 0")
    if self.aux_weight < 0:
      raise ValueError(f"AdapterConfig.aux_weight={self.aux_weight} must be >= 0")

  @property
  def num_experts(self) -> int:
    return self.num_generalized + self.num_specialized

  @property
  def expert_rank(self) -> int:
    return self.rank // self.num_experts

  @property
  def lora_scale(self) -> float:
    return self.alpha / self.rank

  def expert_scale(self, d_in: int) -> float:
    """GSE s_i = sqrt(3 eta d_in / r_i) (before any gradient-scale balancing)."""
    return math.sqrt(3.0 * self.eta * d_in / self.expert_rank)


# ----------------------------------------------------------------------------------------------------
# Pure pieces of the GSE forward (the interceptor and the tests use these).


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k routing over the last axis of logits [..., N, n_spec].

  Returns (gates [..., N, n_spec]: the top-k softmax probabilities renormalised to sum 1, 0 elsewhere;
  probs [..., N, n_spec] softmax; aux [...] = n_spec * sum_e f_e P_e with f_e = top-k selections of e
  / N and P_e = mean_N probs), all float32.
  """
  logits = logits.astype(jnp.float32)
  n_tok, n_spec = logits.shape[-2:]
  probs = jax.nn.softmax(logits, axis=-1)
  top, idx = jax.lax.top_k(probs, top_k)
  top = top / jnp.sum(top, axis=-1, keepdims=True)
  picked = jax.nn.one_hot(idx, n_spec, dtype=jnp.float32)        # [..., N, k, n_spec]
  gates = jnp.einsum("...nk,...nke->...ne", top, picked)
  fraction = jnp.sum(picked, axis=(-3, -2)) / n_tok              # f_e: not differentiable (counts)
  mean_prob = jnp.mean(probs, axis=-2)
  aux = n_spec * jnp.sum(jax.lax.stop_gradient(fraction) * mean_prob, axis=-1)
  return gates, probs, aux


def dropout_keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """(keep mask bool [shape], the exact keep probability) for dropout at `rate`, two draws per word.

  GSE drops each expert's input independently, so a step draws experts x tokens x d_in values per
  wrapped layer (~2e9 for Gemma 3 270M at batch 64); `jax.random.bernoulli` spends a 32-bit
  threefry word and a float conversion on each. Here each threefry word gives two 16-bit uniforms
  (a 2-layer Gemma-3-270M-width forward + backward with GSE dropout: 13.4 s -> 6.6 s on 2 CPU
  cores): a value is dropped when its draw is below round(rate * 2^16), so the rate is quantised to
  1/65536 (0.05 -> 0.0500031) and the keep probability returned is the exact one to rescale by.
  """
  threshold = min(int(round(rate * 65536)), 65535)
  n = math.prod(shape)
  words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(shape)
  return draws >= jnp.uint16(threshold), 1.0 - threshold / 65536


def expert_sum(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, gates: jax.Array,
               dtype: Any = None) -> jax.Array:
  """sum_e gates[n, e] * scale[e] * (x_e[n] @ a[e] @ b[e]) -> [..., N, d_out].

  x: [N, d_in] shared by the experts, or [..., E, N, d_in] one (dropped-out) copy per expert;
  a [..., E, d_in, r_e], b [..., E, r_e, d_out], scale [..., E], gates [..., N, E] (leading axes
  broadcast: fused slices, or none). Computed rank-first (the [N, E, r_e] mixture, never [N, E, d_out]).
  """
  dtype = dtype or x.dtype
  if x.ndim == a.ndim:
    h = jnp.einsum("...end,...edr->...ner", x.astype(dtype), a.astype(dtype))
  else:
    h = jnp.einsum("...nd,...edr->...ner", x.astype(dtype), a.astype(dtype))
  mix = (gates.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]).astype(dtype)
  return jnp.einsum("...ner,...ero->...no", h * mix[..., None], b.astype(dtype))


# ----------------------------------------------------------------------------------------------------
# The interceptor.


@dataclasses.dataclass(frozen=True)
class _Site:
  """One wrapped weight as the interceptor sees it (native shape, no scan axis)."""
  path: str
  weight: str
  roles: str
  shape: tuple[int, ...]

  def _prod(self, role: str) -> int:
    return int(np.prod([n for n, r in zip(self.shape, self.roles) if r == role], dtype=np.int64))

  @property
  def d_in(self) -> int:
    return self._prod("i")

  @property
  def d_out(self) -> int:
    return self._prod("o")

  @property
  def slices(self) -> tuple[int, ...]:
    return (self._prod("s"),) if "s" in self.roles else ()


def _fan_in_uniform(d_in: int):
  bound = 1.0 / math.sqrt(d_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _einsum_layout(eqn: str):
  """(roles of w's axes, x letters, w letters, out letters) or None for an unsupported equation."""
  eqn = eqn.replace(" ", "")
  if "->" not in eqn or eqn.count(",") != 1 or "." in eqn:
    return None
  lhs, out = eqn.split("->")
  xs, ws = lhs.split(",")
  roles = ""
  for c in ws:
    if c == _SLICE_LETTER and c not in xs and c in out:
      roles += "s"
    elif c in xs and c not in out:
      roles += "i"
    elif c not in xs and c in out:
      roles += "o"
    else:
      return None
  batch = [c for c in xs if c not in ws]
  if sorted(out) != sorted([c for c in ws if c not in xs] + batch) or "i" not in roles:
    return None
  return roles, xs, ws, out


def _table_roles(path: str) -> str | None:
  parts = path.split("/")
  return WEIGHT_ROLES.get("/".join(parts[-2:]), WEIGHT_ROLES.get(parts[-1]))


def _kernel_roles(native_shape: tuple[int, ...], d_in: int) -> str:
  for k in range(1, len(native_shape)):
    if int(np.prod(native_shape[:k])) == d_in:
      return "i" * k + "o" * (len(native_shape) - k)
  raise ValueError(f"no leading axes of a kernel {native_shape} multiply to d_in={d_in}")


class Wrapper:
  """The method interceptor `wrap` installs; after a traced init/apply it records what it saw.

  Attributes:
    config, deterministic: as given to `wrap`.
    candidates: {path: (d_in, d_out)} of every weight the mechanism could wrap.
    wrapped: {path: (d_in, d_out)} of the weights it wrapped.
    skipped: {path: (d_in, d_out)} matched by targets but min(d_in, d_out) < rank (GSE only).
    aux_sites: module paths + aux names the GSE layers sowed into 'intermediates'.
  """

  def __init__(self, config: AdapterConfig, deterministic: bool):
    self.config = config
    self.deterministic = deterministic
    self._pattern = re.compile(config.targets)
    self.candidates: dict[str, tuple[int, int]] = {}
    self.wrapped: dict[str, tuple[int, int]] = {}
    self.skipped: dict[str, tuple[int, int]] = {}
    self.aux_sites: set[str] = set()

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(m, gemma.Einsum):
      return self._einsum(m, next_fun, args, kwargs, context)
    if isinstance(m, gemma.FeedForward):
      return self._feed_forward(m, next_fun, args, kwargs, context)
    if isinstance(m, nn.DenseGeneral):
      return self._dense_general(m, next_fun, args, kwargs, context)
    if isinstance(m, nn.Dense):
      return self._dense(m, next_fun, args, kwargs, context)
    return next_fun(*args, **kwargs)

  # -- selection ---------------------------------------------------------------------------------

  def _select(self, m: nn.Module, weight: str, roles: str | None, shape: tuple[int, ...]
              ) -> _Site | None:
    path = "/".join((*m.path, weight))
    if roles is None:
      if self._pattern.fullmatch(path):
        raise ValueError(f"AdapterConfig.targets={self.config.targets!r} matches {path!r}, a "
                         f"{type(m).__name__} call the adapters cannot read as a linear map; narrow "
                         f"targets to exclude it")
      return None
    site = _Site(path, weight, roles, tuple(int(n) for n in shape))
    dims = (site.d_in, site.d_out)
    self.candidates[path] = dims
    if not self._pattern.fullmatch(path):
      return None
    table = _table_roles(path) if weight != "kernel" else _kernel_roles(site.shape, site.d_in)
    if table != roles:
      raise ValueError(f"adapters: {path} computes with axis roles {roles!r} but WEIGHT_ROLES gives "
                       f"{table!r}; update WEIGHT_ROLES in models/adapters.py to the layer's layout")
    if min(dims) < self.config.rank:
      if self.config.kind == "lora":
        raise ValueError(f"AdapterConfig.rank={self.config.rank} exceeds min(d_in, d_out)="
                         f"{min(dims)} of {path} (d_in={dims[0]}, d_out={dims[1]}); lower rank or "
                         f"exclude the layer from targets")
      self.skipped[path] = dims   # the GSE reference leaves such layers unwrapped
      return None
    self.wrapped[path] = dims
    return site

  # -- the adapter's contribution ------------------------------------------------------------------

  def _dropout(self, m: nn.Module, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x broadcast to shape + x.shape with independent dropout masks (or x when off)."""
    p = self.config.dropout
    if self.deterministic or p == 0.0:
      return x
    keep, keep_prob = dropout_keep_mask(m.make_rng("dropout"), p, shape + x.shape)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))

  def _delta(self, m: nn.Module, site: _Site, x: jax.Array, dtype) -> jax.Array:
    """The adapter's output [S..., N, d_out] for x [N, d_in]."""
    cfg, s = self.config, site.slices
    name = lambda leaf: f"{site.weight}_{leaf}"
    uniform = _fan_in_uniform(site.d_in)
    if cfg.kind == "lora":
      a = m.param(name("lora_a"), uniform, (*s, site.d_in, cfg.rank), jnp.float32)
      b = m.param(name("lora_b"), nn.initializers.zeros_init(), (*s, cfg.rank, site.d_out),
                  jnp.float32)
      xd = self._dropout(m, x, s).astype(dtype)
      h = jnp.einsum("...nd,...dr->...nr", xd, a.astype(dtype))
      return jnp.einsum("...nr,...ro->...no", h, b.astype(dtype)) * jnp.asarray(cfg.lora_scale, dtype)
    e, r_e, n_spec = cfg.num_experts, cfg.expert_rank, cfg.num_specialized
    a = m.param(name("gse_a"), uniform, (*s, e, site.d_in, r_e), jnp.float32)
    b = m.param(name("gse_b"), nn.initializers.zeros_init(), (*s, e, r_e, site.d_out), jnp.float32)
    scale = m.param(name("gse_scale"), nn.initializers.constant(cfg.expert_scale(site.d_in)),
                    (*s, e), jnp.float32)
    n = x.shape[0]
    gates = [jnp.full((*s, n, cfg.num_generalized), 1.0 / max(cfg.num_generalized, 1), jnp.float32)]
    if n_spec:
      router = m.param(name("gse_router"), uniform, (*s, site.d_in, n_spec), jnp.float32)
      logits = jnp.einsum("nd,...de->...ne", x.astype(jnp.float32), router, precision=_HIGHEST)
      spec, _, aux = route(logits, cfg.top_k)
      gates.append(spec)
      m.sow("intermediates", name("gse_aux"), jnp.sum(aux))
      self.aux_sites.add(site.path + _AUX)
    xd = self._dropout(m, x, (*s, e) if not self.deterministic and cfg.dropout else ())
    return expert_sum(xd, a, b, scale, jnp.concatenate(gates, axis=-1), dtype)

  # -- layer kinds ---------------------------------------------------------------------------------

  def _einsum(self, m, next_fun, args, kwargs, context):
    bound = inspect.signature(context.orig_method).bind(*args, **kwargs).arguments
    eqn, x = bound["eqn"], bound["x"]
    layout = _einsum_layout(eqn)
    site = self._select(m, "w", layout and layout[0], m.shape)
    y = next_fun(*args, **kwargs)
    if site is None:
      return y
    _, xs, ws, out = layout
    sizes = {**dict(zip(xs, x.shape)), **dict(zip(ws, m.shape))}
    batch = [c for c in xs if c not in ws]
    ins = [c for c, r in zip(ws, site.roles) if r == "i"]
    outs = [c for c, r in zip(ws, site.roles) if r == "o"]
    sl = [c for c, r in zip(ws, site.roles) if r == "s"]
    xt = jnp.einsum(f"{xs}->{''.join(batch + ins)}", x)
    delta = self._delta(m, site, xt.reshape(-1, site.d_in), y.dtype)
    delta = delta.reshape([sizes[c] for c in sl + batch + outs])
    return y + jnp.einsum(f"{''.join(sl + batch + outs)}->{out}", delta).astype(y.dtype)

  def _dense(self, m, next_fun, args, kwargs, context):
    x = inspect.signature(context.orig_method).bind(*args, **kwargs).arguments["inputs"]
    site = self._select(m, "kernel", "io", (x.shape[-1], m.features))
    y = next_fun(*args, **kwargs)
    if site is None:
      return y
    delta = self._delta(m, site, x.reshape(-1, site.d_in), y.dtype)
    return y + delta.reshape(y.shape).astype(y.dtype)

  def _dense_general(self, m, next_fun, args, kwargs, context):
    x = inspect.signature(context.orig_method).bind(*args, **kwargs).arguments["inputs"]
    axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
    axis = tuple(a % x.ndim for a in axis)
    features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
    roles = "i" * len(axis) + "o" * len(features) if not m.batch_dims else None
    site = self._select(m, "kernel", roles, tuple(x.shape[a] for a in axis) + features)
    y = next_fun(*args, **kwargs)
    if site is None:
      return y
    moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    delta = self._delta(m, site, moved.reshape(-1, site.d_in), y.dtype)
    return y + delta.reshape(y.shape).astype(y.dtype)

  def _feed_forward(self, m, next_fun, args, kwargs, context):
    x = inspect.signature(context.orig_method).bind(*args, **kwargs).arguments["x"]
    cfg = m.config
    gating = self._select(m, "gating_einsum", "sio", (2, cfg.width, cfg.mlp_dim))
    linear = self._select(m, "linear", "io", (cfg.mlp_dim, cfg.width))
    if gating is None and linear is None:
      return next_fun(*args, **kwargs)
    if m.is_initializing():
      next_fun(*args, **kwargs)   # creates the weights with FeedForward's own initialisers
    # gemma.FeedForward's expression, with the adapters added before the nonlinearity.
    dtype = jnp.dtype(cfg.dtype)
    w_gating = m.get_variable("params", "gating_einsum").astype(dtype)
    w_linear = m.get_variable("params", "linear").astype(dtype)
    pre_gate, pre_up = jnp.dot(x, w_gating[0]), jnp.dot(x, w_gating[1])
    if gating is not None:
      delta = self._delta(m, gating, x.reshape(-1, cfg.width), pre_gate.dtype)
      pre_gate = pre_gate + delta[0].reshape(pre_gate.shape).astype(pre_gate.dtype)
      pre_up = pre_up + delta[1].reshape(pre_up.shape).astype(pre_up.dtype)
    h = nn.gelu(pre_gate, approximate=True) * pre_up
    y = jnp.dot(h, w_linear)
    if linear is not None:
      y = y + self._delta(m, linear, h.reshape(-1, cfg.mlp_dim), y.dtype).reshape(y.shape).astype(
          y.dtype)
    return y


@contextlib.contextmanager
def wrap(config: AdapterConfig | None, *, deterministic: bool = True) -> Iterator[Wrapper | None]:
  """Within the block, every module init/applied has its `config.targets` layers adapted.

  Yields the `Wrapper` (what was wrapped, after tracing), or None for config None (no adapters: full
  fine-tuning or a frozen backbone). Dropout is active when `deterministic=False` and config.dropout >
  0; it draws from the 'dropout' rng (apply(..., rngs={'dropout': key})). Scope it to the backbone's
  init/apply: every Einsum / FeedForward / Dense / DenseGeneral call inside is a candidate.
  """
  if config is None:
    yield None
    return
  wrapper = Wrapper(config, deterministic)
  with nn.intercept_methods(wrapper):
    yield wrapper


def _check_matched(wrapper: Wrapper) -> None:
  cfg = wrapper.config
  if wrapper.wrapped:
    return
  if wrapper.skipped:
    raise ValueError(f"AdapterConfig.rank={cfg.rank} exceeds min(d_in, d_out) of every layer targets="
                     f"{cfg.targets!r} matches ({len(wrapper.skipped)}, e.g. "
                     f"{sorted(wrapper.skipped.items())[:3]}); GSE skips such layers (as the reference "
                     f"does), so nothing would adapt: lower rank")
  some = sorted(wrapper.candidates)[:6]
  raise ValueError(f"AdapterConfig.targets={cfg.targets!r} matches no wrappable layer; weight paths "
                   f"look like {some} (full match, relative to the module being initialised)")


def init(config: AdapterConfig | None, model: nn.Module, rngs, *args, method=None, **kwargs) -> dict:
  """model.init(rngs, *args) with adapters: the variables, adapter parameters included.

  Raises ValueError when `config.targets` wraps no layer (and, for LoRA, when a matched layer is
  narrower than the rank). GSE adapters start LoRA-like (B = 0, the base weight unchanged): call
  `gse_spectral_init` on the params once the pretrained weights are in.
  """
  with wrap(config) as wrapper:
    variables = model.init(rngs, *args, method=method, **kwargs)
  if wrapper is not None:
    _check_matched(wrapper)
  return {k: v for k, v in variables.items() if k != "intermediates"}


def apply(config: AdapterConfig | None, model: nn.Module, variables, *args, deterministic: bool = True,
          rngs=None, method=None, **kwargs) -> tuple[Any, jax.Array]:
  """(model.apply(variables, *args) with adapters, GSE aux loss float32 scalar (0 for LoRA / None)).

  The aux loss is unweighted: add `config.aux_weight * aux` to the training loss. Training-time
  dropout: deterministic=False and rngs={'dropout': key}. Works under jit and grad. With method=None
  (the full forward) every adapter in `variables` must be used, else ValueError (a cached stage or a
  separate inner apply skipped it). For other mutable collections use `wrap` and `aux_loss` directly.
  """
  if config is None:
    return model.apply(variables, *args, rngs=rngs, method=method, **kwargs), jnp.zeros((), jnp.float32)
  if not deterministic and config.dropout > 0 and "dropout" not in (rngs or {}):
    raise ValueError(f"adapters.apply(deterministic=False) with AdapterConfig.dropout="
                     f"{config.dropout} needs rngs={{'dropout': key}}")
  with wrap(config, deterministic=deterministic) as wrapper:
    out, state = model.apply(variables, *args, rngs=rngs, method=method, mutable=["intermediates"],
                             **kwargs)
  if method is None:
    unused = sorted(set(_adapted_weights(variables.get("params", {}))) - set(wrapper.wrapped))
    if unused:
      raise ValueError(f"adapters: the adapters of {unused[:3]} (of {len(unused)}) were not used by this "
                       f"apply: a cached stage skipped their layers (adapted layers must not be "
                       f"cached), the layers ran in a separate apply (e.g. a layer-skipping route), or "
                       f"`config` differs from the one the adapters were made with")
  inter = state.get("intermediates", {})
  sown = set(_aux_groups(inter))
  missing = sorted(wrapper.aux_sites - sown)
  if missing:
    raise ValueError(f"adapters: the GSE aux loss of {missing[:3]} (of {len(missing)}) never reached "
                     f"'intermediates': an nn.scan around those layers does not scan that collection "
                     f"(give it variable_axes={{'params': 0, 'intermediates': 0}}), or the layer ran in "
                     f"a separate apply")
  return out, aux_loss(inter)


def _adapted_weights(params) -> list[str]:
  """Paths of the weights that have adapters in a params tree."""
  suffix = re.compile(r"_(?:lora_a|gse_a)$")
  return [suffix.sub("", p) for p in tree_util.flatten(params) if suffix.search(p)]


def _aux_groups(intermediates) -> dict[str, list]:
  """{weight path + '_gse_aux': [value of each call, each [L...] or scalar]}."""
  groups: dict[str, list] = {}
  for path, value in tree_util.flatten(intermediates).items():
    head, sep, _ = path.rpartition(_AUX)
    if sep:
      groups.setdefault(head + _AUX, []).append(value)
  return groups


def aux_loss(intermediates) -> jax.Array:
  """Sum over GSE-wrapped weights and layers of the per-call aux losses (mean over one weight's calls).

  `intermediates`: the 'intermediates' collection of a `model.apply(..., mutable=['intermediates'])`
  run under `wrap` (`apply` does this for you).
  """
  total = jnp.zeros((), jnp.float32)
  for calls in _aux_groups(intermediates).values():
    total = total + sum(jnp.sum(c.astype(jnp.float32)) for c in calls) / len(calls)
  return total


# ----------------------------------------------------------------------------------------------------
# Pure functions over parameter trees.


def adapter_param_paths(params) -> list[str]:
  """Sorted '/'-paths of the trainable adapter leaves (`ADAPTER_PARAM_REGEX`) of a tree."""
  pattern = re.compile(ADAPTER_PARAM_REGEX)
  return sorted(p for p in tree_util.flatten(params) if pattern.fullmatch(p))


def _roles_for(path: str, w_shape: tuple[int, ...], a_shape: tuple[int, ...], core: int) -> tuple[str, int]:
  """(roles, number of leading scan axes) of weight `path`; core = adapter axes after the lead and
  slice axes (LoRA 2: d_in, r; GSE 3: E, d_in, r_e)."""
  roles = _table_roles(path)
  if roles is None and path.rsplit("/", 1)[-1] == "kernel":
    lead = len(a_shape) - core
    roles = _kernel_roles(tuple(w_shape[lead:]), a_shape[-2])
  if roles is None:
    raise ValueError(f"adapters: no axis roles for {path!r} in WEIGHT_ROLES")
  lead = len(w_shape) - len(roles)
  if lead < 0 or len(a_shape) != lead + ("s" in roles) + core:
    raise ValueError(f"adapters: {path} has shape {w_shape} but its adapter has {a_shape}; the tree "
                     f"was not made by adapters.init with this model")
  return roles, lead


def _to_matrix(w: jax.Array, roles: str) -> jax.Array:
  """w [*lead, *native] -> [*lead, S, d_in, d_out] (S = 1 without a slice axis)."""
  lead = w.ndim - len(roles)
  pick = lambda role: [lead + i for i, r in enumerate(roles) if r == role]
  perm = list(range(lead)) + pick("s") + pick("i") + pick("o")
  size = lambda role: int(np.prod([w.shape[j] for j in pick(role)], dtype=np.int64))
  return jnp.transpose(w, perm).reshape(w.shape[:lead] + (size("s"), size("i"), size("o")))


def _from_matrix(mat: jax.Array, roles: str, w_shape: tuple[int, ...]) -> jax.Array:
  lead = len(w_shape) - len(roles)
  pick = lambda role: [lead + i for i, r in enumerate(roles) if r == role]
  perm = list(range(lead)) + pick("s") + pick("i") + pick("o")
  return jnp.transpose(mat.reshape([w_shape[j] for j in perm]), np.argsort(perm))


def _with_slice(x: jax.Array, roles: str, lead: int) -> jax.Array:
  return x if "s" in roles else jnp.expand_dims(x, lead)


def _adapter_leaves(params, suffix: str, caller: str, kind: str) -> tuple[dict, dict, list[str]]:
  """(flat tree, a copy to write into, sorted paths ending in `suffix`); an error naming `caller` if none."""
  flat = tree_util.flatten(params)
  paths = [p for p in sorted(flat) if p.endswith(suffix)]
  if not paths:
    raise ValueError(f"{caller}: the tree has no '*{suffix}' leaves; was it made by adapters.init with "
                     f"{kind}?")
  return flat, dict(flat), paths


def merge_lora(params, config: AdapterConfig):
  """params with W + (alpha / r) B A folded into every LoRA-wrapped weight and the *_lora_* leaves
  removed: the plain model (no `wrap`) then computes what the adapted one did (inference, export).

  Works on any tree holding the adapters (VLM params, {'params': ...} variables, {'vlm': ...}).
  """
  if config.kind != "lora":
    raise ValueError(f"merge_lora needs AdapterConfig.kind='lora', got {config.kind!r} (GSE routes per "
                     f"token: it cannot be folded into W)")
  flat, out, paths = _adapter_leaves(params, "_lora_a", "merge_lora", "a LoRA config")
  for a_path in paths:
    base = a_path[:-len("_lora_a")]
    w, a, b = flat[base], flat[a_path], flat[base + "_lora_b"]
    roles, lead = _roles_for(base, w.shape, a.shape, 2)
    if a.shape[-1] != config.rank:
      raise ValueError(f"merge_lora: {a_path} has rank {a.shape[-1]}, AdapterConfig.rank={config.rank}; "
                       f"pass the config the adapters were made with")
    delta = jnp.matmul(_with_slice(jnp.asarray(a, jnp.float32), roles, lead),
                       _with_slice(jnp.asarray(b, jnp.float32), roles, lead), precision=_HIGHEST)
    merged = _to_matrix(jnp.asarray(w, jnp.float32), roles) + config.lora_scale * delta
    out[base] = _from_matrix(merged, roles, w.shape).astype(w.dtype)
    del out[a_path], out[base + "_lora_b"]
  return tree_util.unflatten(out)


def _truncated_svd(mats: jax.Array, key: jax.Array, config: AdapterConfig):
  """Leading `rank` singular triplets of mats [M, m, n] (float32): (U [M, m, r], S [M, r], Vt [M, r, n])."""
  rank = config.rank
  if config.svd == "exact":
    u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
    return u[..., :rank], s[..., :rank], vt[..., :rank, :]
  mm = lambda x, y: jnp.matmul(x, y, precision=_HIGHEST)

  def one(mat, k):
    # Randomized range finder with power iterations (Halko et al.; torch.svd_lowrank's scheme).
    q = min(rank + config.svd_oversample, *mat.shape)
    basis, _ = jnp.linalg.qr(mm(mat, jax.random.normal(k, (mat.shape[1], q), jnp.float32)))
    for _ in range(config.svd_iters):
      basis, _ = jnp.linalg.qr(mm(mat.T, basis))
      basis, _ = jnp.linalg.qr(mm(mat, basis))
    u, s, vt = jnp.linalg.svd(mm(basis.T, mat), full_matrices=False)
    return mm(basis, u)[:, :rank], s[:rank], vt[:rank]

  return jax.vmap(one)(mats, jax.random.split(key, mats.shape[0]))


@functools.partial(jax.jit, static_argnames="config")
def _spectral_factors(mats: jax.Array, key: jax.Array, config: AdapterConfig):
  """mats [M, d_in, d_out] float32 -> (W' [M, d_in, d_out], A [M, E, d_in, r_e], B [M, E, r_e, d_out],
  s [M, E]); jitted: one compile per weight shape, instead of dispatching every op of the SVD."""
  e, r_e, n_gen = config.num_experts, config.expert_rank, config.num_generalized
  d_in, d_out = mats.shape[-2:]
  u, s, vt = _truncated_svd(mats, key, config)
  u = jnp.moveaxis(u.reshape(-1, d_in, e, r_e), 2, 1)               # [M, E, d_in, r_e]
  vt = vt.reshape(-1, e, r_e, d_out)                                 # [M, E, r_e, d_out]
  s = s.reshape(-1, e, r_e)
  scale = jnp.full(s.shape[:2], config.expert_scale(d_in), jnp.float32)
  if config.balance_grad_scale and config.num_specialized:
    trace = jnp.sum(s[:, n_gen:], axis=-1)
    balanced = config.s_base * jnp.mean(trace, axis=-1, keepdims=True) / jnp.maximum(
        trace, config.balance_eps)
    scale = scale.at[:, n_gen:].set(balanced)
  root = jnp.sqrt(s / (scale[..., None] * config.rho))
  a = u * root[:, :, None, :]
  b = root[..., None] * vt
  delta = jnp.einsum("me,medr,mero->mdo", scale, a, b, precision=_HIGHEST)
  return mats - delta, a, b, scale


def gse_spectral_init(params, config: AdapterConfig):
  """VLA-GSE's spectral initialisation of every GSE-wrapped weight of a tree (pure; float32 SVD).

  Per weight W (per layer of a scanned stack, per fused slice), read as [d_in, d_out]: the rank-r
  truncated SVD U S V^T (components in descending order; expert i gets components [i r_e, (i+1) r_e):
  generalized experts first, then the specialized ones), s_i = sqrt(3 eta d_in / r_e) (specialized:
  s_base * mean_k(tr_k) / tr_j with balance_grad_scale), A_i = U_i diag(sqrt(S_i / (s_i rho))),
  B_i = diag(sqrt(S_i / (s_i rho))) V_i^T (so s_i A_i B_i = U_i S_i V_i^T / rho; A is [d_in, r_e] here
  since our kernels are [in, out]), and W' = W - sum_i s_i A_i B_i replaces W. Routers are left as they
  are (the reference does not touch them). Call it once, on freshly initialised adapters and the
  pretrained W; the tree then holds W', so inference never re-runs the SVD. Deterministic: exact SVD,
  or the randomized one seeded by config.svd_seed folded with the weight's path.
  """
  if config.kind != "gse":
    raise ValueError(f"gse_spectral_init needs AdapterConfig.kind='gse', got {config.kind!r}")
  flat, out, paths = _adapter_leaves(params, "_gse_a", "gse_spectral_init", "a GSE config")
  e, r_e = config.num_experts, config.expert_rank
  for a_path in paths:
    base = a_path[:-len("_gse_a")]
    w, a, b = flat[base], flat[a_path], flat[base + "_gse_b"]
    if a.shape[-3:-2] != (e,) or a.shape[-1] != r_e:
      raise ValueError(f"gse_spectral_init: {a_path} has shape {a.shape} (experts, d_in, rank each), "
                       f"AdapterConfig gives {e} experts of rank {r_e}; pass the config the adapters "
                       f"were made with")
    if bool(jnp.any(jnp.asarray(b) != 0)):
      raise ValueError(f"gse_spectral_init: {base}_gse_b is non-zero: the tree was spectrally "
                       f"initialised (or trained) already, and W holds W'; run it once on fresh "
                       f"adapters")
    roles, lead = _roles_for(base, w.shape, a.shape, 3)
    mats = _to_matrix(jnp.asarray(w, jnp.float32), roles)           # [*lead, S, d_in, d_out]
    key = jax.random.fold_in(jax.random.PRNGKey(config.svd_seed), zlib.crc32(base.encode()) & 0x7FFFFFFF)
    adjusted, new_a, new_b, scale = _spectral_factors(mats.reshape((-1,) + mats.shape[-2:]), key, config)
    adjusted = adjusted.reshape(mats.shape)
    out[base] = _from_matrix(adjusted, roles, w.shape).astype(w.dtype)
    out[a_path] = new_a.reshape(a.shape).astype(a.dtype)
    out[base + "_gse_b"] = new_b.reshape(b.shape).astype(b.dtype)
    out[base + "_gse_scale"] = scale.reshape(flat[base + "_gse_scale"].shape)
  return tree_util.unflatten(out)

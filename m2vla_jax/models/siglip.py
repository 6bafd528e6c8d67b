"""SigLIP ViT image encoder (linen) in the big_vision `models/vit.py` parameter layout.

Owns the vision half of the frozen backbone: patch embedding, learned position embedding, the scanned
stack of pre-norm encoder blocks, the final `encoder_norm` and PaliGemma's linear `head` that projects
every patch token to the language model's width. No pooling: PaliGemma feeds all patch tokens to Gemma.

Parameter tree (leading L axis on everything under Transformer/encoderblock/):
  embedding/{kernel [P, P, 3, W], bias [W]}
  pos_embedding [1, N, W]
  Transformer/encoderblock/LayerNorm_0/{scale, bias} [L, W]
  Transformer/encoderblock/MultiHeadDotProductAttention_0/{query,key,value}/{kernel [L, W, h, hd],
      bias [L, h, hd]}, .../out/{kernel [L, h, hd, W], bias [L, W]}
  Transformer/encoderblock/LayerNorm_1/{scale, bias} [L, W]
  Transformer/encoderblock/MlpBlock_0/Dense_0/{kernel [L, W, M], bias}, .../Dense_1/{kernel [L, M, W], bias}
  Transformer/encoder_norm/{scale, bias} [W]
  head/{kernel [W, D_out], bias [D_out]}          (only when head_dim_out is set)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
  """Hyper-parameters of a SigLIP vision tower.

  Attributes:
    variant: name the config was built from (informational).
    width: token width W.
    depth: number of encoder blocks L.
    mlp_dim: MLP hidden width M.
    num_heads: attention heads (W % num_heads == 0).
    patch_size: square patch side P (pixels).
    image_size: square input side (pixels); N = (image_size // patch_size) ** 2 tokens.
    head_dim_out: width of the linear `head` projection (the LLM width in PaliGemma); None: no head.
    norm_eps: LayerNorm epsilon.
    dtype: compute dtype; parameters stay float32.
    remat_policy: 'none' or a `jax.checkpoint_policies` name.
    scan_unroll: unroll factor of the block scan.
    posemb_init: initial value of the (always learnable) position embedding: 'normal' (random, as
      big_vision's 'learn') or 'sincos2d' (big_vision's fixed 2-D sine-cosine table, here only the
      start). Irrelevant when weights are loaded; for towers trained from scratch on small data
      'sincos2d' starts every token with its image coordinates.
  """
  variant: str
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int
  head_dim_out: int | None = None
  norm_eps: float = 1e-6
  dtype: str = "float32"
  remat_policy: str = "nothing_saveable"
  scan_unroll: int = 1
  posemb_init: str = "normal"

  def __post_init__(self):
    if self.posemb_init not in POSEMB_INITS:
      raise ValueError(f"SigLIPConfig.posemb_init={self.posemb_init!r}; use one of {POSEMB_INITS}")
    if self.posemb_init == "sincos2d" and self.width % 4:
      raise ValueError(f"SigLIPConfig.posemb_init='sincos2d' needs width % 4 == 0, got "
                       f"width={self.width}")
    if self.width % self.num_heads:
      raise ValueError(f"SigLIPConfig.width={self.width} must be divisible by num_heads={self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"SigLIPConfig.image_size={self.image_size} must be a multiple of "
                       f"patch_size={self.patch_size}")
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"SigLIPConfig.remat_policy={self.remat_policy!r} is neither 'none' nor a name in "
                       f"jax.checkpoint_policies")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


POSEMB_INITS = ("normal", "sincos2d")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """float32 [1, h*w, width]: sin/cos of the row and column at width/4 frequencies each."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return table[None].astype(np.float32)


_VARIANTS: dict[str, dict[str, Any]] = {
    "So400m/14": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
    "B/16": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16, image_size=224),
    "tiny/16": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=16, image_size=32),
    "tiny/8": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
    # 4x4 patches: 64 tokens, each about one block wide in the MJX suite's 32 px camera.
    "tiny/4": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=32),
    # Twice tiny's width, for simulation suites trained from scratch (configs/mjx.py).
    "mini/8": dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=8, image_size=32),
}


def get_config(variant: str, **overrides) -> SigLIPConfig:
  """Config of a named variant ('So400m/14', 'B/16', 'tiny/16', 'tiny/8') with field overrides."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown SigLIP variant {variant!r}; known: {sorted(_VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(SigLIPConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown SigLIPConfig field(s) {bad}; fields are {sorted(fields)}")
  return SigLIPConfig(variant=variant, **{**_VARIANTS[variant], **overrides})


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation, as big_vision) -> Dense."""
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = nn.gelu(x, approximate=True)
    return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6))(x)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block; a scan body (x, _) -> (x, x) so every block's output is kept."""
  config: SigLIPConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    y = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=cfg.num_heads, dtype=dtype,
                                        kernel_init=nn.initializers.xavier_uniform(),
                                        deterministic=True)(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype)(x)
    y = MlpBlock(cfg.mlp_dim, dtype)(y)
    x = x + y
    return x, x


class Encoder(nn.Module):
  """Scanned blocks + final LayerNorm; returns (normed [B, N, W], per-block outputs [L, B, N, W])."""
  config: SigLIPConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    block = Encoder1DBlock
    if cfg.remat_policy != "none":
      block = nn.remat(block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    # Per-layer dropout rngs and sown values (models/adapters.py: adapter dropout, GSE aux loss).
    x, blocks = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=cfg.depth, unroll=cfg.scan_unroll)(
                            cfg, name="encoderblock")(x, None)
    x = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name="encoder_norm")(x)
    return x, blocks


class SigLIP(nn.Module):
  """images [B, H, W, 3] float in [-1, 1] -> (tokens [B, N, D_out], out dict of intermediates).

  `out` holds 'stem' [B, N, W] (patch embedding), 'with_posemb', 'blocks' [L, B, N, W] (each block's
  output), 'encoded' [B, N, W] (after encoder_norm) and 'logits' (after `head`, equal to the tokens).
  """
  config: SigLIPConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"SigLIP images has shape {images.shape}; expected [B, {cfg.image_size}, "
                       f"{cfg.image_size}, 3] for config {cfg.variant!r}")
    out = {}
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding")(
        images.astype(dtype))
    b, h, w, c = x.shape
    x = out["stem"] = x.reshape(b, h * w, c)
    if cfg.posemb_init == "sincos2d":
      pos_init = lambda *_: jnp.asarray(posemb_sincos_2d(h, w, c))
    else:
      pos_init = nn.initializers.normal(stddev=1 / cfg.width ** 0.5)
    pos = self.param("pos_embedding", pos_init, (1, h * w, c), jnp.float32)
    x = out["with_posemb"] = x + pos.astype(dtype)
    x, out["blocks"] = Encoder(cfg, name="Transformer")(x)
    out["encoded"] = x
    if cfg.head_dim_out is not None:
      x = nn.Dense(cfg.head_dim_out, dtype=dtype, name="head")(x)
    out["logits"] = x
    return x, out

"""SigLIP encoder: published sizes vs transformers, patch layout vs numpy, intermediates, bad input."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.models import siglip  # noqa: E402


@pytest.mark.parametrize("variant", ["So400m/14", "B/16"])
def test_published_sizes_match_transformers(variant):
  """Parameter count = transformers SiglipVisionModel (no MAP head) + PaliGemma's linear projection."""
  cfg = siglip.get_config(variant, head_dim_out=2048)
  hf_cfg = tf.SiglipVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                                 num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                                 patch_size=cfg.patch_size, image_size=cfg.image_size, vision_use_head=False)
  with torch.device("meta"):
    ref = tf.SiglipVisionModel(hf_cfg)
  hf_count = sum(p.numel() for p in ref.parameters()) + cfg.width * 2048 + 2048
  shapes = jax.eval_shape(siglip.SigLIP(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
  flat = tree_util.flatten(shapes)
  assert sum(int(np.prod(s.shape)) for s in flat.values()) == hf_count
  assert flat["params/pos_embedding"].shape == (1, cfg.num_patches, cfg.width)
  assert flat["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (
      cfg.depth, cfg.width, cfg.mlp_dim)


def test_patch_embedding_and_intermediates_match_numpy():
  cfg = siglip.get_config("tiny/8", head_dim_out=24, remat_policy="none")
  model = siglip.SigLIP(cfg)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  tokens, out = jax.jit(model.apply)(params, images)
  p = params["params"]
  # Independent patchify: row-major patches, each flattened (h, w, c) against kernel [P, P, 3, W].
  patches = images.reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 8 * 8 * 3)
  stem = patches.astype(np.float64) @ np.asarray(p["embedding"]["kernel"], np.float64).reshape(-1, cfg.width)
  stem += np.asarray(p["embedding"]["bias"])
  np.testing.assert_allclose(out["stem"], stem, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["with_posemb"], stem + np.asarray(p["pos_embedding"]), rtol=1e-5, atol=1e-5)
  assert out["blocks"].shape == (cfg.depth, 2, 16, cfg.width)
  last = np.asarray(out["blocks"][-1], np.float64)
  norm = p["Transformer"]["encoder_norm"]
  ln = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + cfg.norm_eps)
  np.testing.assert_allclose(out["encoded"], ln * norm["scale"] + norm["bias"], rtol=1e-4, atol=1e-5)
  head = np.asarray(out["encoded"], np.float64) @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
  np.testing.assert_allclose(tokens, head, rtol=1e-4, atol=1e-5)
  assert tokens.shape == (2, 16, 24)


def test_bad_images_and_config():
  cfg = siglip.get_config("tiny/16")
  model = siglip.SigLIP(cfg)
  with pytest.raises(ValueError, match="images has shape"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="patch_size"):
    siglip.get_config("tiny/16", image_size=40)
  with pytest.raises(ValueError, match="unknown SigLIP variant"):
    siglip.get_config("L/99")


def test_sincos2d_position_embedding_init_matches_brute_force():
  # Reference: big_vision's posemb_sincos_2d written element by element in float64. Token n is
  # patch (row n // w, column n % w); feature block 0..3 = sin(col), cos(col), sin(row), cos(row)
  # at frequency 1 / 10000 ** (k / (W/4 - 1)).
  cfg = siglip.get_config("tiny/4", posemb_init="sincos2d")
  params = siglip.SigLIP(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  table = np.asarray(params["pos_embedding"])
  h = w = 8
  q = cfg.width // 4
  ref = np.zeros((1, h * w, cfg.width))
  for n in range(h * w):
    row, col = divmod(n, w)
    for k in range(q):
      f = 1.0 / 10_000.0 ** (k / (q - 1))
      ref[0, n, [k, q + k, 2 * q + k, 3 * q + k]] = (np.sin(col * f), np.cos(col * f),
                                                     np.sin(row * f), np.cos(row * f))
  np.testing.assert_allclose(table, ref, atol=1e-6)
  # 'normal' (the default, big_vision's 'learn') stays random, and the parameter layout is the same.
  normal = siglip.SigLIP(siglip.get_config("tiny/4")).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]["pos_embedding"]
  assert normal.shape == table.shape and not np.allclose(normal, table, atol=0.1)


def test_posemb_init_errors_name_the_field():
  with pytest.raises(ValueError, match="posemb_init='grid'; use one of"):
    siglip.get_config("tiny/8", posemb_init="grid")
  with pytest.raises(ValueError, match="posemb_init='sincos2d' needs width % 4 == 0"):
    siglip.get_config("tiny/8", width=34, num_heads=2, posemb_init="sincos2d")

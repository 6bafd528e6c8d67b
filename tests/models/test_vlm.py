"""VLM composition: shapes, camera / padding masking, query tokens, per-layer outputs, input errors.

References are the model itself run on an equivalent smaller input (a sample without the absent
camera, an unpadded instruction): masking is correct iff the masked parts leave no trace.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from m2vla_jax.models import vlm

B, C, T = 2, 2, 5


@functools.lru_cache(maxsize=None)
def _model(name="tiny"):
  cfg = vlm.get_config(name, remat_policy="none")
  model = vlm.VLM(cfg)
  images = None if cfg.img is None else np.zeros((1, 1, 32, 32, 3), np.uint8)
  image_mask = None if cfg.img is None else np.ones((1, 1), bool)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, image_mask,
                          np.ones((1, 2), np.int32), np.ones((1, 2), bool))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return cfg, model, params, jax.jit(model.apply)


def _inputs(seed=0, b=B, c=C, t=T):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (b, c, 32, 32, 3)).astype(np.uint8)
  image_mask = np.ones((b, c), bool)
  tokens = rng.integers(0, 128, (b, t)).astype(np.int32)
  token_mask = np.ones((b, t), bool)
  return images, image_mask, tokens, token_mask


def test_shapes_and_layout():
  cfg, _, params, apply = _model()
  assert set(params["params"]) == {"img", "llm", "queries"}
  assert params["params"]["queries"].shape == (cfg.num_queries, cfg.llm.width)
  out = apply(params, *_inputs())
  n_vis = C * cfg.img.num_patches
  l, d, nq = cfg.llm.depth, cfg.llm.width, cfg.num_queries
  assert out["visual"].shape == (l, B, n_vis, d) and out["visual_mask"].shape == (B, n_vis)
  assert out["text"].shape == (l, B, T, d) and out["text_mask"].shape == (B, T)
  assert out["query"].shape == (l, B, nq, d) and out["query_mask"].shape == (B, nq)
  assert out["final"].shape == (B, n_vis + T + nq, d)
  # Queries sit after the text, positions count on without gaps.
  np.testing.assert_array_equal(out["positions"][0], np.arange(n_vis + T + nq))
  assert not np.allclose(out["query"][0], out["query"][1])  # distinct layers


def test_masked_camera_leaves_no_trace():
  cfg, _, params, apply = _model()
  images, image_mask, tokens, token_mask = _inputs(1)
  image_mask[0, 1] = False
  out = apply(params, images, image_mask, tokens, token_mask)
  images2 = images.copy()
  images2[0, 1] = 255 - images2[0, 1]  # new pixels for the absent camera only
  out2 = apply(params, images2, image_mask, tokens, token_mask)
  for key in ("visual", "text", "query", "final"):
    np.testing.assert_array_equal(out[key], out2[key])
  np.testing.assert_array_equal(out["visual_mask"][0], np.repeat([True, False], cfg.img.num_patches))
  # Equivalent to the same sample with that camera not in the batch at all (gap-free positions).
  single = apply(params, images[:1, :1], image_mask[:1, :1], tokens[:1], token_mask[:1])
  n_p = cfg.img.num_patches
  for key in ("text", "query"):
    np.testing.assert_allclose(out[key][:, :1], single[key], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["visual"][:, :1, :n_p], single["visual"], rtol=1e-5, atol=1e-5)
  # And the other sample (both cameras present) is a different computation.
  assert not np.allclose(out["text"][:, 1], out2["text"][:, 0])


def test_text_padding_is_equivalent_to_a_shorter_instruction():
  _, _, params, apply = _model("tiny_gemma3")
  images, image_mask, tokens, token_mask = _inputs(2)
  token_mask[:, 3:] = False
  tokens_junk = tokens.copy()
  tokens_junk[:, 3:] = 77
  out = apply(params, images, image_mask, tokens, token_mask)
  out_junk = apply(params, images, image_mask, tokens_junk, token_mask)
  short = apply(params, images, image_mask, tokens[:, :3], token_mask[:, :3])
  np.testing.assert_array_equal(out["query"], out_junk["query"])
  np.testing.assert_allclose(out["text"][:, :, :3], short["text"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["query"], short["query"], rtol=1e-5, atol=1e-5)


def test_uint8_and_float_images_agree():
  _, _, params, apply = _model()
  images, image_mask, tokens, token_mask = _inputs(3)
  a = apply(params, images, image_mask, tokens, token_mask)
  b = apply(params, images.astype(np.float32) / 127.5 - 1.0, image_mask, tokens, token_mask)
  np.testing.assert_allclose(a["query"], b["query"], rtol=1e-5, atol=1e-5)


def test_text_only_backbone():
  cfg, _, params, apply = _model("tiny_text")
  assert "img" not in params["params"]
  _, _, tokens, token_mask = _inputs(4)
  out = apply(params, None, None, tokens, token_mask)
  assert out["visual"].shape == (cfg.llm.depth, B, 0, cfg.llm.width)
  assert out["query"].shape == (cfg.llm.depth, B, cfg.num_queries, cfg.llm.width)


@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(images=np.zeros((B, C, 48, 48, 3), np.uint8)), "images are 48x48"),
    (lambda a: a.update(images=np.zeros((B, C, 32, 32, 4), np.uint8)), "images must have 3"),
    (lambda a: a.update(images=np.zeros((B, C, 32, 32, 3), np.int32)), "images dtype int32"),
    (lambda a: a.update(images=np.full((B, C, 32, 32, 3), 200.0, np.float32)), "float images must lie"),
    (lambda a: a.update(images=np.zeros((B, 32, 32, 3), np.uint8)), "images must be"),
    (lambda a: a.update(image_mask=np.ones((B, C + 1), bool)), "image_mask must be"),
    (lambda a: a["token_mask"].__setitem__(1, False), r"token_mask is all False for sample\(s\) \[1\]"),
    (lambda a: a.update(tokens=np.ones((B, 17), np.int32), token_mask=np.ones((B, 17), bool)),
     "max_text_tokens"),
    (lambda a: a.update(tokens=np.ones((B, T), np.float32)), "tokens must be an integer"),
    (lambda a: a.update(tokens=np.full((B, T), 500, np.int32)), "tokens has ids outside"),
    (lambda a: a.update(token_mask=np.ones((B, T + 1), bool)), "token_mask must be"),
])
def test_bad_inputs_name_the_argument(change, argument):
  # Not jitted: value checks (empty instruction, id range, float range) need concrete inputs; under jit
  # only shape/dtype checks can run, and callers validate host batches with vlm.validate_inputs.
  cfg, model, params, _ = _model()
  images, image_mask, tokens, token_mask = _inputs(5)
  args = dict(images=images, image_mask=image_mask, tokens=tokens, token_mask=token_mask)
  change(args)
  with pytest.raises(ValueError, match=argument):
    model.apply(params, **args)
  with pytest.raises(ValueError, match=argument):
    vlm.validate_inputs(cfg, **args)


def test_config_validation():
  with pytest.raises(ValueError, match="unknown VLM config"):
    vlm.get_config("paligemma_99b")
  with pytest.raises(ValueError, match="num_querys"):
    vlm.get_config("tiny", num_querys=3)
  cfg = vlm.get_config("paligemma2_3b")
  assert cfg.img.head_dim_out == cfg.llm.width == 2304 and cfg.img.num_patches == 256
  assert vlm.get_config("tiny", dtype="bfloat16").img.dtype == "bfloat16"
  # Image-tower-only fields reach SigLIP and are refused where there is no image tower.
  assert vlm.get_config("tiny_p4", posemb_init="sincos2d").img.posemb_init == "sincos2d"
  assert vlm.get_config("tiny_p4").img.num_patches == 64
  with pytest.raises(ValueError, match="'tiny_text' has no image tower"):
    vlm.get_config("tiny_text", posemb_init="sincos2d")


@pytest.mark.parametrize("mode", ["readout", "bidirectional"])
def test_query_attention_decides_whether_queries_change_the_prefix(mode):
  """'readout': image/text states are the frozen VLM's whatever the queries; 'bidirectional': not."""
  cfg, model, params, _ = _model()
  model = vlm.VLM(vlm.get_config("tiny", remat_policy="none", query_attention=mode))
  apply = jax.jit(model.apply)
  inputs = _inputs(3)
  out = apply(params, *inputs)
  moved = jax.tree_util.tree_map(lambda x: x, params)
  moved["params"]["queries"] = params["params"]["queries"] + 1.0
  out2 = apply(moved, *inputs)
  assert not np.allclose(out["query"], out2["query"])
  for key in ("visual", "text"):
    if mode == "readout":
      np.testing.assert_array_equal(out[key], out2[key])
    else:
      assert not np.allclose(out[key][1:], out2[key][1:])   # layer 0 input is the same
  # The queries' positions continue after the prefix in both modes.
  n = cfg.img.num_patches * C + T
  np.testing.assert_array_equal(out["positions"][0, n:], n + np.arange(cfg.num_queries))


def test_unknown_query_attention_names_the_choices():
  with pytest.raises(ValueError, match="query_attention='causal'.*readout"):
    vlm.get_config("tiny", query_attention="causal")


@pytest.mark.parametrize("pool,feature_layer,include_cls", [(1, None, False), (2, -2, False), (2, None, True)])
def test_dinov2_tower_tokens_are_pooled_chosen_layer_patches(pool, feature_layer, include_cls):
  """VLM.image_features against the DINOv2 module's own outputs, pooled in numpy float64."""
  from m2vla_jax.models import dinov2
  cfg = vlm.get_config("tiny_dinov2", img_proj_pool=pool, img_feature_layer=feature_layer,
                       include_cls=include_cls)
  model = vlm.VLM(cfg)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 2, 56, 56, 3)).astype(np.uint8)
  tokens = np.ones((2, 3), np.int32)
  params = model.init(jax.random.PRNGKey(0), images, np.ones((2, 2), bool), tokens,
                      np.ones((2, 3), bool))["params"]
  got = np.asarray(model.apply({"params": params}, images, method=vlm.VLM.image_features), np.float64)
  _, out = dinov2.DINOv2(cfg.img).apply({"params": params["img"]}, images.reshape(4, 56, 56, 3))
  seq = np.asarray(out["encoded"] if feature_layer is None else out["blocks"][feature_layer], np.float64)
  cls, patches = seq[:, :1], seq[:, 1:].reshape(4, 4, 4, -1)
  pooled = patches.reshape(4, 4 // pool, pool, 4 // pool, pool, -1).mean(axis=(2, 4)).reshape(4, -1, 32)
  want = np.concatenate([cls, pooled], axis=1) if include_cls else pooled
  assert cfg.tokens_per_camera == want.shape[1]
  np.testing.assert_allclose(got, want.reshape(2, 2 * want.shape[1], 32), rtol=1e-5, atol=1e-5)
  # The projector maps them to the LLM width: Prismatic's Linear -> exact GELU -> Linear.
  p = params["img_proj"]
  h = got @ np.asarray(p["fc1"]["kernel"], np.float64) + np.asarray(p["fc1"]["bias"], np.float64)
  h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  h = h @ np.asarray(p["fc2"]["kernel"], np.float64) + np.asarray(p["fc2"]["bias"], np.float64)
  proj = np.asarray(model.apply({"params": params}, jnp.asarray(got, jnp.float32), method=vlm.VLM.project))
  np.testing.assert_allclose(proj, h, rtol=1e-4, atol=1e-5)


def test_dinov2_vlm_config_errors_name_the_field():
  with pytest.raises(ValueError, match="img_proj.pool=3 does not divide"):
    vlm.get_config("tiny_dinov2", img_proj_pool=3)
  with pytest.raises(ValueError, match="feature_layer=5 outside"):
    vlm.get_config("tiny_dinov2", img_feature_layer=5)
  with pytest.raises(ValueError, match="do not apply"):
    vlm.get_config("tiny", img_proj_pool=2)
  with pytest.raises(ValueError, match="do not apply"):
    vlm.get_config("tiny_dinov2", posemb_init="sincos2d")

"""Parity of our SigLIP / Gemma 1-2-3 / PaliGemma against transformers (torch CPU, float32).

The reference models get random weights (every tensor, norms included, so no parameter is silently
unused), their state dicts go through `weights.hf.convert_state_dict` and `merge_params`, and every
layer's output is compared. Tolerance: relative Frobenius error < 1e-4 per layer (float32 both sides).
The tiny Gemma 2/3 configs use sliding windows shorter than the sequence and mix local and global
layers, so window masking, per-layer RoPE bases, soft-capping and QK-norm are all exercised.
"""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.models import gemma  # noqa: E402
from m2vla_jax.models import siglip  # noqa: E402
from m2vla_jax.models import vlm  # noqa: E402
from m2vla_jax.weights import hf  # noqa: E402
from m2vla_jax.weights import merge  # noqa: E402

RTOL = 1e-4


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model.eval()


def capture_layer_outputs(layers) -> list:
  """Forward hooks collecting each layer's output hidden state, in call order."""
  outs = []

  def hook(_, __, output):
    outs.append((output[0] if isinstance(output, tuple) else output).detach().numpy())

  for layer in layers:
    layer.register_forward_hook(hook)
  return outs


def hf_gemma_config(cfg: gemma.GemmaConfig) -> tf.PretrainedConfig:
  """The transformers text config equivalent to ours."""
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                attn_implementation="eager", pad_token_id=0)
  layer_types = ["sliding_attention" if local else "full_attention" for local in cfg.layer_is_local()]
  if cfg.version == 1:
    return tf.GemmaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
  common.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                layer_types=layer_types, final_logit_softcapping=cfg.final_logit_softcap,
                attn_logit_softcapping=cfg.attn_logit_softcap)
  if cfg.version == 2:
    return tf.Gemma2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
  return tf.Gemma3TextConfig(**common, rope_parameters={
      "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local},
      "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global}})


def hf_siglip_config(cfg: siglip.SigLIPConfig) -> tf.SiglipVisionConfig:
  return tf.SiglipVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                               num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                               image_size=cfg.image_size, patch_size=cfg.patch_size,
                               layer_norm_eps=cfg.norm_eps, vision_use_head=False,
                               attn_implementation="eager")


def test_siglip_matches_transformers():
  cfg = siglip.get_config("tiny/8", remat_policy="none")
  ref = randomize(tf.SiglipVisionModel(hf_siglip_config(cfg)), seed=0)
  per_layer = capture_layer_outputs(ref.encoder.layers)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    final = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()

  model = siglip.SigLIP(cfg)
  params = merge.merge_params(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"],
      hf.convert_state_dict(ref.state_dict(), "siglip", config=cfg))
  _, out = jax.jit(model.apply)({"params": params}, images)
  assert len(per_layer) == cfg.depth
  for i in range(cfg.depth):
    assert rel_err(out["blocks"][i], per_layer[i]) < RTOL, f"layer {i}"
  assert rel_err(out["encoded"], final) < RTOL


@pytest.mark.parametrize("variant", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_gemma_matches_transformers(variant):
  cfg = gemma.get_config(variant, remat_policy="none")
  hf_cfg = hf_gemma_config(cfg)
  causal_lm = {1: tf.GemmaForCausalLM, 2: tf.Gemma2ForCausalLM, 3: tf.Gemma3ForCausalLM}[cfg.version]
  ref = randomize(causal_lm(hf_cfg), seed=1)
  per_layer = capture_layer_outputs(ref.model.layers)
  b, t = 2, 11  # longer than the tiny windows (4)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  with torch.no_grad():
    out_ref = ref(input_ids=torch.from_numpy(tokens).long(), output_hidden_states=True)

  model = gemma.Gemma(cfg)
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  mask = gemma.causal_mask(np.ones((b, t), bool))
  x0 = jnp.zeros((b, t, cfg.width))
  params = merge.merge_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x0, positions, mask)["params"],
                              hf.convert_state_dict(ref.state_dict(), "gemma", config=cfg))
  variables = {"params": params}
  x = jax.jit(lambda v, tok: model.apply(v, tok, method=model.embed))(variables, tokens)
  assert rel_err(x, out_ref.hidden_states[0].numpy()) < RTOL
  out = jax.jit(model.apply)(variables, x, positions, mask)
  assert len(per_layer) == cfg.depth
  for i in range(cfg.depth):
    assert rel_err(out["hidden"][i], per_layer[i]) < RTOL, f"layer {i}"
  assert rel_err(out["final"], out_ref.hidden_states[-1].numpy()) < RTOL
  logits = model.apply(variables, out["final"], method=model.logits)
  assert rel_err(logits, out_ref.logits.numpy()) < RTOL


def test_windows_matter_in_tiny_configs():
  """The parity above would be vacuous for windows if local == global at the test length."""
  cfg = gemma.get_config("gemma3_tiny", remat_policy="none")
  model = gemma.Gemma(cfg)
  b, t = 1, 11
  positions = np.arange(t, dtype=np.int32)[None]
  mask = gemma.causal_mask(np.ones((b, t), bool))
  x = jax.random.normal(jax.random.PRNGKey(1), (b, t, cfg.width))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, positions, mask)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  no_window = gemma.Gemma(gemma.get_config("gemma3_tiny", remat_policy="none", sliding_window=t))
  a = jax.jit(model.apply)(params, x, positions, mask)["final"]
  c = jax.jit(no_window.apply)(params, x, positions, mask)["final"]
  assert rel_err(a, c) > 1e-3
  assert cfg.layer_is_local().any() and not cfg.layer_is_local().all()


@pytest.mark.parametrize("name,num_queries", [("tiny", 0), ("tiny_gemma2", 0), ("tiny", 3),
                                              ("tiny_gemma2", 3)])
def test_paligemma_prefix_matches_transformers(name, num_queries):
  """Images + text as PaliGemma's prefix; with queries, 'readout' queries as its causal suffix.

  transformers has no learnable queries, so the reference feeds them as suffix tokens
  (token_type_ids=1) whose embedding rows, times sqrt(D) (text embeddings are scaled, our queries
  are not), are our queries. Our readout runs prefix and queries as two passes over a KV cache;
  transformers runs one masked pass.
  """
  cfg = vlm.get_config(name, num_queries=num_queries, remat_policy="none",
                       query_attention="readout")
  if cfg.llm.sliding_window is not None:
    # Inside a bidirectional prefix transformers lets the prefix block override the window, while the
    # original gemma library (and we) keep a symmetric window |i - j| < w. Real prefixes (<= ~350
    # tokens) are far below real windows (4096), so compare with a window covering the prefix; window
    # semantics themselves are pinned by the causal Gemma 2/3 parity tests above.
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, sliding_window=64))
  image_token = cfg.llm.vocab_size - 1
  hf_cfg = tf.PaliGemmaConfig(vision_config=hf_siglip_config(cfg.img), text_config=hf_gemma_config(cfg.llm),
                              image_token_index=image_token, vocab_size=cfg.llm.vocab_size,
                              projection_dim=cfg.llm.width, hidden_size=cfg.llm.width)
  ref = randomize(tf.PaliGemmaForConditionalGeneration(hf_cfg), seed=2)
  per_layer = capture_layer_outputs(ref.model.language_model.layers)

  rng = np.random.default_rng(2)
  b, c, t = 2, 2, 6
  n_img = c * cfg.img.num_patches
  images = rng.integers(0, 256, (b, c, 32, 32, 3)).astype(np.uint8)
  tokens = rng.integers(1, image_token, (b, t)).astype(np.int32)
  token_mask = np.ones((b, t), bool)
  token_mask[1, 4:] = False  # right padding in the second sample
  pixels = (images.astype(np.float32) / 127.5 - 1.0).reshape(b * c, 32, 32, 3).transpose(0, 3, 1, 2)
  query_ids = rng.integers(1, image_token, (num_queries,))
  input_ids = np.concatenate([np.full((b, n_img), image_token), tokens,
                              np.tile(query_ids, (b, 1))], axis=1)
  attention_mask = np.concatenate([np.ones((b, n_img), bool), token_mask,
                                   np.ones((b, num_queries), bool)], axis=1)
  token_type = np.concatenate([np.zeros((b, n_img + t)), np.ones((b, num_queries))], axis=1)
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref(input_ids=torch.from_numpy(input_ids).long(), pixel_values=torch.from_numpy(pixels),
        attention_mask=torch.from_numpy(attention_mask).long(),
        token_type_ids=torch.from_numpy(token_type).long(),
        position_ids=torch.from_numpy(positions).long())

  model = vlm.VLM(cfg)
  image_mask = np.ones((b, c), bool)
  params = merge.merge_params(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), images, image_mask, tokens, token_mask)["params"],
      hf.convert_state_dict(ref.state_dict(), "paligemma", config=cfg), missing_ok="queries")
  if num_queries:
    params["queries"] = params["llm"]["embedder"]["input_embedding"][query_ids] * np.sqrt(cfg.llm.width)
  out = jax.jit(model.apply)({"params": params}, images, image_mask, tokens, token_mask)
  hidden = np.concatenate([out["visual"], out["text"], out["query"]], axis=2)  # [L, B, S, D]
  assert len(per_layer) == cfg.llm.depth
  for i in range(cfg.llm.depth):
    for s in range(b):  # only valid tokens: padded rows are garbage on both sides
      valid = attention_mask[s]
      assert rel_err(hidden[i, s, valid], per_layer[i][s, valid]) < RTOL, f"layer {i} sample {s}"


def test_paligemma_converter_names_bad_keys():
  cfg = vlm.get_config("tiny", num_queries=0)
  hf_cfg = tf.PaliGemmaConfig(vision_config=hf_siglip_config(cfg.img), text_config=hf_gemma_config(cfg.llm),
                              image_token_index=cfg.llm.vocab_size - 1, vocab_size=cfg.llm.vocab_size,
                              projection_dim=cfg.llm.width, hidden_size=cfg.llm.width)
  state = tf.PaliGemmaForConditionalGeneration(hf_cfg).state_dict()
  state["model.some_adapter.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match="some_adapter"):
    hf.convert_state_dict(state, "paligemma", config=cfg)
  state.pop("model.some_adapter.weight")
  # A converted VLM lacks our 'queries': merge must name it unless allowed.
  cfg_q = vlm.get_config("tiny")
  model = vlm.VLM(cfg_q)
  b = 1
  ref = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((b, 1, 32, 32, 3), np.uint8),
                       np.ones((b, 1), bool), np.ones((b, 3), np.int32), np.ones((b, 3), bool))["params"]
  flat = hf.convert_state_dict(state, "paligemma", config=cfg_q)
  with pytest.raises(merge.CheckpointMismatchError, match="queries"):
    merge.merge_params(ref, flat)
  merged = merge.merge_params(ref, flat, missing_ok="queries")
  np.testing.assert_array_equal(merged["llm"]["embedder"]["input_embedding"],
                                state["model.language_model.embed_tokens.weight"].numpy())
  # Hub checkpoints pad the vocabulary (257152 -> 257216 rows): a <= 1% excess is trimmed, more is not.
  emb = state["model.language_model.embed_tokens.weight"]
  padded = dict(state, **{"model.language_model.embed_tokens.weight": torch.cat([emb, emb[:1]])})
  trimmed = hf.convert_state_dict(padded, "paligemma", config=cfg_q)["llm/embedder/input_embedding"]
  np.testing.assert_array_equal(trimmed, emb.numpy())
  padded = dict(state, **{"model.language_model.embed_tokens.weight": torch.cat([emb, emb[:10]])})
  with pytest.raises(merge.CheckpointMismatchError, match="llm/embedder/input_embedding"):
    merge.merge_params(ref, hf.convert_state_dict(padded, "paligemma", config=cfg_q), missing_ok="queries")


def test_safetensors_dir_loads_like_the_state_dict(tmp_path):
  """save_pretrained output (our own safetensors reader, no torch) == converting the live state dict."""
  cfg = vlm.get_config("tiny", num_queries=2)
  hf_cfg = tf.PaliGemmaConfig(vision_config=hf_siglip_config(cfg.img), text_config=hf_gemma_config(cfg.llm),
                              image_token_index=cfg.llm.vocab_size - 1, vocab_size=cfg.llm.vocab_size,
                              projection_dim=cfg.llm.width, hidden_size=cfg.llm.width)
  ref = randomize(tf.PaliGemmaForConditionalGeneration(hf_cfg), seed=3)
  ref.save_pretrained(tmp_path)
  model = vlm.VLM(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 1, 32, 32, 3), np.uint8),
                          np.ones((1, 1), bool), np.ones((1, 3), np.int32), np.ones((1, 3), bool))["params"]
  loaded = hf.load_safetensors_dir(str(tmp_path), shapes, kind="paligemma", config=cfg, missing_ok="queries")
  expected = hf.convert_state_dict(ref.state_dict(), "paligemma", config=cfg)
  flat = tree_util.flatten(loaded)
  assert flat["queries"].shape == (2, cfg.llm.width)  # left as the reference's (shape-only) leaf
  for k, v in expected.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
  # Under a prefix, as when loading into a whole policy's tree.
  wrapped = hf.load_safetensors_dir(str(tmp_path), {"vlm": shapes, "head": {"w": np.zeros(3)}},
                                    kind="paligemma", config=cfg, prefix="vlm/",
                                    missing_ok="head/.*|vlm/queries")
  np.testing.assert_array_equal(wrapped["vlm"]["llm"]["final_norm"]["scale"], expected["llm/final_norm/scale"])


def test_safetensors_reader_handles_bfloat16(tmp_path):
  from safetensors.torch import save_file
  tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
  save_file(tensors, str(tmp_path / "x.safetensors"))
  got = hf.read_safetensors(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(got["a"].astype(np.float32), tensors["a"].float().numpy())
  np.testing.assert_array_equal(got["b"], tensors["b"].numpy())

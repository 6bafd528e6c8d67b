"""Real weights: Gemma 3 270M from the packaged GGUF through our importer, tokenizer and Gemma, against
transformers' own GGUF loader (torch CPU, float32) as the independent reference."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2vla_jax.text import sentencepiece as tokenizer_lib
from m2vla_jax.core import tree_util
from m2vla_jax.evaluation import language
from m2vla_jax.models import gemma
from m2vla_jax.weights import gguf as gguf_weights

# A neutral expository paragraph, long enough for 128 tokens.
# The passage the forgetting measure scores (evaluation/language.py): one text for both.
PASSAGE, NUM_TOKENS = language.PASSAGE, language.NUM_TOKENS


def _write_tiny_gguf(path, config, params, arch="gemma3"):
  """A gemma3 GGUF written the way llama.cpp's converter writes one: torch-layout [out, in] matrices,
  RMSNorm weights stored as 1 + scale. The inverse of the importer, written from the layout docs."""
  import gguf  # pylint: disable=g-import-not-at-top
  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.width
  w = gguf.GGUFWriter(str(path), arch)
  w.add_size_label("tiny")
  w.add_block_count(config.depth)
  w.add_embedding_length(d)
  w.add_feed_forward_length(config.mlp_dim)
  w.add_head_count(n)
  w.add_head_count_kv(k)
  w.add_key_length(h)
  w.add_value_length(h)
  w.add_layer_norm_rms_eps(config.norm_eps)
  w.add_rope_freq_base(config.rope_base_global)
  w.add_sliding_window(config.sliding_window)
  w.add_sliding_window_pattern([(i + 1) % config.global_every != 0 for i in range(config.depth)])
  w.add_tokenizer_model("llama")
  w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"p{i}" for i in range(4, config.vocab_size)])
  w.add_token_scores([0.0] * config.vocab_size)
  w.add_token_types([3, 3, 3, 3] + [1] * (config.vocab_size - 4))
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  lay = params["layers"]
  w.add_tensor("token_embd.weight", params["embedder"]["input_embedding"])
  w.add_tensor("output_norm.weight", params["final_norm"]["scale"] + 1)
  for i in range(config.depth):
    attn = jax.tree.map(lambda x: x[i], lay["attn"])
    if n == k:
      q, key, value = attn["qkv_einsum"]["w"]
    else:
      q, (key, value) = attn["q_einsum"]["w"], attn["kv_einsum"]["w"]
    to_rows = lambda x: x.transpose(0, 2, 1).reshape(-1, d)  # [heads, D, H] -> [heads*H, D]
    tensors = {
        "attn_q": to_rows(q), "attn_k": to_rows(key), "attn_v": to_rows(value),
        "attn_output": attn["attn_vec_einsum"]["w"].reshape(n * h, d).T,
        "attn_q_norm": attn["_query_norm"]["scale"] + 1, "attn_k_norm": attn["_key_norm"]["scale"] + 1,
        "attn_norm": lay["pre_attention_norm"]["scale"][i] + 1,
        "post_attention_norm": lay["post_attention_norm"]["scale"][i] + 1,
        "ffn_norm": lay["pre_ffw_norm"]["scale"][i] + 1, "post_ffw_norm": lay["post_ffw_norm"]["scale"][i] + 1,
        "ffn_gate": lay["mlp"]["gating_einsum"][i, 0].T, "ffn_up": lay["mlp"]["gating_einsum"][i, 1].T,
        "ffn_down": lay["mlp"]["linear"][i].T,
    }
    for name, value in tensors.items():
      w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(value, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _random_params(config):
  model = gemma.Gemma(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, config.width)),
                          jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2, 2), bool))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("num_kv_heads", [1, 4])  # 4 == num_heads: the fused qkv_einsum layout
def test_tiny_gguf_config_and_layout(tmp_path, num_kv_heads):
  config = gemma.get_config("gemma3_tiny", num_kv_heads=num_kv_heads)
  params = _random_params(config)
  path = tmp_path / "tiny.gguf"
  _write_tiny_gguf(path, config, params)
  got_config, got = gguf_weights.load_gemma3_gguf(str(path))
  assert got_config == config
  for key, value in tree_util.flatten(params).items():
    np.testing.assert_allclose(tree_util.flatten(got)[key], value, rtol=0, atol=1e-6, err_msg=key)
  assert tree_util.flatten(got).keys() == tree_util.flatten(params).keys()


def test_non_gemma3_gguf_is_refused(tmp_path):
  config = gemma.get_config("gemma3_tiny")
  path = tmp_path / "llama.gguf"
  _write_tiny_gguf(path, config, _random_params(config), arch="llama")
  with pytest.raises(ValueError, match="general.architecture is 'llama'"):
    gguf_weights.load_gemma3_gguf(str(path))


@pytest.fixture(scope="module")
def shared_reader():
  """transformers opens the file three times (config, weights, tokenizer); parsing the 262k-entry
  vocabulary dominates, so every reader in this module comes from one cached parse. This shares the
  file parser only: transformers still maps names, shifts norms and dequantizes on its own."""
  import gguf  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, "GGUFReader", lambda path: gguf_weights.open_reader(path))
    yield gguf_weights.default_gemma3_270m_path()


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(shared_reader):
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  path = shared_reader
  folder, name = os.path.split(path)

  # Tokenizer: ours (SentencePiece proto rebuilt from the GGUF) vs transformers' GGUF tokenizer.
  tok = tokenizer_lib.Tokenizer.from_gguf(path)
  ids = tok.encode(PASSAGE)
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  assert ids == hf_tok(PASSAGE).input_ids
  assert len(ids) >= NUM_TOKENS, len(ids)
  ids = ids[:NUM_TOKENS]
  assert tok.decode(ids[1:]) == hf_tok.decode(ids[1:])

  # Ours.
  config, params = gguf_weights.load_gemma3_gguf(path)
  assert config == gemma.get_config("gemma3_270m")
  # The forward the forgetting measure uses (evaluation/language.py), so this pins it too.
  model = language.LanguageModel(config)
  tokens = np.asarray([ids], np.int32)
  ours = np.asarray(jax.jit(model.apply)({"params": {"llm": params}}, tokens), np.float64)[0]
  ppl_measure = language.perplexity(config, params, ids)
  del params

  # Reference: transformers' GGUF loader and Gemma 3, float32 on CPU.
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  hf.eval()
  with torch.no_grad():
    ref = hf(torch.tensor(tokens, dtype=torch.long)).logits[0].double().numpy()

  def nll(logits):  # next-token negative log-likelihood of ids[1:], float64
    logits = logits[:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - logits[np.arange(len(logits)), ids[1:]]

  agree = float(np.mean(ours[:-1].argmax(-1) == ref[:-1].argmax(-1)))
  ppl_ours, ppl_ref = float(np.exp(nll(ours).mean())), float(np.exp(nll(ref).mean()))
  max_diff = float(np.abs(ours - ref).max())
  print(f"\nGemma 3 270M GGUF, {NUM_TOKENS} tokens: top-1 agreement {agree:.4f}, perplexity ours "
        f"{ppl_ours:.4f} vs transformers {ppl_ref:.4f} (ratio {ppl_ours / ppl_ref:.5f}), max |logit diff| "
        f"{max_diff:.2e}")
  assert agree >= 0.99
  assert abs(ppl_ours / ppl_ref - 1) <= 0.01
  # language.perplexity (another jit of the same forward, its own NLL) gives the same number.
  assert ppl_measure == pytest.approx(ppl_ours, rel=1e-4)
  # The reference itself must be a working language model on plain English.
  assert ppl_ref < 50, ppl_ref

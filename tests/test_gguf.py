"""Real weights: Gemma 3 270M from the packaged GGUF through our importer, tokenizer and Gemma, against
transformers' own GGUF loader (torch CPU, float32) as the independent reference."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2vla_jax import tokenizer as tokenizer_lib
from m2vla_jax.models import gemma
from m2vla_jax.weights import gguf as gguf_weights

# A neutral expository paragraph, long enough for 128 tokens.
PASSAGE = (
    "The river begins as a series of small streams high in the mountains, where snow melts slowly "
    "through the spring and early summer. As the streams join together, the water gathers speed and "
    "carves a narrow valley through the rock. Farther down, the valley widens and the river slows, "
    "spreading across a broad plain where farmers grow wheat, barley and vegetables. Several towns "
    "were built along its banks because the water was useful for drinking, for irrigation and for "
    "moving goods by boat. Today the river is also a popular place for walking, fishing and watching "
    "birds, and a long path follows it from the hills to the coast. Near the sea, the river divides "
    "into many channels and forms a wide delta covered with reeds and grasses."
)
NUM_TOKENS = 128


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
  model = gemma.Gemma(config)

  @jax.jit
  def forward(params, tokens):
    t = tokens.shape[1]
    x = model.apply({"params": params}, tokens, method=gemma.Gemma.embed)
    out = model.apply({"params": params}, x, jnp.arange(t)[None], gemma.causal_mask(jnp.ones((1, t), bool)))
    return model.apply({"params": params}, out["final"], method=gemma.Gemma.logits)

  tokens = np.asarray([ids], np.int32)
  ours = np.asarray(forward(params, tokens), np.float64)[0]
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
  # The reference itself must be a working language model on plain English.
  assert ppl_ref < 50, ppl_ref

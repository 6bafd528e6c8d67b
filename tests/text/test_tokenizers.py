"""Tokenizer: round trip, batch padding and masks, errors, and the GGUF vocabulary -> SentencePiece rebuild.

Fast tests use a small SentencePiece BPE model trained here with Gemma's special-id layout; the real
Gemma 3 vocabulary is checked against transformers in tests/weights/test_gguf.py.
"""
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from m2vla_jax.text import sentencepiece as tokenizer_lib

CORPUS = [
    "pick up the red block and place it in the bowl",
    "open the top drawer of the cabinet",
    "push the green button twice",
    "move the blue cup to the left of the plate",
    "close the microwave door",
    "put the spoon in the drying rack",
    "stack the yellow cube on the orange cube",
    "turn the faucet handle to the right",
] * 20


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  folder = tmp_path_factory.mktemp("spm")
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(CORPUS))
  prefix = str(folder / "tiny")
  # Gemma's layout: pad 0, eos 1, bos 2, unk 3; BPE with byte fallback; no normalization.
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=300, model_type="bpe", pad_id=0, eos_id=1,
      bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="module")
def tok(model_path):
  return tokenizer_lib.Tokenizer.from_sentencepiece(model_path)


def test_special_ids_and_round_trip(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.vocab_size == 300
  for text in ["pick up the red block", "  spaced  out\ttext\n", "unseen words: zebra ünïcödé 🤖 42"]:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == text  # byte fallback makes every string round-trip; BOS decodes to ''
  # Independent check of the pieces: concatenated pieces spell the text with U+2581 for spaces.
  ids = tok.encode("open the drawer", add_bos=False)
  assert "".join(tok.id_to_piece(i) for i in ids) == "open\u2581the\u2581drawer"


def test_batch_is_right_padded_with_mask(tok):
  texts = ["close the microwave door", "push", "move the blue cup to the left of the plate"]
  tokens, mask = tok.tokenize_batch(texts, max_len=48)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (3, 48)
  for b, text in enumerate(texts):
    ids = tok.encode(text)
    n = len(ids)
    assert mask[b].tolist() == [True] * n + [False] * (48 - n)
    assert tokens[b, :n].tolist() == ids
    assert (tokens[b, n:] == tok.pad_id).all()


def test_empty_instruction_is_an_error(tok):
  with pytest.raises(ValueError, match=r"texts\[1\] is an empty instruction"):
    tok.tokenize_batch(["open the drawer", "  \n"], max_len=32)
  with pytest.raises(TypeError, match="wrap a single text in a list"):
    tok.tokenize_batch("open the drawer", max_len=8)


def test_overflow_errors_or_truncates(tok, model_path):
  text = "move the blue cup to the left of the plate and then close the microwave door"
  n = len(tok.encode(text))
  assert n > 6
  with pytest.raises(ValueError, match=rf"texts\[0\] has {n} tokens, more than max_len=6"):
    tok.tokenize_batch([text], max_len=6)
  tokens, mask = tok.tokenize_batch([text], max_len=6, truncate=True)
  assert tokens[0].tolist() == tok.encode(text)[:6] and mask.all()
  # The flag can also live on the tokenizer (config).
  truncating = tokenizer_lib.Tokenizer.from_sentencepiece(model_path, truncate=True)
  assert truncating.tokenize_batch([text], max_len=6)[0].tolist() == tokens.tolist()


class _FakeField:
  def __init__(self, value):
    self.value = value

  def contents(self):
    return self.value


class _FakeReader:
  """The `fields` interface of gguf.GGUFReader, holding llama.cpp-style tokenizer metadata."""

  def __init__(self, fields):
    self.fields = {k: _FakeField(v) for k, v in fields.items()}


def test_gguf_vocab_rebuild_follows_llama_cpp_conventions(model_path):
  # Write the trained model's vocabulary the way llama.cpp's converter does: every special token
  # CONTROL (unk included), an added user-defined token with real spaces.
  proto = spm_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  pieces = [p.piece for p in proto.pieces] + ["<start_of_turn>", "\u2581\u2581"]
  scores = [p.score for p in proto.pieces] + [-1000.0, -1000.0]
  types = [3 if p.type in (2, 3) else p.type for p in proto.pieces] + [3, 4]
  pieces[-1] = "  "
  reader = _FakeReader({
      "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
      "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
      "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
      "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_space_prefix": False})
  rebuilt = tokenizer_lib.Tokenizer.from_model_proto(tokenizer_lib.model_proto_from_gguf(reader))
  original = tokenizer_lib.Tokenizer.from_sentencepiece(model_path)
  assert rebuilt.vocab_size == original.vocab_size + 2
  assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (2, 1, 0)
  for text in ["pick up the red block", "zebra ünïcödé 🤖", "a b"]:
    assert rebuilt.encode(text) == original.encode(text)
  # Added special tokens are matched atomically in text (as transformers and llama.cpp do).
  start = original.vocab_size
  assert rebuilt.encode("<start_of_turn>push", add_bos=False)[0] == start
  assert rebuilt.encode("a  b", add_bos=False) == [*rebuilt.encode("a", add_bos=False), start + 1,
                                                   *rebuilt.encode("b", add_bos=False)]
  bad = _FakeReader({**{k: f.value for k, f in reader.fields.items()}, "tokenizer.ggml.model": "gpt2"})
  with pytest.raises(ValueError, match="tokenizer.ggml.model is 'gpt2'"):
    tokenizer_lib.model_proto_from_gguf(bad)


def test_missing_model_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.model"):
    tokenizer_lib.Tokenizer.from_sentencepiece(str(tmp_path / "absent.model"))


def test_word_vocabulary_ids_round_trip_and_errors():
  from m2vla_jax.text import tokenizers
  spec = tokenizers.words_spec(["Pick up the RED block", "push the green block to the goal"])
  assert spec == "words:block,goal,green,pick,push,red,the,to,up"
  tok = tokenizers.make_tokenizer(spec)
  words = spec.split(":", 1)[1].split(",")
  # BOS = 1, word i of the sorted list = i + 2; case and punctuation do not matter
  assert tok.encode("push the green block, to the goal!") == (
      [1] + [words.index(w) + 2 for w in "push the green block to the goal".split()])
  assert tok.vocab == len(words) + 2
  # the colour is one token, and two instructions differing only in it differ in one id
  a, b = tok.encode("pick up the red block"), tok.encode("pick up the green block")
  assert len(a) == len(b) == 6 and sum(x != y for x, y in zip(a, b)) == 1
  with pytest.raises(ValueError, match=r"words \['blue'\] are not in the tokenizer's word list"):
    tok.encode("pick up the blue block")
  with pytest.raises(ValueError, match=r"listed twice"):
    tokenizers.make_tokenizer("words:red,red")
  with pytest.raises(ValueError, match=r"lower-case words"):
    tokenizers.make_tokenizer("words:Red,green")
  with pytest.raises(ValueError, match=r"empty list"):
    tokenizers.make_tokenizer("words:")


def test_tokenize_never_cuts_an_instruction_silently(caplog):
  from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  words = tokenizers.make_tokenizer("words:pick,up,the,red,block")
  text = "pick up the red block"                         # BOS + 5 words = 6 tokens
  tokens, mask = tokenizers.Tokenize(words, 6)(text)
  assert mask.sum() == 6 and tokens[0] == 1
  with pytest.raises(ValueError, match=r"has 6 tokens, more than data.pipeline.max_tokens=4; raise"):
    tokenizers.Tokenize(words, 4, overflow="error")(text)
  with caplog.at_level("WARNING"):
    tok = tokenizers.Tokenize(words, 4)
    tokens, mask = tok(text)
  assert mask.all() and list(tokens) == [1] + [words.ids[w] for w in ("pick", "up", "the")]
  assert tok.truncated == 1 and "keeping its first 4 tokens" in caplog.text


def test_mjx_env_refuses_an_instruction_longer_than_max_tokens():
  from m2vla_jax.sim.mjx import rollout  # pylint: disable=g-import-not-at-top
  env = rollout.EnvParams(max_tokens=3)
  with pytest.raises(ValueError, match=r"EnvParams.max_tokens=3; raise max_tokens"):
    env.tokenize(["pick up the red block"])

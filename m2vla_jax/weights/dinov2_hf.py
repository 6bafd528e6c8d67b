"""Hugging Face `Dinov2Model` checkpoints (safetensors or state dicts) -> the tree of `models/dinov2.py`.

Owns the mapping from transformers' DINOv2 names to ours and the validation of a checkpoint against a
`DINOv2Config` before anything is converted: every missing, unexpected, duplicated or mis-shaped tensor
is named in one error (`merge.CheckpointMismatchError`), so another depth shows as missing or
unexpected `encoder.layer.N.*` tensors and another width as the first tensors whose shapes differ.

Both naming generations are accepted, per tensor:
  transformers 4 (the files published on the Hub)     transformers 5 (its in-memory names)
  attention.attention.{query,key,value}.{weight,bias} attention.{q,k,v}_proj.{weight,bias}
  attention.output.dense.{weight,bias}                attention.o_proj.{weight,bias}
  mlp.weights_in.{weight,bias}  [2M, W] (gate; up)    mlp.{gate,up}_proj.{weight,bias}    (SwiGLU)
  mlp.weights_out.{weight,bias}                       mlp.down_proj.{weight,bias}         (SwiGLU)
Everything else (embeddings.*, norm1/2, layer_scale1/2.lambda1, mlp.fc1/fc2, layernorm.*) is common.
A wrapper prefix (`dinov2.` of Dinov2ForImageClassification, `backbone.` of a detector) is detected
from where `embeddings.` / `encoder.layer.` / `layernorm.` start; keys outside it are unexpected.
`embeddings.mask_token` (used only by masked-image pretraining) is dropped; register tokens
(Dinov2WithRegisters) are not supported and are reported as unexpected.

Torch Linear weights are [out, in]; ours [in, out] with heads split out; per-layer tensors are stacked
on a leading layer axis (our blocks are scanned). Output paths are relative to the DINOv2 module.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from m2vla_jax.models import dinov2 as dinov2_lib
from m2vla_jax.weights import hf
from m2vla_jax.weights import merge

# transformers 4 per-layer suffix -> transformers 5 (our canonical names).
_V4_TO_V5 = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.weights_out": "mlp.down_proj",
}
_DROPPED = ("embeddings.mask_token", "embeddings.position_ids")
_ROOTS = ("embeddings.", "encoder.layer.", "layernorm.")
_LAYER_RX = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)")


def expected_shapes(config: dinov2_lib.DINOv2Config) -> dict[str, tuple[int, ...]]:
  """{transformers 5 name: torch shape} of every tensor a checkpoint for `config` must hold."""
  w, m, p = config.width, config.mlp_dim, config.patch_size
  shapes = {
      "embeddings.cls_token": (1, 1, w),
      "embeddings.position_embeddings": (1, 1 + config.posemb_grid ** 2, w),
      "embeddings.patch_embeddings.projection.weight": (w, 3, p, p),
      "embeddings.patch_embeddings.projection.bias": (w,),
      "layernorm.weight": (w,),
      "layernorm.bias": (w,),
  }
  per_layer = {"norm1": ((w,), (w,)), "norm2": ((w,), (w,))}
  per_layer.update({f"attention.{n}_proj": ((w, w), (w,)) for n in "qkvo"})
  if config.mlp_type == "swiglu":
    per_layer.update({"mlp.gate_proj": ((m, w), (m,)), "mlp.up_proj": ((m, w), (m,)),
                      "mlp.down_proj": ((w, m), (w,))})
  else:
    per_layer.update({"mlp.fc1": ((m, w), (m,)), "mlp.fc2": ((w, m), (w,))})
  for i in range(config.depth):
    for name, (wshape, bshape) in per_layer.items():
      shapes[f"encoder.layer.{i}.{name}.weight"] = wshape
      shapes[f"encoder.layer.{i}.{name}.bias"] = bshape
    shapes[f"encoder.layer.{i}.layer_scale1.lambda1"] = (w,)
    shapes[f"encoder.layer.{i}.layer_scale2.lambda1"] = (w,)
  return shapes


def _detect_prefix(keys) -> str:
  """The most common text before a DINOv2 root name at a '.' boundary ('' for a bare Dinov2Model)."""
  counts = collections.Counter()
  for k in keys:
    for i in [0] + [j + 1 for j, ch in enumerate(k) if ch == "."]:
      if k.startswith(_ROOTS, i):
        counts[k[:i]] += 1
        break
  return counts.most_common(1)[0][0] if counts else ""


def _with_v4_name(name: str) -> str:
  """'encoder.layer.1.attention.q_proj.weight (transformers 4: ...attention.attention.query.weight)'."""
  m = _LAYER_RX.fullmatch(name)
  v4 = {v: k for k, v in _V4_TO_V5.items()}
  if m and m.group(2) in v4:
    return f"{name} (transformers 4: {v4[m.group(2)]}.{m.group(3)})"
  if m and m.group(2) in ("mlp.gate_proj", "mlp.up_proj"):
    return f"{name} (transformers 4: half of mlp.weights_in.{m.group(3)})"
  return name


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor; bf16 has no numpy dtype, go through float32
    value = value.detach().cpu()
    return value.float().numpy() if str(value.dtype) == "torch.bfloat16" else value.numpy()
  return np.asarray(value)


def canonical_state_dict(state_dict: Mapping[str, Any], config: dinov2_lib.DINOv2Config, *,
                         names: Mapping[str, str] | None = None, source: str = "checkpoint",
                         prefix: str | None = None) -> dict[str, np.ndarray]:
  """Validated {transformers 5 name: numpy array (torch layout)}, wrapper prefix removed.

  Args:
    state_dict: transformers 4 or 5 names (mixed is fine), torch tensors or arrays.
    config: the tower the checkpoint must fit (depth, width, MLP type, patch and grid sizes).
    names: optional {key: how to show it in errors} (e.g. the ONNX initializer behind a key).
    source: a name for the checkpoint in error messages.
    prefix: the wrapper prefix; None detects it.
  Raises:
    merge.CheckpointMismatchError listing every missing, unexpected, duplicated or mis-shaped tensor.
  """
  names = dict(names or {})
  show = lambda k: f"{k} ({names[k]})" if k in names else k
  if prefix is None:
    prefix = _detect_prefix(state_dict)
  expected = expected_shapes(config)
  canonical: dict[str, np.ndarray] = {}
  original: dict[str, str] = {}  # canonical name -> key as given
  unexpected, duplicated, misshaped = [], [], []

  def put(name, value, key):
    if name in canonical:
      duplicated.append(f"{show(original[name])} and {show(key)}")
    else:
      canonical[name], original[name] = value, key

  for key, value in state_dict.items():
    if not key.startswith(prefix):
      unexpected.append(show(key))
      continue
    name = key[len(prefix):]
    if name in _DROPPED:
      continue
    m = _LAYER_RX.fullmatch(name)
    if m and m.group(2) == "mlp.weights_in" and config.mlp_type == "swiglu":
      value = _to_numpy(value)
      half = config.mlp_dim
      want = (2 * half, config.width) if m.group(3) == "weight" else (2 * half,)
      if value.shape != want:
        misshaped.append(f"{show(key)}: has {value.shape}, config expects {want} "
                         f"(gate and up, mlp_dim={half} each)")
        continue
      base = f"encoder.layer.{m.group(1)}.mlp."
      put(f"{base}gate_proj.{m.group(3)}", value[:half], key)
      put(f"{base}up_proj.{m.group(3)}", value[half:], key)
      continue
    if m and m.group(2) in _V4_TO_V5:
      name = f"encoder.layer.{m.group(1)}.{_V4_TO_V5[m.group(2)]}.{m.group(3)}"
    if name not in expected:
      unexpected.append(show(key))
      continue
    put(name, _to_numpy(value), key)

  missing = sorted(n for n in expected if n not in canonical)
  for name, value in canonical.items():
    if tuple(value.shape) != expected[name]:
      misshaped.append(f"{show(original[name])}: has {tuple(value.shape)}, config expects "
                       f"{expected[name]}")
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): "
                    + ", ".join(prefix + _with_v4_name(n) for n in _natural(missing)))
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(_natural(unexpected)))
  if duplicated:
    problems.append(f"tensors given twice ({len(duplicated)}): " + "; ".join(duplicated))
  if misshaped:
    problems.append(f"shape mismatches ({len(misshaped)}): " + "; ".join(_natural(misshaped)))
  if problems:
    cfg = (f"DINOv2Config(variant={config.variant!r}, width={config.width}, depth={config.depth}, "
           f"mlp_dim={config.mlp_dim}, mlp_type={config.mlp_type!r}, posemb_grid={config.posemb_grid})")
    raise merge.CheckpointMismatchError(f"{source} does not fit {cfg}:\n  " + "\n  ".join(problems))
  return canonical


def _natural(items):
  """Sorted with layer numbers compared as numbers (layer 2 before layer 10)."""
  return sorted(items, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def convert_state_dict(state_dict: Mapping[str, Any], config: dinov2_lib.DINOv2Config, *,
                       names: Mapping[str, str] | None = None, source: str = "checkpoint",
                       prefix: str | None = None) -> dict[str, np.ndarray]:
  """transformers Dinov2Model state dict -> flat {path: array} of `models/dinov2.py` (float32).

  Arguments and errors as `canonical_state_dict`.
  """
  sd = canonical_state_dict(state_dict, config, names=names, source=source, prefix=prefix)
  f32 = lambda a: np.asarray(a, np.float32)
  h, w = config.num_heads, config.width
  hd = w // h
  stack = lambda name: np.stack([f32(sd[f"encoder.layer.{i}.{name}"]) for i in range(config.depth)])
  out = {
      "embedding/kernel": np.transpose(f32(sd["embeddings.patch_embeddings.projection.weight"]),
                                       (2, 3, 1, 0)),
      "embedding/bias": f32(sd["embeddings.patch_embeddings.projection.bias"]),
      "cls_token": f32(sd["embeddings.cls_token"]),
      "pos_embedding": f32(sd["embeddings.position_embeddings"]),
      "Transformer/encoder_norm/scale": f32(sd["layernorm.weight"]),
      "Transformer/encoder_norm/bias": f32(sd["layernorm.bias"]),
  }
  blk = "Transformer/encoderblock/"
  att = blk + "MultiHeadDotProductAttention_0/"
  for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
    out[blk + ours + "/scale"] = stack(theirs + ".weight")
    out[blk + ours + "/bias"] = stack(theirs + ".bias")
  for ours, theirs in (("LayerScale_0", "layer_scale1"), ("LayerScale_1", "layer_scale2")):
    out[blk + ours + "/scale"] = stack(theirs + ".lambda1")
  for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
    wt = stack(f"attention.{theirs}_proj.weight")  # [L, out=(h hd), in=W]
    out[att + ours + "/kernel"] = np.swapaxes(wt, 1, 2).reshape(-1, w, h, hd)
    out[att + ours + "/bias"] = stack(f"attention.{theirs}_proj.bias").reshape(-1, h, hd)
  wt = stack("attention.o_proj.weight")  # [L, out=W, in=(h hd)]
  out[att + "out/kernel"] = np.swapaxes(wt, 1, 2).reshape(-1, h, hd, w)
  out[att + "out/bias"] = stack("attention.o_proj.bias")
  if config.mlp_type == "swiglu":
    mlp = {"SwiGLU_0/gate": "mlp.gate_proj", "SwiGLU_0/up": "mlp.up_proj", "SwiGLU_0/down": "mlp.down_proj"}
  else:
    mlp = {"MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2"}
  for ours, theirs in mlp.items():
    out[blk + ours + "/kernel"] = np.swapaxes(stack(theirs + ".weight"), 1, 2)
    out[blk + ours + "/bias"] = stack(theirs + ".bias")
  return out


def load(checkpoint: str | Mapping[str, Any], reference_params: Any, *,
         config: dinov2_lib.DINOv2Config, prefix: str = "", missing_ok: str | None = None) -> dict:
  """Reads a Dinov2Model checkpoint and merges it into `reference_params`.

  Args:
    checkpoint: a directory of *.safetensors (sharded or not), one .safetensors file, or a state dict.
    reference_params: our initialised params (or `jax.eval_shape` of them): the DINOv2 module's own
      tree, or a larger tree with `prefix` naming where the tower sits.
    config: the tower's DINOv2Config.
    prefix: prepended to every converted path (e.g. 'img/' for a tower inside a VLM's params).
    missing_ok: regex over paths allowed to keep their initial values (e.g. the VLM's 'llm/.*').
  Returns:
    `reference_params` with the checkpoint's values, cast to the reference dtypes.
  Raises:
    CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor or path.
  """
  if isinstance(checkpoint, str):
    source = f"safetensors {checkpoint}"
    state = hf.read_safetensors_dir(checkpoint)
  else:
    source, state = "state dict", checkpoint
  flat = convert_state_dict(state, config, source=source)
  flat = {prefix + k: v for k, v in flat.items()}
  return merge.merge_params(reference_params, flat, missing_ok=missing_ok, source=source)


def config_from_hf(hf_config: Mapping[str, Any] | str, **overrides) -> dinov2_lib.DINOv2Config:
  """DINOv2Config from a transformers Dinov2Config (dict, config.json path or checkpoint directory).

  The stored position grid comes from the checkpoint's `image_size` (518 -> 37); the input image size
  is ours to choose (default 224): pass image_size=... in `overrides`.
  """
  if isinstance(hf_config, str):
    path = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
    with open(path) as f:
      hf_config = json.load(f)
  c = dict(hf_config)
  for key in ("num_register_tokens",):
    if c.get(key):
      raise ValueError(f"hf_config {key}={c[key]}: DINOv2 with registers is not supported")
  size, patch = c.get("image_size", 224), c.get("patch_size", 14)
  size = size[0] if isinstance(size, (list, tuple)) else size
  patch = patch[0] if isinstance(patch, (list, tuple)) else patch
  if c.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hf_config hidden_act={c['hidden_act']!r}; DINOv2 towers use exact 'gelu'")
  if not c.get("qkv_bias", True):
    raise ValueError("hf_config qkv_bias=False is not supported (every DINOv2 checkpoint has biases)")
  width = c["hidden_size"]
  mlp = int(width * c.get("mlp_ratio", 4))
  swiglu = bool(c.get("use_swiglu_ffn", False))
  if swiglu:
    mlp = (int(mlp * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN rounding
  fields = dict(variant="hf", width=width, depth=c["num_hidden_layers"], mlp_dim=mlp,
                num_heads=c["num_attention_heads"], patch_size=patch, posemb_grid=size // patch,
                mlp_type="swiglu" if swiglu else "gelu", norm_eps=c.get("layer_norm_eps", 1e-6),
                layerscale_init=c.get("layerscale_value", 1.0))
  return dinov2_lib.DINOv2Config(**{**fields, **overrides})

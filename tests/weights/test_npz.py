"""big_vision .npz import/export: exact key layout, bf16 encoding, key checking, sub-trees, no pickles."""
import os
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m2vla_jax.core import tree_util
from m2vla_jax.models import vlm
from m2vla_jax.weights import merge
from m2vla_jax.weights import npz


@pytest.fixture(scope="module")
def tiny_params():
  """Params of the tiny VLM in the big_vision layout (shapes from the model, random float32 values)."""
  config = vlm.get_config("tiny_gemma3")
  model = vlm.VLM(config)
  s = config.img.image_size
  images = jnp.zeros((1, 1, s, s, 3), jnp.uint8)
  tokens = jnp.ones((1, 3), jnp.int32)
  # eval_shape: the layout without compiling the model; values need not come from the initialisers.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, jnp.ones((1, 1), bool), tokens,
                          jnp.ones((1, 3), bool))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def _zeros_like(tree):
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def test_member_names_are_big_vision_paths(tiny_params, tmp_path):
  path = str(tmp_path / "ckpt.npz")
  npz.save_npz(path, tiny_params)
  with zipfile.ZipFile(path) as z:
    names = {n[:-len(".npy")] for n in z.namelist()}
  # Spot-check against the layout of released PaliGemma checkpoints (docs/ARCHITECTURE.md).
  for name in ["params/img/embedding/kernel", "params/img/pos_embedding",
               "params/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel",
               "params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
               "params/img/Transformer/encoder_norm/scale", "params/img/head/kernel",
               "params/llm/embedder/input_embedding", "params/llm/layers/attn/q_einsum/w",
               "params/llm/layers/attn/kv_einsum/w", "params/llm/layers/attn/_query_norm/scale",
               "params/llm/layers/mlp/gating_einsum", "params/llm/final_norm/scale", "params/queries"]:
    assert name in names, name
  assert names == {"params/" + k for k in tree_util.flatten(tiny_params)}
  # Scanned layers are stacked on axis 0.
  depth = vlm.get_config("tiny_gemma3").llm.depth
  assert np.load(path)["params/llm/layers/mlp/linear"].shape[0] == depth


def test_float32_round_trip_is_exact(tiny_params, tmp_path):
  path = str(tmp_path / "f32.npz")
  npz.save_npz(path, tiny_params)
  loaded = npz.load_npz(path, _zeros_like(tiny_params))
  for k, v in tree_util.flatten(tiny_params).items():
    got = tree_util.flatten(loaded)[k]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, v, err_msg=k)


def test_bf16_is_written_as_void_and_read_back(tiny_params, tmp_path):
  path = str(tmp_path / "bf16.npz")
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny_params)
  npz.save_npz(path, bf16)
  # big_vision's encoding: numpy stores bf16 as 2-byte void records.
  raw = np.load(path, allow_pickle=False)["params/llm/final_norm/scale"]
  assert raw.dtype == np.dtype("V2")
  # Into a float32 model: values are the bf16-rounded ones (independent rounding via ml_dtypes).
  loaded = tree_util.flatten(npz.load_npz(path, _zeros_like(tiny_params)))
  for k, v in tree_util.flatten(tiny_params).items():
    expected = v.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert loaded[k].dtype == np.float32
    np.testing.assert_array_equal(loaded[k], expected, err_msg=k)
  # dtype= keeps bf16 end to end.
  kept = npz.load_npz(path, _zeros_like(tiny_params), dtype=jnp.bfloat16)
  leaf = tree_util.flatten(kept)["llm/embedder/input_embedding"]
  assert leaf.dtype == jnp.bfloat16
  # Reading a file written the way big_vision does (plain np.savez of ml_dtypes bf16 arrays).
  ref = str(tmp_path / "bv.npz")
  np.savez(ref, **{"params/" + k: v.astype(ml_dtypes.bfloat16)
                   for k, v in tree_util.flatten(tiny_params).items()})
  again = tree_util.flatten(npz.load_npz(ref, _zeros_like(tiny_params)))
  np.testing.assert_array_equal(again["llm/layers/mlp/linear"], loaded["llm/layers/mlp/linear"])


def _write(path, flat):
  np.savez(path, **{"params/" + k: v for k, v in flat.items()})


def test_missing_extra_and_misshaped_keys_are_named(tiny_params, tmp_path):
  ref = _zeros_like(tiny_params)
  flat = tree_util.flatten(tiny_params)

  missing = dict(flat)
  del missing["llm/final_norm/scale"]
  _write(tmp_path / "missing.npz", missing)
  with pytest.raises(merge.CheckpointMismatchError, match=r"missing keys \(1\): llm/final_norm/scale"):
    npz.load_npz(str(tmp_path / "missing.npz"), ref)

  extra = dict(flat, **{"llm/layers/attn/bogus/w": np.zeros(3, np.float32)})
  _write(tmp_path / "extra.npz", extra)
  with pytest.raises(merge.CheckpointMismatchError, match=r"unexpected keys \(1\): llm/layers/attn/bogus/w"):
    npz.load_npz(str(tmp_path / "extra.npz"), ref)

  bad = dict(flat)
  bad["img/head/kernel"] = np.zeros((3, 5), np.float32)
  _write(tmp_path / "bad.npz", bad)
  with pytest.raises(merge.CheckpointMismatchError, match=r"img/head/kernel: .* has \(3, 5\)"):
    npz.load_npz(str(tmp_path / "bad.npz"), ref)


def test_missing_ok_allows_named_partial_load(tiny_params, tmp_path):
  # A PaliGemma checkpoint has no query tokens: load it into a VLM that has them.
  flat = {k: v for k, v in tree_util.flatten(tiny_params).items() if k != "queries"}
  _write(tmp_path / "noq.npz", flat)
  ref = jax.tree.map(lambda x: np.full(x.shape, 7.0, x.dtype), tiny_params)
  with pytest.raises(merge.CheckpointMismatchError, match="queries"):
    npz.load_npz(str(tmp_path / "noq.npz"), ref)
  loaded = tree_util.flatten(npz.load_npz(str(tmp_path / "noq.npz"), ref, missing_ok="queries"))
  np.testing.assert_array_equal(loaded["queries"], 7.0)  # kept at the reference value
  np.testing.assert_array_equal(loaded["llm/layers/mlp/linear"],
                                tree_util.flatten(tiny_params)["llm/layers/mlp/linear"])


def test_subtree_selector_loads_one_tower(tiny_params, tmp_path):
  path = str(tmp_path / "full.npz")
  npz.save_npz(path, tiny_params)
  img = npz.load_npz(path + ":img", _zeros_like(tiny_params["img"]))
  np.testing.assert_array_equal(img["head"]["kernel"], tiny_params["img"]["head"]["kernel"])
  with pytest.raises(ValueError, match="no member under 'params/vit/'"):
    npz.load_npz(path + ":vit", _zeros_like(tiny_params["img"]))


def test_pickled_member_is_refused(tmp_path):
  path = str(tmp_path / "pickle.npz")
  np.savez(path, **{"params/w": np.zeros(2, np.float32),
                    "params/evil": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="'params/evil' is a pickled object array; refusing"):
    npz.load_npz(path, {"w": np.zeros(2, np.float32), "evil": np.zeros(1, np.float32)})


def test_remote_path_through_gfile(tiny_params):
  # tf.io.gfile's in-memory filesystem exercises the same code path as gs:// (no network here).
  path = "ram://ckpts/tiny.npz"
  llm = {"llm": tiny_params["llm"]}
  npz.save_npz(path, llm)
  loaded = npz.load_npz(path + ":llm", _zeros_like(tiny_params["llm"]))
  np.testing.assert_array_equal(loaded["embedder"]["input_embedding"],
                                tiny_params["llm"]["embedder"]["input_embedding"])
  with pytest.raises(FileNotFoundError, match="ram://ckpts/absent.npz"):
    npz.load_npz("ram://ckpts/absent.npz", llm)


def test_missing_local_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    npz.load_npz(os.path.join(str(tmp_path), "nope.npz"), {})

"""The pipeline on the real BridgeData RLDS sample, checked against an independent tf.data/PIL/numpy read."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from m2vla_jax.data import oxe, pipeline, statistics, testing, transforms
from m2vla_jax.data.rlds import load_dataset

SHARED = testing.shared_data_dir()
BRIDGE = os.path.join(SHARED, "octo_bridge_debug") if SHARED else None
pytestmark = pytest.mark.skipif(
    not (BRIDGE and os.path.isdir(BRIDGE)),
    reason="BridgeData sample absent: set M2VLA_SHARED_DATA to the folder holding octo_bridge_debug/")


def _binarize_reference(g):
  """Brute force: each step takes the first value >0.95 (->1) or <0.05 (->0) at or after it; if none,
  the raw last value."""
  out = []
  for t in range(len(g)):
    later = [1.0 if v > 0.95 else 0.0 for v in g[t:] if v > 0.95 or v < 0.05]
    out.append(later[0] if later else float(g[-1]))
  return np.array(out)


@pytest.fixture(scope="module")
def reference():
  """Per split: episodes read through TFDS's tf.data path, with JPEG bytes kept."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(os.path.join(BRIDGE, "bridge_dataset", "1.0.0"))
  skip = {"steps": {"observation": {f"image_{i}": tfds.decode.SkipDecoding() for i in range(4)}}}
  out = {}
  for split in ("train", "val"):
    eps = []
    for ep in tfds.as_numpy(builder.as_dataset(split=split, decoders=skip, shuffle_files=False)):
      steps = list(ep["steps"])
      state = np.stack([s["observation"]["state"] for s in steps]).astype(np.float64)
      eps.append({
          "action": np.stack([s["action"] for s in steps]).astype(np.float64),
          # The OXE 8-dim POS_EULER layout (octo's state_obs_keys ["EEF_state", None, "gripper_state"]):
          # xyz + rpy, a zero pad, the gripper.
          "state": np.concatenate([state[:, :6], np.zeros((len(steps), 1)), state[:, -1:]], 1),
          "jpeg0": [s["observation"]["image_0"] for s in steps],
          "jpeg1": [s["observation"]["image_1"] for s in steps],
          "text": [s["language_instruction"].decode() for s in steps],
      })
    out[split] = eps
  return out


@pytest.fixture(scope="module")
def loaded():
  return {s: load_dataset(BRIDGE, oxe.get_spec("bridge_dataset"), s, progress=False)
          for s in ("train", "val")}


def _config(tmp, **kw):
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.data_dir, c.datasets, c.stats_dir, c.progress = BRIDGE, "bridge", str(tmp), False
  c.update(kw)
  return c


def test_reads_25_episodes_250_steps_and_standardizes(loaded, reference):
  for split in ("train", "val"):
    ds = loaded[split]
    assert len(ds.episodes) == 25 and ds.num_steps == 250 and not ds.skipped
    assert ds.gripper_mask.tolist() == [False] * 6 + [True]
    assert ds.image_shapes == {"primary": (64, 64), "secondary": (64, 64)}
    for ep, ref in zip(ds.episodes, reference[split]):
      np.testing.assert_array_equal(ep["action"][:, :6], ref["action"][:, :6].astype(np.float32))
      np.testing.assert_array_equal(ep["action"][:, 6], _binarize_reference(ref["action"][:, 6]))
      np.testing.assert_array_equal(ep["state"], ref["state"].astype(np.float32))
      assert ep["instruction"] == ref["text"]
      assert list(ep["images"]["primary"]) == ref["jpeg0"]
      assert list(ep["images"]["secondary"]) == ref["jpeg1"]


def test_statistics_equal_numpy_and_are_cached(loaded, reference, tmp_path):
  ds = loaded["train"]
  stats = statistics.dataset_statistics(ds, str(tmp_path), progress=False)
  act = np.concatenate([np.concatenate([r["action"][:, :6], _binarize_reference(r["action"][:, 6])[:, None]],
                                       1) for r in reference["train"]])
  st = np.concatenate([r["state"] for r in reference["train"]])
  assert stats["num_steps"] == 250 and stats["num_episodes"] == 25
  for key, x in (("action", act.astype(np.float32).astype(np.float64)),
                 ("state", st.astype(np.float32).astype(np.float64))):
    ref = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
           "q01": np.quantile(x, 0.01, 0), "q99": np.quantile(x, 0.99, 0)}
    for name, value in ref.items():  # float64 both sides: 1e-12 relative.
      np.testing.assert_allclose(stats[key][name], value, rtol=1e-12, atol=1e-12, err_msg=f"{key}/{name}")
  files = list(tmp_path.glob("bridge_dataset-*.json"))
  assert len(files) == 1
  assert statistics.load_statistics(files[0]) == stats
  # A second call reads the cache: a poisoned cached value shows up.
  poisoned = dict(stats, num_steps=-1)
  statistics.save_statistics(poisoned, files[0])
  assert statistics.dataset_statistics(ds, str(tmp_path), progress=False)["num_steps"] == -1


def test_chunk_pad_masks_at_every_episode_end(loaded, tmp_path):
  ds = loaded["train"]
  c = _config(tmp_path, horizon=4, normalization="none")
  stats = statistics.compute_statistics(ds, progress=False)
  src = pipeline.FrameSource(ds, stats, c, frame_offset=0, action_dim=7, state_dim=8)
  assert len(src) == 250
  for i in range(len(src)):
    f = src[i]
    _, e, t = f["where"]
    act = ds.episodes[e]["action"]
    expect_mask = np.arange(t, t + 4) < len(act)
    np.testing.assert_array_equal(f["action_mask"], expect_mask)
    for k in range(4):
      np.testing.assert_array_equal(f["actions"][k], act[min(t + k, len(act) - 1)])
    assert f["frame_id"] == i
  # Every episode here ends without is_last: the last 3 frames of each have padded chunks.
  assert sum(not src[i]["action_mask"].all() for i in range(250)) == 25 * 3


def test_batches_follow_the_contract(loaded, tmp_path):
  c = _config(tmp_path, batch_size=16, horizon=5, max_tokens=24, image_size=(32, 40), shuffle_buffer=0)
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), seed=3, process_index=0,
                              process_count=1)
  b = next(it)
  spec = {
      ("observation", "images"): ((16, 2, 32, 40, 3), np.uint8),
      ("observation", "image_mask"): ((16, 2), np.bool_),
      ("observation", "state"): ((16, 8), np.float32),
      ("observation", "tokens"): ((16, 24), np.int32),
      ("observation", "token_mask"): ((16, 24), np.bool_),
      ("actions",): ((16, 5, 7), np.float32),
      ("action_mask",): ((16, 5), np.bool_),
      ("frame_id",): ((16,), np.int32),
  }
  for path, (shape, dtype) in spec.items():
    x = b
    for p in path:
      x = x[p]
    assert x.shape == shape and x.dtype == dtype, (path, x.shape, x.dtype)
  assert set(b) == {"observation", "actions", "action_mask", "frame_id"}
  # Bridge has no wrist camera: zeros, masked out.
  assert b["observation"]["image_mask"].tolist() == [[True, False]] * 16
  assert not b["observation"]["images"][:, 1].any()
  # bounds normalization: non-gripper dims in [-1, 1], gripper dim untouched {0, 1}.
  assert np.abs(b["actions"][..., :6]).max() <= 1.0
  assert set(np.unique(b["actions"][..., 6])) <= {0.0, 1.0}
  tok = b["observation"]["tokens"][0]
  assert tok[0] == testing.ByteTokenizer.bos and b["observation"]["token_mask"][0, 0]
  # Without the cross-epoch window shuffle a batch inside one epoch permutation has distinct frames.
  assert len(set(b["frame_id"].tolist())) == 16


def test_normalized_values_equal_numpy_formula(loaded, tmp_path):
  for mode in ("bounds", "zscore"):
    c = _config(tmp_path, batch_size=250, horizon=1, normalization=mode, shuffle_buffer=0)
    it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), split="val", process_index=0,
                                process_count=1)
    b = next(it)
    raw_a = np.concatenate([e["action"] for e in loaded["val"].episodes]).astype(np.float64)
    raw_s = np.concatenate([e["state"] for e in loaded["val"].episodes]).astype(np.float64)
    stats = it.info.statistics["bridge_dataset"]
    for key, raw, got, mask in (("action", raw_a, b["actions"][:, 0], [0] * 6 + [1]),
                                ("state", raw_s, b["observation"]["state"], [0] * 6 + [1, 0])):
      # Masked: the action's gripper and the state's zero pad (dim 6), never normalized.
      s = {k: np.asarray(v) for k, v in stats[key].items()}
      with np.errstate(divide="ignore", invalid="ignore"):  # the pad's 0 / 0, replaced below
        if mode == "zscore":
          ref = (raw - s["mean"]) / s["std"]
        else:
          ref = np.clip(2 * (raw - s["q01"]) / (s["q99"] - s["q01"]) - 1, -1, 1)
      ref = np.where(np.asarray(mask, bool), raw, ref)
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)   # float32 output


def test_decoded_images_equal_pil_decode_of_the_jpeg_bytes(reference, tmp_path):
  c = _config(tmp_path, batch_size=50, image_size=(64, 64), cameras=("primary", "secondary"),
              shuffle_buffer=0)
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), split="val", process_index=0,
                              process_count=1)
  ref_frames = [(j0, j1) for ep in reference["val"] for j0, j1 in zip(ep["jpeg0"], ep["jpeg1"])]
  seen = 0
  for b in it:
    for k, fid in enumerate(b["frame_id"]):
      for cam in range(2):
        want = np.asarray(Image.open(io.BytesIO(ref_frames[fid][cam])).convert("RGB"))
        np.testing.assert_array_equal(b["observation"]["images"][k, cam], want)
      seen += 1
  assert seen == 250


def test_resize_and_augmentation_are_deterministic_and_bounded():
  img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  out = transforms.decode_resize(buf.getvalue(), (224, 224)).astype(np.int64)
  # Reference: float64 bilinear with half-pixel centers (edge-clamped), separable brute force.
  def axis_weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
      c = min(max((o + 0.5) * n_in / n_out - 0.5, 0), n_in - 1)
      lo = int(np.floor(c))
      hi = min(lo + 1, n_in - 1)
      w[o, lo] += 1 - (c - lo)
      w[o, hi] += c - lo
    return w
  wy, wx = axis_weights(64, 224), axis_weights(64, 224)
  want = np.einsum("yh,hwc,xw->yxc", wy, img.astype(np.float64), wx)
  assert np.abs(out - want).max() <= 1.0   # uint8 rounding (OpenCV/PIL fixed point)
  pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR)).astype(np.int64)
  assert np.abs(out - pil).max() <= 1
  a = transforms.random_crop_box(np.random.default_rng(5), (0.8, 1.0), (0.9, 1.1))
  assert a == transforms.random_crop_box(np.random.default_rng(5), (0.8, 1.0), (0.9, 1.1))
  x0, y0, x1, y1 = a
  assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
  assert 0.8 * 0.9 <= (x1 - x0) * (y1 - y0) <= 1.0 + 1e-9

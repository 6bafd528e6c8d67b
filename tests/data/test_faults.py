"""Data faults (issue 15): each raises a DataError naming dataset, episode (file / shard) and field, or with
skip_bad_episodes is skipped, counted in the statistics and logged; gripper conversions match octo.

Damaged records are made by rewriting the serialized tf.train.Example records of a dataset written by
`write_rlds_dataset` (a feature deleted, shortened, of another kind; bad UTF-8), or by truncating a
shard file, which is what a failed download or a bad converter leaves behind.
"""
import json
import logging
import os
import zlib

import numpy as np
import pytest

from m2vla_jax.data import oxe, pipeline, statistics, testing
from m2vla_jax.data.errors import DataError
from m2vla_jax.data.oxe import spec as spec_lib
from m2vla_jax.data.rlds import LoadedDataset, load_dataset
from m2vla_jax.data.writer import write_rlds_dataset

F, G = oxe.Field, oxe.Gripper
F32 = np.float32


def _toy_spec(name, gripper=G.OPEN_1):
  return oxe.DatasetSpec(name, {"primary": "image"}, state=(F("observation/state"),),
                         action=(F("action", 0, 3), F("action", 3, 4, gripper=gripper)))


def _write(root, name, eps, gripper=G.OPEN_1):
  write_rlds_dataset(eps, root, name, image_encoding="png", progress=False)
  spec = _toy_spec(name, gripper)
  oxe.register(spec, overwrite=True)
  return os.path.join(root, name, "1.0.0"), spec


def _rewrite_records(vdir, edit=None, shard_lengths=None):
  """Rewrites split 'train' of the TFDS dataset at `vdir`: record i becomes edit(i, tf.train.Example)
  (None: unchanged), spread over shards of `shard_lengths` (dataset_info.json updated to match)."""
  import tensorflow as tf
  info_path = os.path.join(vdir, "dataset_info.json")
  info = json.load(open(info_path))
  split = next(s for s in info["splits"] if s["name"] == "train")
  name = info["name"]
  old = sorted(f for f in os.listdir(vdir) if f.startswith(f"{name}-train.tfrecord"))
  records = [r.numpy() for r in tf.data.TFRecordDataset([os.path.join(vdir, f) for f in old])]
  for f in old:
    os.remove(os.path.join(vdir, f))
  lengths = shard_lengths or [len(records)]
  assert sum(lengths) == len(records)
  paths, k = [], 0
  for s, n in enumerate(lengths):
    path = os.path.join(vdir, f"{name}-train.tfrecord-{s:05d}-of-{len(lengths):05d}")
    with tf.io.TFRecordWriter(path) as w:
      for i in range(k, k + n):
        ex = tf.train.Example.FromString(records[i])
        out = edit(i, ex) if edit else None
        w.write((out if out is not None else ex).SerializeToString())
    paths.append(path)
    k += n
  split["shardLengths"] = [str(n) for n in lengths]
  json.dump(info, open(info_path, "w"))
  return paths


# --- kuka: TFDS's zlib tensor encoding, in both forms -----------------------------------------------
def _kuka_steps(pose, gripper, command, compressed):
  enc = (lambda a: np.array([zlib.compress(r.astype(F32).tobytes()) for r in a], object)) \
      if compressed else (lambda a: a.astype(F32))
  t = len(pose)
  return {"is_first": np.arange(t) == 0, "observation/image": np.array([b""] * t, object),
          "observation/clip_function_input/base_pose_tool_reached": enc(pose),
          "observation/gripper_closed": enc(gripper),
          "action/world_vector": np.ones((t, 3), F32), "action/rotation_delta": np.zeros((t, 3), F32),
          "action/gripper_closedness_action": command.astype(F32)}


def test_kuka_zlib_fields_accept_decoded_tensors_and_compressed_buffers():
  rng = np.random.default_rng(0)
  pose, gripper = rng.normal(size=(5, 7)), rng.integers(0, 2, (5, 1)).astype(float)
  cmd = np.array([[0.0], [1.0], [0.0], [-1.0], [0.0]])
  spec = oxe.get_spec("kuka")
  decoded = spec_lib.standardize_episode(spec, _kuka_steps(pose, gripper, cmd, False), 0)
  packed = spec_lib.standardize_episode(spec, _kuka_steps(pose, gripper, cmd, True), 0)
  want = np.concatenate([pose, gripper], 1).astype(F32)   # POS_QUAT: xyz + quaternion + gripper = 8
  np.testing.assert_array_equal(decoded["state"], want)
  np.testing.assert_array_equal(packed["state"], want)
  np.testing.assert_array_equal(decoded["action"][:, 6], [1, 0, 0, 1, 1])   # close at 1, open at 3


def test_kuka_written_as_raw_zlib_bytes_reads_like_tfds_decoded(tmp_path):
  """A copy that stores the compressed buffers as plain bytes (what a reader skipping TFDS decoding
  sees); the TFDS-encoded form is pinned in tests/data/test_oxe_layouts.py."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(1)
  t = 4
  pose, gripper = rng.normal(size=(t, 7)).astype(F32), np.ones((t, 1), F32)
  steps = {"observation": {"image": rng.integers(0, 255, (t, 4, 4, 3), dtype=np.uint8),
                           "clip_function_input/base_pose_tool_reached":
                               [zlib.compress(p.tobytes()) for p in pose],
                           "gripper_closed": [zlib.compress(g.tobytes()) for g in gripper]},
           "action": {"world_vector": np.zeros((t, 3), F32), "rotation_delta": np.zeros((t, 3), F32),
                      "gripper_closedness_action": np.zeros((t, 1), F32)},
           "is_first": np.arange(t) == 0}
  feats = {"observation": {"image": tfds.features.Image(shape=(4, 4, 3), encoding_format="png"),
                           "clip_function_input/base_pose_tool_reached": tfds.features.Tensor(
                               shape=(), dtype=tf.string),
                           "gripper_closed": tfds.features.Tensor(shape=(), dtype=tf.string)},
           "action": {k: tfds.features.Tensor(shape=(n,), dtype=np.float32)
                      for k, n in (("world_vector", 3), ("rotation_delta", 3),
                                   ("gripper_closedness_action", 1))},
           "is_first": tfds.features.Scalar(np.bool_)}
  testing.write_tfds_episodes(str(tmp_path), "kuka", feats, [{"steps": steps}])
  ds = load_dataset(str(tmp_path), oxe.get_spec("kuka"), "train", progress=False)
  np.testing.assert_array_equal(ds.episodes[0]["state"], np.concatenate([pose, gripper], 1))


def test_kuka_bad_zlib_buffer_is_a_data_error_naming_step_and_field():
  steps = _kuka_steps(np.zeros((3, 7)), np.zeros((3, 1)), np.zeros((3, 1)), True)
  steps["observation/gripper_closed"][1] = b"not zlib"
  with pytest.raises(DataError, match=r"dataset 'kuka' episode 4 step 1 field 'observation/gripper_"
                                      r"closed': not a zlib-compressed float32 buffer"):
    spec_lib.standardize_episode(oxe.get_spec("kuka"), steps, 4)


# --- NaN in a gripper dimension ---------------------------------------------------------------------
def _steps(action):
  t = len(action)
  return {"is_first": np.arange(t) == 0, "observation/image": np.array([b""] * t, object),
          "observation/state": np.zeros((t, 2), F32), "action": np.asarray(action, F32),
          "language_instruction": np.array([b"go"] * t, object)}


@pytest.mark.parametrize("gripper,column,step", [
    (G.BINARIZE, [0, np.nan, 0, 0], 1),       # bridge: binarize would give the NaN the next value
    (G.RELATIVE, [0, 1, np.nan, -1], 2),      # rel2abs would read NaN as 'keep'
    (G.CLIP_OPEN_1, [1, 1, 0, np.inf], 3),    # clip would make +inf a valid 'open'
    (G.CLOSED_1, [0, -np.inf, 1, 1], 1),
])
def test_non_finite_gripper_raises_naming_dataset_episode_step_field(gripper, column, step):
  action = np.zeros((4, 4), F32)
  action[:, 3] = column
  spec = _toy_spec("toy_nan_gripper", gripper)
  with pytest.raises(DataError, match=rf"dataset 'toy_nan_gripper' episode 7 \(ep7\.h5\) step {step} "
                                      rf"field 'action' dim 3: non-finite value -?(nan|inf) in raw "
                                      rf"feature 'action' column 3"):
    spec_lib.standardize_episode(spec, _steps(action), 7, "ep7.h5")


def test_nan_gripper_episode_is_skipped_counted_and_reported(tmp_path, caplog):
  eps = testing.toy_episodes(3, 5, seed=2, state_dim=2)
  for e in eps:
    e["action"][:, 3] = np.linspace(0, 1, 5)
  eps[1]["action"][2, 3] = np.nan
  _, spec = _write(str(tmp_path), "toy_nan_bin", eps, gripper=G.BINARIZE)
  with pytest.raises(DataError, match=r"episode 1 .*step 2 field 'action' dim 3: non-finite value nan"):
    load_dataset(str(tmp_path), spec, "train", progress=False)
  with caplog.at_level(logging.WARNING):
    ds = load_dataset(str(tmp_path), spec, "train", skip_bad_episodes=True, progress=False)
  assert [e["episode_index"] for e in ds.episodes] == [0, 2] and [i for i, _ in ds.skipped] == [1]
  assert "skipping: dataset 'toy_nan_bin' episode 1" in caplog.text
  assert "skipped 1 of 3 episodes" in caplog.text
  stats = statistics.compute_statistics(ds, progress=False)
  assert stats["num_skipped_episodes"] == 1 and stats["skipped_episodes"][0][0] == 1
  assert "non-finite" in stats["skipped_episodes"][0][1]
  assert "1 skipped as bad" in statistics.summary(stats)
  assert "skipped episode 1: dataset 'toy_nan_bin' episode 1" in statistics.summary(stats)


# --- relative gripper thresholds: octo compares in the data's float32 --------------------------------
def test_relative_gripper_at_exactly_plus_minus_0p1_is_no_change():
  keep = np.array([0, 0.1, 0, -0.1], F32)
  # No command at all: open throughout (octo). float64 comparison would have read close/open here.
  np.testing.assert_array_equal(spec_lib.rel2abs_gripper(keep), [1, 1, 1, 1])
  x = np.array([1, -0.1, 0.1, -1, 0.1], F32)
  np.testing.assert_array_equal(spec_lib.rel2abs_gripper(x), [0, 0, 0, 1, 1])
  # Just past the threshold (next float32 up) is a command.
  past = np.array([0, np.nextafter(F32(0.1), F32(1))], F32)
  np.testing.assert_array_equal(spec_lib.rel2abs_gripper(past), [1, 0])
  # float64 data is compared in float64: 0.1 itself is still 'keep' (strict inequality).
  np.testing.assert_array_equal(spec_lib.rel2abs_gripper(np.array([0.1, 0.0])), [1, 1])
  # Through standardization (the field keeps its raw float32 dtype up to the conversion).
  action = np.zeros((4, 4), F32)
  action[:, 3] = [0, 0.1, -0.1, 0]
  out = spec_lib.standardize_episode(_toy_spec("toy_rel", G.RELATIVE), _steps(action), 0)
  np.testing.assert_array_equal(out["action"][:, 3], [1, 1, 1, 1])


# --- raw library errors become DataErrors naming the field -------------------------------------------
@pytest.fixture()
def toy5(tmp_path):
  eps = testing.toy_episodes(5, 4, seed=5, state_dim=3)
  vdir, spec = _write(str(tmp_path), "toy_raw", eps)
  return str(tmp_path), vdir, spec


def _check_raise_and_skip(root, spec, bad, pattern):
  with pytest.raises(DataError, match=pattern):
    load_dataset(root, spec, "train", progress=False)
  ds = load_dataset(root, spec, "train", skip_bad_episodes=True, progress=False)
  assert [i for i, _ in ds.skipped] == bad
  assert [e["episode_index"] for e in ds.episodes] == [i for i in range(5) if i not in bad]
  assert statistics.compute_statistics(ds, progress=False)["num_skipped_episodes"] == len(bad)
  return ds


def test_feature_missing_from_one_episode(toy5):
  root, vdir, spec = toy5
  def drop(i, ex):
    if i == 2:
      del ex.features.feature["steps/observation/state"]
      return ex
  _rewrite_records(vdir, drop)
  _check_raise_and_skip(root, spec, [2], r"dataset 'toy_raw' episode 2 \(toy_raw/train/episode_2\) "
                                         r"field 'observation/state' \[shard .*toy_raw-train\.tfrecord-"
                                         r"00000-of-00001\]: missing from this episode's record")


def test_feature_with_wrong_size_in_one_episode(toy5):
  root, vdir, spec = toy5
  def shorten(i, ex):
    if i == 1:
      del ex.features.feature["steps/action"].float_list.value[-1]
      return ex
  _rewrite_records(vdir, shorten)
  _check_raise_and_skip(root, spec, [1], r"dataset 'toy_raw' episode 1 .*field 'action' .*holds 15 "
                                         r"values, the feature spec needs 4 step\(s\) x \(4,\) = 16")


def test_feature_with_wrong_type_in_one_episode(toy5):
  root, vdir, spec = toy5
  def as_text(i, ex):
    if i == 3:
      f = ex.features.feature["steps/observation/state"]
      f.ClearField("float_list")
      f.bytes_list.value.extend([b"x"] * 12)
      return ex
  _rewrite_records(vdir, as_text)
  _check_raise_and_skip(root, spec, [3], r"dataset 'toy_raw' episode 3 .*field 'observation/state' "
                                         r".*holds a bytes_list, the feature spec needs a float_list")


def test_non_utf8_instruction(toy5):
  root, vdir, spec = toy5
  def bad_text(i, ex):
    if i == 0:
      ex.features.feature["steps/language_instruction"].bytes_list.value[2] = b"pick \xff\xfe up"
      return ex
  _rewrite_records(vdir, bad_text)
  _check_raise_and_skip(root, spec, [0], r"dataset 'toy_raw' episode 0 \(toy_raw/train/episode_0\) "
                                         r"step 2 field 'language_instruction': undecodable instruction "
                                         r"\(UnicodeDecodeError")


def test_truncated_shard_loses_its_rest_and_reading_goes_on(toy5):
  root, vdir, spec = toy5
  shards = _rewrite_records(vdir, shard_lengths=[3, 2])
  size = os.path.getsize(shards[0])
  with open(shards[0], "r+b") as f:   # cut the shard inside its second record
    f.truncate(size // 3 + 40)
  ds = _check_raise_and_skip(root, spec, [1, 2],
                             r"dataset 'toy_raw' episode 1 \[shard .*toy_raw-train\.tfrecord-00000-of-"
                             r"00002\]: unreadable, the shard is damaged from episode 1 on \(DataLossError")
  assert "2 episode(s) of this shard lost" in ds.skipped[0][1]
  # The next shard's episodes keep their indices (from the split's shard lengths).
  assert [e["file_path"] for e in ds.episodes] == ["toy_raw/train/episode_0", "toy_raw/train/episode_3",
                                                   "toy_raw/train/episode_4"]


def test_shard_shorter_than_its_split_info(toy5):
  root, vdir, spec = toy5
  _rewrite_records(vdir, shard_lengths=[5])
  info_path = os.path.join(vdir, "dataset_info.json")
  info = json.load(open(info_path))
  info["splits"][0]["shardLengths"] = ["6"]   # one episode more than the file holds
  json.dump(info, open(info_path, "w"))
  with pytest.raises(DataError, match=r"episode 5 \[shard .*\]: unreadable, .*the shard holds 5 "
                                      r"records, the split info says 6"):
    load_dataset(root, spec, "train", progress=False)


def test_unconvertible_field_names_the_field():
  """Anything numpy raises while standardizing a field is a DataError naming it."""
  steps = _steps(np.zeros((3, 4), F32))
  steps["observation/state"] = np.zeros((2, 2), F32)   # 2 steps where the episode has 3
  with pytest.raises(DataError, match=r"dataset 'toy_x' episode 0 field 'observation/state': 2 steps, "
                                      r"the episode has 3"):
    spec_lib.standardize_episode(_toy_spec("toy_x"), steps, 0)
  steps = _steps(np.zeros((3, 4), F32))
  steps["observation/state"] = np.array(["a", "b", "c"], object)
  with pytest.raises(DataError, match=r"field 'observation/state': expected numbers, got dtype object"):
    spec_lib.standardize_episode(_toy_spec("toy_x"), steps, 0)


# --- statistics: skipped count, near-constant dims, cache format -------------------------------------
def _loaded(action, state=None, name="toy_stats", skipped=()):
  spec = _toy_spec(name)
  t = len(action)
  state = np.zeros((t, 2), F32) if state is None else state
  ep = {"images": {}, "state": state.astype(F32), "action": action.astype(F32), "instruction": [""] * t,
        "episode_index": 0, "file_path": None}
  return LoadedDataset(spec=spec, path="/nowhere/toy_stats/1.0.0", version="1.0.0", split="train",
                       episodes=[ep], gripper_mask=np.array([0, 0, 0, 1], bool), image_shapes={},
                       skipped=list(skipped), action_padding_mask=np.zeros(4, bool),
                       state_padding_mask=np.array([False, True]))


def test_near_constant_dims_are_reported_and_their_handling_is_a_choice(caplog):
  rng = np.random.default_rng(3)
  action = rng.normal(size=(200, 4))
  action[:, 1] = 0.5
  action[17, 1] = 3.0                    # one outlier step in 200: q01 == q99 == 0.5
  action[:, 3] = 1.0
  action[5, 3] = 0.0                     # a gripper that is almost always open: never reported
  stats = statistics.compute_statistics(_loaded(action), progress=False)
  (nc,) = stats["near_constant"]["action"]
  assert (nc["dim"], nc["value"], nc["min"], nc["max"], nc["outlier_steps"]) == (1, 0.5, 0.5, 3.0, 1)
  assert nc["outlier_fraction"] == 1 / 200
  assert stats["near_constant"]["state"] == []   # the state is all zeros: constant, not near-constant
  assert "action dim 1 is constant 0.5 but for 1 outlier steps" in statistics.summary(stats)
  mask = np.array([0, 0, 0, 1], bool)
  with pytest.raises(DataError, match=r"dataset 'toy_stats' field 'action' dim 1: constant 0\.5 but for "
                                      r"rare outliers in \[0\.5, 3\].*Set near_constant='passthrough'"):
    statistics.normalizer(stats, "action", "bounds", mask=mask, near_constant="error")
  with caplog.at_level(logging.WARNING):
    norm = statistics.normalizer(stats, "action", "bounds", mask=mask)
  assert "dim 1: constant 0.5 but for rare outliers" in caplog.text
  out = statistics.apply_normalizer(action, norm)
  np.testing.assert_array_equal(out[:, 1], action[:, 1].astype(F32))   # passed through
  # A truly constant dim is still the zero_variance option's business, not near_constant's.
  action[17, 1] = 0.5
  stats = statistics.compute_statistics(_loaded(action), progress=False)
  assert stats["near_constant"]["action"] == []
  statistics.normalizer(stats, "action", "bounds", mask=mask, near_constant="error")
  with pytest.raises(DataError, match="dim 1: spread 0 < eps"):
    statistics.normalizer(stats, "action", "bounds", mask=mask, zero_variance="error")
  with pytest.raises(DataError, match="config.near_constant='warn'"):
    statistics.normalizer(stats, "action", "bounds", near_constant="warn")


def test_pipeline_near_constant_option(tmp_path):
  eps = testing.toy_episodes(10, 20, seed=6, state_dim=2)
  for e in eps:
    e["action"][:, 2] = -0.25
  eps[4]["action"][7, 2] = 2.0
  _write(str(tmp_path), "toy_nc", eps)
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=str(tmp_path), datasets="toy_nc", stats_dir=str(tmp_path / "s"), progress=False,
                image_size=(16, 16), cameras=("primary",), batch_size=4))
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  assert it.info.statistics["toy_nc"]["near_constant"]["action"][0]["dim"] == 2
  c.near_constant = "error"
  with pytest.raises(DataError, match=r"dataset 'toy_nc' field 'action' dim 2: constant -0\.25 but for"):
    pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)


def test_padding_dims_are_never_normalized_even_with_zero_variance_error():
  action = np.random.default_rng(4).normal(size=(50, 4))
  state = np.stack([np.random.default_rng(5).normal(size=50), np.zeros(50)], 1)  # dim 1: padding
  stats = statistics.compute_statistics(_loaded(action, state), progress=False)
  assert stats["state_padding_mask"] == [False, True]
  state_mask, action_mask = statistics.skip_masks(stats)
  norm = statistics.normalizer(stats, "state", "zscore", mask=state_mask, zero_variance="error")
  np.testing.assert_array_equal(statistics.apply_normalizer(state, norm)[:, 1], 0)
  assert action_mask.tolist() == [False, False, False, True]
  # run_normalizers (checkpoint assets) applies the same masks.
  _, s_norm, _ = statistics.run_normalizers({"normalization": "zscore", "datasets": {"toy_stats": stats}})
  np.testing.assert_array_equal(s_norm[0], [1 / stats["state"]["std"][0], 1])


def test_old_statistics_caches_are_recomputed_not_misread(tmp_path, monkeypatch):
  ds = _loaded(np.random.default_rng(6).normal(size=(30, 4)))
  fresh = statistics.dataset_statistics(ds, str(tmp_path), progress=False)
  assert fresh["format"] == statistics.FORMAT
  (path,) = list(tmp_path.glob("toy_stats-*.json"))
  # A file at the same name from an older format (no 'format', or another one) is recomputed.
  for old in ({k: v for k, v in fresh.items() if k != "format"}, dict(fresh, format=1)):
    statistics.save_statistics(dict(old, num_steps=-1), path)
    again = statistics.dataset_statistics(ds, str(tmp_path), progress=False)
    assert again["num_steps"] == 30 and again["format"] == statistics.FORMAT
  # The cache key covers the format and the skipped episodes: either change names another file.
  h = statistics.statistics_hash(ds)
  assert statistics.statistics_hash(_loaded(ds.episodes[0]["action"], skipped=[(3, "bad")])) != h
  monkeypatch.setattr(statistics, "FORMAT", statistics.FORMAT + 1)
  assert statistics.statistics_hash(ds) != h


def test_statistics_with_other_state_width_are_refused(tmp_path):
  """Statistics from before the 8-dim layouts (e.g. a checkpoint's) must not normalize new data."""
  eps = testing.toy_episodes(2, 4, seed=8, state_dim=3)
  _write(str(tmp_path), "toy_sw", eps)
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=str(tmp_path), datasets="toy_sw", stats_dir=str(tmp_path / "s"), progress=False,
                image_size=(16, 16), cameras=("primary",), batch_size=2))
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  old = json.loads(json.dumps(it.info.statistics))
  for k in statistics.STAT_NAMES:
    old["toy_sw"]["state"][k] = old["toy_sw"]["state"][k][:2]
  with pytest.raises(DataError, match=r"dataset 'toy_sw': statistics have 2 state dims, the data 3"):
    pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), statistics=old, process_index=0,
                           process_count=1)


def test_array_record_shards_read_in_order(tmp_path):
  """The random-access path (array_record shards) yields every episode with its index and shard."""
  eps = testing.toy_episodes(4, [3, 4, 5, 6], seed=9, state_dim=2)
  write_rlds_dataset(eps, str(tmp_path), "toy_ar", image_encoding="png", progress=False,
                     file_format="array_record")
  oxe.register(_toy_spec("toy_ar"), overwrite=True)
  ds = load_dataset(str(tmp_path), oxe.get_spec("toy_ar"), "train", progress=False)
  assert [len(e["action"]) for e in ds.episodes] == [3, 4, 5, 6] and not ds.skipped
  np.testing.assert_array_equal(ds.episodes[2]["state"], eps[2]["observation"]["state"])

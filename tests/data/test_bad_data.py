"""Bad data: each case raises a DataError naming dataset, episode and field, or is skipped and counted."""
import logging

import numpy as np
import pytest

from m2vla_jax.data import oxe, pipeline, statistics, testing
from m2vla_jax.data.errors import DataError
from m2vla_jax.data.rlds import load_dataset
from m2vla_jax.data.writer import write_rlds_dataset

F = oxe.Field
SPEC = oxe.DatasetSpec("toy_bad", {"primary": "image"}, state=(F("observation/state"),),
                       action=(F("action", 0, 3), F("action", 3, 4, gripper=oxe.Gripper.OPEN_1)))


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
  """toy_bad: ep0 good, ep1 NaN action, ep2 wrong image size, ep3 empty, ep4 good."""
  root = str(tmp_path_factory.mktemp("bad"))
  eps = testing.toy_episodes(5, [4, 4, 4, 4, 4], seed=3)
  eps[1]["action"][2, 1] = np.nan
  eps[2]["observation"]["image"] = np.zeros((4, 20, 16, 3), np.uint8)
  eps[3] = {"observation": {"image": np.zeros((0, 16, 16, 3), np.uint8),
                            "state": np.zeros((0, 3), np.float32)},
            "action": np.zeros((0, 4), np.float32), "language_instruction": "nothing"}
  write_rlds_dataset(eps, root, "toy_bad", image_encoding="png", variable_image_size=True,
                     allow_empty_episodes=True, progress=False)
  oxe.register(SPEC, overwrite=True)
  return root


@pytest.fixture(scope="module")
def skipped(bad_root):
  ds = load_dataset(bad_root, SPEC, "train", skip_bad_episodes=True, progress=False)
  assert [e["episode_index"] for e in ds.episodes] == [0, 4]
  return dict(ds.skipped)


def test_nan_action_raises_naming_dataset_episode_field(bad_root, skipped):
  with pytest.raises(DataError, match=r"dataset 'toy_bad' episode 1 .*step 2 field 'action' dim 1: "
                                      r"non-finite"):
    load_dataset(bad_root, SPEC, "train", progress=False)
  assert "non-finite" in skipped[1]


def test_wrong_image_shape_is_reported_and_skippable(skipped):
  assert re_search(r"dataset 'toy_bad' episode 2 .*field 'observation/image': image shape "
                   r"\(20, 16, 3\), expected \(16, 16, 3\)", skipped[2])


def test_empty_episode_is_reported_and_skippable(skipped):
  assert re_search(r"dataset 'toy_bad' episode 3 .*empty episode", skipped[3])
  assert len(skipped) == 3


def test_missing_image_key_names_the_field(bad_root):
  spec = oxe.DatasetSpec("toy_bad", {"primary": "image", "wrist": "wrist_image"},
                         state=SPEC.state, action=SPEC.action)
  with pytest.raises(DataError, match=r"dataset 'toy_bad' field 'observation/wrist_image': named by "
                                      r"the registry entry but not a step feature"):
    load_dataset(bad_root, spec, "train", progress=False)


def test_missing_dataset_directory(tmp_path):
  with pytest.raises(DataError, match=r"dataset 'toy_bad': directory .*toy_bad does not exist"):
    load_dataset(str(tmp_path / "nowhere"), SPEC, "train", progress=False)


def test_mixture_with_unknown_dataset(bad_root, tmp_path):
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=bad_root, datasets="toy_bad:1,not_a_dataset:2", stats_dir=str(tmp_path)))
  with pytest.raises(DataError, match=r"names unknown dataset 'not_a_dataset'"):
    pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"unknown dataset 'nope'"):
    oxe.get_spec("nope")


def test_zero_variance_action_dim_errors_or_passes_through(tmp_path, caplog):
  root = str(tmp_path)
  eps = testing.toy_episodes(3, 5, seed=4)
  for e in eps:
    e["action"][:, 1] = 0.25   # constant: zero variance
  write_rlds_dataset(eps, root, "toy_flat", image_encoding="png", progress=False)
  spec = oxe.DatasetSpec("toy_flat", {"primary": "image"}, state=SPEC.state, action=SPEC.action)
  oxe.register(spec, overwrite=True)
  ds = load_dataset(root, spec, "train", progress=False)
  stats = statistics.compute_statistics(ds, progress=False)
  for mode in ("zscore", "bounds"):
    with pytest.raises(DataError, match=r"dataset 'toy_flat' field 'action' dim 1: spread 0 < eps"):
      statistics.normalizer(stats, "action", mode, zero_variance="error")
    with caplog.at_level(logging.WARNING):
      norm = statistics.normalizer(stats, "action", mode, mask=np.array([0, 0, 0, 1], bool))
    assert "dim 1" in caplog.text and "passed through" in caplog.text
    out = statistics.apply_normalizer(ds.episodes[0]["action"], norm)
    np.testing.assert_array_equal(out[:, 1], 0.25)                        # unnormalized
    np.testing.assert_array_equal(out[:, 3], ds.episodes[0]["action"][:, 3])  # gripper untouched
    assert np.abs(out[:, 0] - ds.episodes[0]["action"][:, 0]).max() > 1e-3  # others normalized
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=root, datasets="toy_flat", stats_dir=str(tmp_path / "s"), progress=False,
                zero_variance="error", image_size=(16, 16)))
  with pytest.raises(DataError, match="toy_flat"):
    pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)


def test_entry_naming_a_missing_action_key_and_bad_config(bad_root, tmp_path):
  spec = oxe.DatasetSpec("toy_bad", {"primary": "image"}, state=SPEC.state,
                         action=(F("action/world_vector"),))
  with pytest.raises(DataError, match=r"field 'action/world_vector': named by the registry entry"):
    load_dataset(bad_root, spec, "train", progress=False)
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=bad_root, datasets="toy_bad", batch_size=5, stats_dir=str(tmp_path)))
  with pytest.raises(DataError, match="batch_size=5 is not divisible by process_count=2"):
    pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=2)


def re_search(pattern, text):
  import re
  return re.search(pattern, text) is not None

"""Writer round trip, weighted mixtures, host sharding and exact resume in a fresh process."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from m2vla_jax.data import oxe, pipeline, testing, transforms
from m2vla_jax.data.rlds import load_dataset
from m2vla_jax.data.writer import write_rlds_dataset
import support

F = oxe.Field


def _spec(name):
  return oxe.DatasetSpec(name, {"primary": "image"}, state=(F("observation/state"),),
                         action=(F("action", 0, 3), F("action", 3, 4, gripper=oxe.Gripper.OPEN_1)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("rlds"))
  eps_a = testing.toy_episodes(6, [5, 7, 1, 6, 8, 4], seed=1, task="pick")
  eps_b = testing.toy_episodes(4, 9, seed=2, task="push", state_dim=2, action_dim=4)
  write_rlds_dataset(eps_a, root, "toy_a", image_encoding="png", progress=False)
  write_rlds_dataset(eps_b, root, "toy_b", image_encoding="jpeg", progress=False)
  oxe.register(_spec("toy_a"), overwrite=True)
  oxe.register(_spec("toy_b"), overwrite=True)
  return root, eps_a, eps_b


def _config(root, tmp, **kw):
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=root, stats_dir=str(tmp), progress=False, image_size=(16, 16), horizon=3,
                max_tokens=8, cameras=("primary",)))
  c.update(kw)
  return c


def test_writer_round_trip(written):
  root, eps_a, _ = written
  ds = load_dataset(root, oxe.get_spec("toy_a"), "train", progress=False)
  assert len(ds.episodes) == 6 and ds.num_steps == 31
  for i, (got, want) in enumerate(zip(ds.episodes, eps_a)):
    np.testing.assert_array_equal(got["action"], want["action"])
    np.testing.assert_array_equal(got["state"], want["observation"]["state"])
    frames = [transforms.decode_image(b) for b in got["images"]["primary"]]
    np.testing.assert_array_equal(np.stack(frames), want["observation"]["image"])  # png: lossless
    assert got["instruction"] == [want["language_instruction"]] * len(want["action"])
    assert got["file_path"] == f"toy_a/train/episode_{i}"
  # Flags and metadata as RLDS defines them.
  import tensorflow_datasets as tfds
  b = tfds.builder_from_directory(os.path.join(root, "toy_a", "1.0.0"))
  ep = next(iter(b.as_dataset(split="train", shuffle_files=False)))
  steps = list(ep["steps"])
  assert [bool(s["is_first"]) for s in steps] == [True, False, False, False, False]
  assert [bool(s["is_last"]) for s in steps] == [False, False, False, False, True]


def test_writer_jpeg_is_close_to_the_source(written):
  root, _, eps_b = written
  ds = load_dataset(root, oxe.get_spec("toy_b"), "train", progress=False)
  got = transforms.decode_image(ds.episodes[0]["images"]["primary"][0]).astype(float)
  want = eps_b[0]["observation"]["image"][0].astype(float)
  assert got.shape == want.shape and np.abs(got - want).mean() < 3  # smooth gradients, TFDS's JPEG quality


def test_mixture_3_to_1_proportions(written, tmp_path):
  root, _, _ = written
  c = _config(root, tmp_path, datasets="toy_a:3,toy_b:1", batch_size=100)
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), seed=1, process_index=0,
                              process_count=1)
  ids = np.concatenate([next(it)["frame_id"] for _ in range(40)])
  which = it.info.dataset_of(ids)
  frac_a = float(np.mean(which == it.info.datasets.index("toy_a")))
  assert abs(frac_a - 0.75) <= 0.03, frac_a
  assert it.info.frame_id_ranges == {"toy_a": (0, 31), "toy_b": (31, 67)}
  # State/action dims: toy_b's 2-dim state is zero-padded to 3.
  b = next(it)
  is_b = it.info.dataset_of(b["frame_id"]) == it.info.datasets.index("toy_b")
  assert is_b.any() and not b["observation"]["state"][is_b, 2].any()


def test_hosts_get_disjoint_frames_with_the_same_mixture(written, tmp_path):
  root, _, _ = written
  c = _config(root, tmp_path, datasets="toy_a:3,toy_b:1", batch_size=8, shuffle_buffer=0)
  ids = []
  for host in range(2):
    it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), seed=4, process_index=host,
                                process_count=2)
    b = next(it)
    assert b["frame_id"].shape == (4,)
    ids.append(np.concatenate([b["frame_id"]] + [next(it)["frame_id"] for _ in range(2)]))
    frac_a = np.mean(it.info.dataset_of(ids[-1]) == 0)
    assert frac_a == 0.75
  assert not set(ids[0].tolist()) & set(ids[1].tolist())


_RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np
    from m2vla_jax.data import oxe, pipeline, testing
    F = oxe.Field
    for name in ("toy_a", "toy_b"):
      oxe.register(oxe.DatasetSpec(name, {"primary": "image"}, state=(F("observation/state"),),
                   action=(F("action", 0, 3), F("action", 3, 4, gripper=oxe.Gripper.OPEN_1))),
                   overwrite=True)
    cfg = pipeline.get_config()
    cfg.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
    cfg.update(json.loads(sys.argv[1]))
    it = pipeline.make_pipeline(cfg, tokenizer=testing.ByteTokenizer(), seed=7, process_index=0,
                                process_count=1)
    it.set_state(json.loads(open(sys.argv[2]).read()))
    out = {}
    for k in range(3):
      b = next(it)
      out[f"{k}/images"] = b["observation"]["images"]
      out[f"{k}/actions"] = b["actions"]
      out[f"{k}/frame_id"] = b["frame_id"]
      out[f"{k}/tokens"] = b["observation"]["tokens"]
    np.savez(sys.argv[3], **out)
""")


@pytest.mark.slow
def test_resume_in_a_fresh_process_gives_the_next_batches(written, tmp_path):
  root, _, _ = written
  kw = dict(datasets="toy_a:3,toy_b:1", batch_size=6, augment=True, shuffle_buffer=16)
  c = _config(root, tmp_path, **kw)
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), seed=7, process_index=0,
                              process_count=1)
  for _ in range(5):
    next(it)
  state_file = tmp_path / "state.json"
  state_file.write_text(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  cfg_json = json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in _config(root, tmp_path, **kw).to_dict().items()})
  out = tmp_path / "out.npz"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _RESUME, cfg_json, str(state_file), str(out)],
                        capture_output=True, text=True, env=env, timeout=300,
                        cwd=str(support.REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  for k, b in enumerate(expected):
    np.testing.assert_array_equal(got[f"{k}/frame_id"], b["frame_id"])
    np.testing.assert_array_equal(got[f"{k}/images"], b["observation"]["images"])  # same augmentation
    np.testing.assert_array_equal(got[f"{k}/actions"], b["actions"])
    np.testing.assert_array_equal(got[f"{k}/tokens"], b["observation"]["tokens"])


def test_shared_statistics_normalize_every_dataset_alike(written, tmp_path):
  root, eps_a, _ = written
  # toy_c: toy_a's dims, actions 5x larger: its own statistics would differ
  eps_c = testing.toy_episodes(3, 6, seed=3, task="pick")
  for e in eps_c:
    e["action"][:, :3] *= 5
  write_rlds_dataset(eps_c, root, "toy_c", image_encoding="png", progress=False)
  oxe.register(_spec("toy_c"), overwrite=True)
  c = _config(root, tmp_path, datasets="toy_a,toy_c", shared_statistics="toy_a", batch_size=16,
              shuffle_buffer=0)
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), seed=0, process_index=0,
                              process_count=1)
  info = it.info
  assert info.statistics["toy_c"] == info.statistics["toy_a"]
  from m2vla_jax.data import statistics as stats_lib
  a_norm = stats_lib.normalizer(info.statistics["toy_a"], "action", "bounds",
                                mask=np.asarray(info.statistics["toy_a"]["action_gripper_mask"]))
  seen = 0
  for _ in range(8):
    batch = next(it)
    which = info.dataset_of(batch["frame_id"])
    for b in np.flatnonzero(which == info.datasets.index("toy_c")):
      f = int(batch["frame_id"][b]) - info.frame_id_ranges["toy_c"][0]
      ep, t = divmod(f, 6)
      want = stats_lib.apply_normalizer(eps_c[ep]["action"][t:t + 1], a_norm)[0]
      np.testing.assert_allclose(batch["actions"][b, 0], want, atol=1e-5)
      seen += 1
  assert seen >= 18 // 2      # toy_c is 18 of the mixture's 49 steps; 128 frames drawn
  # one shared entry: the run's normalizers need no dataset name
  run_stats = {"normalization": "bounds", "datasets": info.statistics}
  assert stats_lib.run_normalizers(run_stats)[0] == "toy_a"
  with pytest.raises(ValueError, match="pass dataset= to pick one"):
    stats_lib.run_normalizers({"datasets": {"x": info.statistics["toy_a"],
                                            "y": stats_lib.dataset_statistics(
                                                load_dataset(root, oxe.get_spec("toy_c"), "train",
                                                             progress=False), str(tmp_path),
                                                progress=False)}})
  with pytest.raises(Exception, match=r"shared_statistics='toy_z' is not a dataset of the mixture"):
    pipeline.make_dataset(_config(root, tmp_path, datasets="toy_a,toy_c", shared_statistics="toy_z"),
                          tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  with pytest.raises(Exception, match=r"dataset 'toy_b' has \(state, action\) dims \(2, 4\)"):
    pipeline.make_dataset(_config(root, tmp_path, datasets="toy_a,toy_b", shared_statistics="toy_a"),
                          tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)


def test_shuffle_views_are_safe_under_concurrent_readers():
  # Grain reads with several threads; the permutation caches evicted entries racily (KeyError in a
  # CI run). A 2-element base makes every other index a new epoch, and a tiny switch interval makes
  # threads interleave inside the eviction: the old cache failed 5 of 5 runs of this.
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  old = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)
  try:
    for view in (pipeline.EpochShuffle([0, 1], seed=3),
                 pipeline.WindowShuffle(pipeline.EpochShuffle(list(range(6)), 3), 2, 4)):
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(view.__getitem__, range(20000)))
      assert got == [view[i] for i in range(20000)]      # the values of a single reader
  finally:
    sys.setswitchinterval(old)
  epoch = [pipeline.EpochShuffle(list(range(7)), 3)[i] for i in range(7, 14)]
  assert sorted(epoch) == list(range(7))                 # an epoch is a permutation of the base

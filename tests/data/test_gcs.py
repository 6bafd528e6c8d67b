"""The RLDS input pipeline reading gs:// and caching its statistics there, against the GCS emulator.

Which layer does the I/O (docs/GCS.md), each a real client talking HTTP to tests/gcs_emulator.py:
  dataset directory, dataset_info.json, features.json (`rlds.version_dir`, TFDS's builder_from_directory)
      etils.epath: TF's gfile by default (as on a pod), gcsfs with EPATH_USE_TF=false
  tfrecord shards (`tf.data.TFRecordDataset`)
      always TensorFlow's own GCS filesystem, whose endpoints are fixed: it reaches the emulator through
      tests/gcs_tls_proxy.py (an HTTPS proxy terminating TLS with a throwaway CA)
  statistics cache (`statistics.dataset_statistics`): etils.epath, as the dataset directory
Both epath backends are tested. The reference is the same dataset read from local disk by the same
program: the batches must be equal exactly (same bytes in, same code).
"""
import json
import os
import urllib.error
import urllib.parse
import urllib.request

from etils import epath
import numpy as np
import pytest

import gcs_emulator
import gcs_tls_proxy
from m2vla_jax.data import oxe, pipeline, statistics, testing
from m2vla_jax.data.writer import write_rlds_dataset

BUCKET = "m2vla-data"
NAME = "toy_gcs"
F = oxe.Field


@pytest.fixture(scope="module")
def gcs():
  """(emulator, TLS proxy), with this process's environment pointing gcsfs, tensorstore and TF at them."""
  emu = gcs_emulator.Emulator(BUCKET)
  proxy = gcs_tls_proxy.TlsProxy(emu.port)
  old = gcs_emulator.set_env({**emu.env, **proxy.env})
  yield emu, proxy
  gcs_emulator.set_env(old)
  proxy.stop()
  emu.stop()


@pytest.fixture(params=["tf", "gcsfs"])
def backend(request, gcs):
  """etils.epath's gs:// backend: TF's gfile (the default with TensorFlow installed) or gcsfs."""
  old = gcs_emulator.set_env({"EPATH_USE_TF": None if request.param == "tf" else "false"})
  yield request.param
  gcs_emulator.set_env(old)


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
  """A tiny tfrecord RLDS dataset on local disk (png, so decoded frames are exact), and its registry entry."""
  root = str(tmp_path_factory.mktemp("rlds"))
  eps = testing.toy_episodes(5, [6, 3, 7, 5, 4], seed=5, task="stack")
  write_rlds_dataset(eps, root, NAME, image_encoding="png", progress=False)
  oxe.register(oxe.DatasetSpec(NAME, {"primary": "image"}, state=(F("observation/state"),),
                               action=(F("action", 0, 3), F("action", 3, 4, gripper=oxe.Gripper.OPEN_1))),
               overwrite=True)
  return root


def _objects(emu, prefix):
  url = (f"http://127.0.0.1:{emu.port}/storage/v1/b/{emu.bucket}/o?"
         f"prefix={urllib.parse.quote(prefix, safe='')}")
  with urllib.request.urlopen(url, timeout=10) as r:
    return sorted(o["name"] for o in json.load(r).get("items", []))


def _upload(local_dir, dest):
  """Copies a local directory tree to gs:// through epath (whichever backend is active)."""
  for p in epath.Path(local_dir).iterdir():
    if p.is_dir():
      _upload(p, dest / p.name)
    else:
      (dest / p.name).write_bytes(p.read_bytes())


def _config(data_dir, stats_dir):
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(datasets=NAME, data_dir=data_dir, stats_dir=stats_dir, progress=False, image_size=(16, 16),
                horizon=3, max_tokens=8, cameras=("primary",), batch_size=8, shuffle_buffer=16))
  return c


def _batches(config, n=4):
  it = pipeline.make_pipeline(config, tokenizer=testing.ByteTokenizer(), seed=3, process_index=0,
                              process_count=1)
  return [next(it) for _ in range(n)], it.info


def _assert_batches_equal(got, want):
  for g, w in zip(got, want):
    flat_g, flat_w = _flatten(g), _flatten(w)
    assert flat_g.keys() == flat_w.keys()
    for k in flat_w:
      assert flat_g[k].dtype == flat_w[k].dtype, k
      np.testing.assert_array_equal(flat_g[k], flat_w[k], err_msg=k)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def test_tensorflow_gfile_reaches_the_emulator(gcs):
  """The plumbing: TF's own GCS client writes, lists, reads and renames objects in the emulator."""
  import tensorflow as tf
  emu, proxy = gcs
  tf.io.gfile.makedirs(f"gs://{BUCKET}/plumbing/d")   # empty marker objects `plumbing/`, `plumbing/d/`
                                                      # (zero-length uploads: gcs_emulator, item 4)
  with tf.io.gfile.GFile(f"gs://{BUCKET}/plumbing/d/a.bin", "wb") as f:
    f.write(b"\x00\x01" * 300_000)                    # a resumable upload with a chunked body
  tf.io.gfile.rename(f"gs://{BUCKET}/plumbing/d/a.bin", f"gs://{BUCKET}/plumbing/d/b.bin")
  assert tf.io.gfile.listdir(f"gs://{BUCKET}/plumbing/d") == ["b.bin"]
  with tf.io.gfile.GFile(f"gs://{BUCKET}/plumbing/d/b.bin", "rb") as f:
    assert f.read() == b"\x00\x01" * 300_000
  assert _objects(emu, "plumbing/") == ["plumbing/", "plumbing/d/", "plumbing/d/b.bin"]
  assert int(emu.object("plumbing/d/b.bin")["size"]) == 600_000
  assert {h for h, _, _ in proxy.requests} == {"www.googleapis.com", "storage.googleapis.com"}


def test_pipeline_reads_gcs_and_caches_statistics_there(gcs, backend, local_root, tmp_path, monkeypatch):
  emu, proxy = gcs
  prefix = f"{backend}/"
  _upload(os.path.join(local_root, NAME), epath.Path(f"gs://{BUCKET}/{prefix}data/{NAME}"))
  assert f"{prefix}data/{NAME}/1.0.0/dataset_info.json" in _objects(emu, prefix)
  want, want_info = _batches(_config(local_root, str(tmp_path / "stats")))

  calls = []
  compute = statistics.compute_statistics
  monkeypatch.setattr(statistics, "compute_statistics", lambda *a, **k: calls.append(1) or compute(*a, **k))
  gs_config = _config(f"gs://{BUCKET}/{prefix}data", f"gs://{BUCKET}/{prefix}stats")
  del proxy.requests[:]
  got, info = _batches(gs_config)
  _assert_batches_equal(got, want)   # exact: the same bytes through the same program
  assert len(calls) == 1
  # Same numbers as the local run; only the dataset path (and so the cache key) differs.
  stats, want_stats = info.statistics[NAME], want_info.statistics[NAME]
  assert stats["path"] == f"gs://{BUCKET}/{prefix}data/{NAME}/1.0.0"
  assert {k: v for k, v in stats.items() if k not in ("path", "hash")} == \
      {k: v for k, v in want_stats.items() if k not in ("path", "hash")}

  # The cache is one object on gs:// (no temporary object beside it), holding those statistics.
  cache = f"{prefix}stats/{NAME}-{stats['hash']}.json"
  assert [n for n in _objects(emu, f"{prefix}stats/") if not n.endswith("/")] == [cache]
  generation = emu.object(cache)["generation"]
  with urllib.request.urlopen(f"http://127.0.0.1:{emu.port}/storage/v1/b/{BUCKET}/o/"
                              f"{urllib.parse.quote(cache, safe='')}?alt=media", timeout=10) as r:
    assert json.load(r) == stats

  # The shards went through TF's own GCS client (the proxy); the dataset directory through epath's backend.
  requests = [(h, m, urllib.parse.unquote(p)) for h, m, p in proxy.requests]
  shard_reads = [p for h, m, p in requests if h == "storage.googleapis.com" and ".tfrecord-" in p]
  assert shard_reads and all(f"/{BUCKET}/{prefix}data/{NAME}/1.0.0/" in p for p in shard_reads)
  info_via_tf = any("dataset_info.json" in p for _, _, p in requests)
  assert info_via_tf == (backend == "tf")

  # A second pipeline (as after a restart) reads the cache from gs:// instead of recomputing.
  again, info2 = _batches(gs_config)
  assert len(calls) == 1
  assert emu.object(cache)["generation"] == generation   # not rewritten
  assert info2.statistics[NAME] == stats
  _assert_batches_equal(again, want)

"""Input pipeline throughput: our grain pipeline vs a straightforward tf.data pipeline, same work.

Both read the BridgeData sample (octo_bridge_debug), chunk actions (horizon 4), decode JPEGs, resize to
224x224 (bilinear), pad the absent wrist camera with zeros, and batch 32 frames; each runs in its own
subprocess (so peak RSS is its own) pinned to at most 2 cores. Frames/s is measured after a warm-up.

  python bench/data.py [--batches 60] [--threads 2]
Last line: the ratio ours / tf.data (higher is better).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
B, H, RES = 32, 4, 224


def _timed(it, batches: int, t0: float, images_of) -> dict:
  """Frames/s over `batches` batches after 5 warm-up batches (setup = start until warm)."""
  for _ in range(5):
    next(it)
  setup = time.perf_counter() - t0
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t
  assert tuple(images_of(b).shape) == (B, 2, RES, RES, 3)
  return {"fps": batches * B / dt, "setup_s": setup}


def _bridge_dir() -> str:
  from m2vla_jax.data import testing
  shared = testing.shared_data_dir()
  if not shared:
    sys.exit("shared data not found: set M2VLA_SHARED_DATA")
  return os.path.join(shared, "octo_bridge_debug")


def run_ours(batches: int, threads: int) -> dict:
  import tempfile
  from m2vla_jax.data import pipeline, testing
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=_bridge_dir(), datasets="bridge", batch_size=B, horizon=H, image_size=(RES, RES),
                stats_dir=tempfile.mkdtemp(), progress=False, num_threads=threads, prefetch=4))
  t0 = time.perf_counter()
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  return _timed(it, batches, t0, lambda b: b["observation"]["images"])


def run_tfdata(batches: int, threads: int) -> dict:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = threads
  t0 = time.perf_counter()
  builder = tfds.builder_from_directory(os.path.join(_bridge_dir(), "bridge_dataset", "1.0.0"))
  skip = {"steps": {"observation": {f"image_{i}": tfds.decode.SkipDecoding() for i in range(4)}}}
  ds = builder.as_dataset(split="train", decoders=skip, shuffle_files=False)

  def traj(ep):
    steps = ep["steps"].batch(100_000).get_single_element()
    act = steps["action"]
    n = tf.shape(act)[0]
    idx = tf.range(n)[:, None] + tf.range(H)[None, :]
    mask = idx < n
    chunks = tf.gather(act, tf.minimum(idx, n - 1))
    return tf.data.Dataset.from_tensor_slices({
        "image": steps["observation"]["image_0"], "state": steps["observation"]["state"],
        "actions": chunks, "action_mask": mask, "text": steps["language_instruction"]})

  def frame(f):
    img = tf.image.resize(tf.io.decode_jpeg(f["image"], channels=3), (RES, RES), "bilinear")
    img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    images = tf.stack([img, tf.zeros_like(img)])
    return {"images": images, "image_mask": tf.constant([True, False]), "state": f["state"],
            "actions": f["actions"], "action_mask": f["action_mask"], "text": f["text"]}

  ds = (ds.flat_map(traj).cache().repeat().shuffle(1000, seed=0)
        .map(frame, num_parallel_calls=tf.data.AUTOTUNE).batch(B, drop_remainder=True)
        .prefetch(4).with_options(opts))
  it = iter(tfds.as_numpy(ds))
  return _timed(it, batches, t0, lambda b: b["images"])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", type=int, default=60)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--variant", choices=["ours", "tfdata"])
  a = p.parse_args()
  if a.variant:
    try:
      os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    except (AttributeError, OSError):
      pass
    out = (run_ours if a.variant == "ours" else run_tfdata)(a.batches, a.threads)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))
    return
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  res = {}
  for variant in ("tfdata", "ours"):
    proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--batches", str(a.batches),
                           "--threads", str(a.threads)], capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    res[variant] = json.loads(line[-1][7:])
  print(f"bridge sample, {RES}px, horizon {H}, batch {B}, <=2 cores, {a.batches} timed batches")
  print(f"{'pipeline':<10} {'frames/s':>10} {'setup s':>9} {'peak RSS MiB':>13}")
  for k, r in res.items():
    print(f"{k:<10} {r['fps']:>10.0f} {r['setup_s']:>9.1f} {r['peak_rss_mib']:>13.0f}")
  print(f"ours / tf.data frames/s ratio: {res['ours']['fps'] / res['tfdata']['fps']:.2f}")


if __name__ == "__main__":
  main()

"""Policy server over loopback vs the in-process call, same run: latency, throughput, warm-up.

The run is a bundle (`--bundle`), a training run (`--workdir`), or, by default, one trained here for
2 steps: the debug config's M²-VLA (tiny SigLIP + 2-layer Gemma, 32 px, two cameras) on the bridge
sample (`--model=m2vla`, needs the shared sample), or the toy policy on synthetic data (`--model=toy`).

  in-process   `ObservationEncoder` + `InferencePolicy` in this process (what a simulator calls)
  loopback     `PolicyClient.infer` against `python -m m2vla_jax.serve` on 127.0.0.1 (a subprocess),
               batch 1, one client: per-chunk round trip, p50 / p99 over --iters requests
  throughput   chunks/s with 1 / 4 / 16 concurrent clients (threads of this process, one connection
               each), server without micro-batching (max_batch=1) and with it (max_batch=16,
               --max_wait_ms)
  warm-up      seconds the server compiled before opening its port (metadata `warmup_s`) and from
               process start to accepting connections

Both servers and the in-process policy share the machine's cores; nothing else should run.
Last line: loopback p50 / in-process p50 at batch 1 (goal <= 1.2 for the default policy).

  python bench/serve.py [--model m2vla|toy] [--bundle DIR | --workdir RUN] [--iters 200] [--seconds 4]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from m2vla_jax import inference  # noqa: E402
from m2vla_jax.data import testing as data_testing  # noqa: E402
from m2vla_jax.inference import observation as obs_lib  # noqa: E402
from m2vla_jax.serving import client as client_lib  # noqa: E402
from m2vla_jax.training import trainer  # noqa: E402


def _debug_config(arg: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("debug_config", REPO / "configs" / "debug.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.progress_bar, c.eval_every, c.checkpoint.every = False, 0, 2
  return c


def train_run(model: str, out: str) -> str:
  """A 2-step run of the debug config; returns its bundle."""
  workdir = os.path.join(out, "run")
  if model == "m2vla":
    shared = data_testing.shared_data_dir()
    if shared is None:
      raise SystemExit("--model=m2vla trains on the shared bridge sample, which is not present; "
                       "use --model=toy or --bundle")
    c = _debug_config(f"steps=2,batch=8,model=m2vla,data=rlds,"
                      f"data_dir={os.path.join(shared, 'octo_bridge_debug')}")
  else:
    c = _debug_config("steps=2,batch=8")
    with c.unlocked():   # the settings an RLDS run records, so raw observations can be encoded
      c.data.tokenizer = "bytes_mod:64"
      c.data.pipeline = ml_collections.ConfigDict(dict(cameras=("primary", "wrist"), image_size=(16, 16),
                                                       max_tokens=8, data_dir=workdir))
  os.makedirs(workdir, exist_ok=True)
  trainer.train(c, workdir)
  return inference.export(workdir, os.path.join(out, "bundle"))


def observation(metadata_like: dict, seed: int, side: int = 64) -> dict:
  rng = np.random.default_rng(seed)
  c = len(metadata_like["cameras"])
  return {"images": rng.integers(0, 256, (1, c, side, side, 3), dtype=np.uint8),
          "image_mask": np.ones((1, c), bool),
          "state": rng.normal(size=(1, metadata_like["state_dim"])).astype(np.float32),
          "instruction": ["put the spoon in the pot"]}


def percentiles(ms: list[float]) -> tuple[float, float]:
  return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


class Server:
  def __init__(self, bundle: str, *args: str):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    self.t0 = time.perf_counter()
    self.proc = subprocess.Popen([sys.executable, "-m", "m2vla_jax.serve", f"--bundle={bundle}",
                                  "--port=0", *args], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
    for line in self.proc.stdout:
      if line.startswith("serving ws://"):
        self.uri, self.start_s = line.split()[1], time.perf_counter() - self.t0
        break
    else:
      raise SystemExit(f"server {args} exited with {self.proc.wait()}")

  def stop(self):
    self.proc.terminate()
    self.proc.wait(timeout=30)


def throughput(uri: str, clients: int, seconds: float, md: dict) -> float:
  """Chunks per second answered to `clients` concurrent connections, each sending back to back."""
  conns = [client_lib.PolicyClient(uri, timeout_s=120) for _ in range(clients)]
  obs = [observation(md, seed=k) for k in range(clients)]
  for c, o in zip(conns, obs):
    c.infer(o)                                  # connections open and warm
  counts, stop = [0] * clients, threading.Event()

  def run(k):
    while not stop.is_set():
      conns[k].infer(obs[k])
      counts[k] += 1

  threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
  t0 = time.perf_counter()
  for t in threads:
    t.start()
  time.sleep(seconds)
  stop.set()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - t0
  for c in conns:
    c.close()
  return sum(counts) / elapsed


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=["m2vla", "toy"], default="m2vla")
  ap.add_argument("--bundle")
  ap.add_argument("--workdir")
  ap.add_argument("--iters", type=int, default=200)
  ap.add_argument("--seconds", type=float, default=4.0)
  ap.add_argument("--max_wait_ms", type=float, default=2.0)
  args = ap.parse_args()

  tmp = tempfile.mkdtemp(prefix="bench_serve_")
  if args.workdir:
    bundle = inference.export(args.workdir, os.path.join(tmp, "bundle"))
  else:
    bundle = args.bundle or train_run(args.model, tmp)
  policy = inference.InferencePolicy.from_bundle(bundle)
  encoder = obs_lib.ObservationEncoder.from_config(policy.config, policy.normalization())
  md = {"cameras": encoder.cameras, "state_dim": encoder.state_dim}
  print(f"policy {policy.config.policy}, horizon {policy.config.model.horizon}, cameras "
        f"{list(encoder.cameras)} at {encoder.image_size}, requests send 64x64 images")

  # In-process, batch 1: encode + model + unnormalize, as a simulator calls it.
  obs = [observation(md, seed=i) for i in range(args.iters)]
  policy(encoder(obs[0]))                                          # compile
  local = []
  for o in obs:
    t0 = time.perf_counter()
    policy(encoder(o))
    local.append((time.perf_counter() - t0) * 1000)

  plain = Server(bundle, "--max_batch=1")
  batched = Server(bundle, "--max_batch=16", f"--max_wait_ms={args.max_wait_ms}")
  try:
    with client_lib.PolicyClient(plain.uri) as client:
      warm_plain = client.metadata["warmup_s"]
      client.infer(obs[0])
      remote, infer_ms = [], []
      for o in obs:
        t0 = time.perf_counter()
        reply = client.infer(o)
        remote.append((time.perf_counter() - t0) * 1000)
        infer_ms.append(reply["infer_ms"])
      np.testing.assert_allclose(reply["actions"], policy(encoder(obs[-1])), rtol=1e-5, atol=1e-5)
    with client_lib.PolicyClient(batched.uri) as client:
      warm_batched = client.metadata["warmup_s"]
    rows = []
    for n in (1, 4, 16):
      rows.append((n, throughput(plain.uri, n, args.seconds, md),
                   throughput(batched.uri, n, args.seconds, md)))
  finally:
    plain.stop()
    batched.stop()

  lp50, lp99 = percentiles(local)
  rp50, rp99 = percentiles(remote)
  ip50, _ = percentiles(infer_ms)
  print(f"\nper-chunk latency, batch 1, {args.iters} requests (ms)     p50      p99")
  print(f"  in-process (encode + model + unnormalize)          {lp50:7.2f}  {lp99:7.2f}")
  print(f"  loopback round trip (client -> server -> client)   {rp50:7.2f}  {rp99:7.2f}")
  print(f"  of which the server's model call (infer_ms)        {ip50:7.2f}")
  print("\nthroughput (chunks/s)    max_batch=1   max_batch=16, max_wait "
        f"{args.max_wait_ms:g} ms")
  for n, a, b in rows:
    print(f"  {n:2d} client(s)            {a:9.1f}   {b:9.1f}")
  print(f"\nwarm-up: max_batch=1 compiled in {warm_plain:.2f} s (accepting after {plain.start_s:.1f} s); "
        f"max_batch=16 (5 batch sizes) in {warm_batched:.2f} s (accepting after {batched.start_s:.1f} s)")
  print(f"loopback p50 / in-process p50 at batch 1: {rp50 / lp50:.2f}")


if __name__ == "__main__":
  main()

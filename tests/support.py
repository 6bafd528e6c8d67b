"""What several test modules share: repository paths, the debug config, subprocess environments, the
serve process, bitwise state comparison. Plain functions (no pytest hooks: those are conftest.py's),
importable from any test folder because pytest.ini puts tests/ on the path."""
import importlib.util
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEBUG = str(CONFIGS / "debug.py")
# Many tests compile the same programs (the toy train step, a policy's loss, an MJX rollout) from
# separate function objects, modules or processes; the persistent cache compiles each once per
# machine. Keyed by the program, the compile options and XLA_FLAGS, so a hit is the same executable.
CACHE_DIR = os.environ.get("M2VLA_TEST_COMPILE_CACHE", f"/tmp/m2vla_jax_test_compile_cache_{os.getuid()}")
# The debug config's short run most trainer tests share: 6 steps over a data x fsdp mesh of 8 devices.
ARG6 = "steps=6,fsdp=2,batch=8"
GCS_BUCKET = "m2vla-test"    # the bucket of conftest's `gcs` fixture


def xla_flags_with_devices(n: int) -> str:
  """This process's XLA_FLAGS with the emulated CPU device count set to n, for subprocesses.

  Keeps every other flag (e.g. --xla_cpu_max_isa), so a subprocess emits the same CPU code as the
  test process and bitwise comparisons across them stay meaningful.
  """
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def set_fields(config, overrides: dict) -> None:
  """config['a']['b'] = v for every 'a.b': v of `overrides` (dotted config paths)."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value


def load_config(path, arg=None):
  """`get_config(arg)` of a config file, loaded by path as the trainer's --config flag does."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", str(path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def debug_config(arg="", **overrides):
  """configs/debug.py with `arg`, no progress bar or periodic evaluation, then dotted `overrides`."""
  c = load_config(DEBUG, arg)
  c.progress_bar = False
  c.eval_every = 0
  set_fields(c, overrides)
  return c


def assert_bitwise_equal(a, b):
  """Two train states hold the same bytes in every trainable, optimizer, policy-state and rng leaf."""
  for name in ("trainable", "opt_state", "policy_state", "rng", "step"):
    la, lb = jax.tree_util.tree_leaves(getattr(a, name)), jax.tree_util.tree_leaves(getattr(b, name))
    assert len(la) == len(lb) > 0, name
    for x, y in zip(la, lb):
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape, name
      assert x.tobytes() == y.tobytes(), f"{name} differs"


def train_cli(workdir, *args, env_extra=None):
  """(argv, env) of `python -m m2vla_jax.train <config> --workdir=...` on 8 emulated devices, sharing
  the test session's compilation cache."""
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(env_extra or {})
  config_arg, *rest = args
  return [sys.executable, "-m", "m2vla_jax.train", config_arg, f"--workdir={workdir}",
          "--config.progress_bar=False", "--config.eval_every=0", *rest], env


class ServeProcess:
  """`python -m m2vla_jax.serve <args> --port=0` on loopback, one emulated device, the session's
  compilation cache; `uri` once it prints its address. `stop()` sends SIGTERM."""

  def __init__(self, *args: str):
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(1), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=CACHE_DIR, TF_CPP_MIN_LOG_LEVEL="3",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    self.proc = subprocess.Popen([sys.executable, "-m", "m2vla_jax.serve", "--port=0", *args], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: "queue.Queue[str]" = queue.Queue()
    self.output: list[str] = []
    threading.Thread(target=self._read, daemon=True).start()
    self._uri = None

  def _read(self):
    for line in self.proc.stdout:
      self.output.append(line)
      self.lines.put(line)

  @property
  def uri(self) -> str:
    deadline = time.time() + 120
    while self._uri is None:
      try:
        line = self.lines.get(timeout=max(0.1, deadline - time.time()))
      except queue.Empty:
        raise AssertionError("server did not start:\n" + "".join(self.output)) from None
      if line.startswith("serving ws://"):
        self._uri = line.split()[1]
    assert self.proc.poll() is None, "".join(self.output)
    return self._uri

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.proc.kill()

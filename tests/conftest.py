"""Test-wide setup: 8 emulated CPU devices (sharding tests) and deterministic, partitionable RNG."""
import os
import queue
import subprocess
import sys
import threading
import time

# Must be set before jax initialises its backends.
# Appended, not defaulted: the suite also runs with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (other CPU code).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_platforms", "cpu")

# Many tests compile the same programs (the toy train step, a policy's loss, an MJX rollout) from
# separate function objects, modules or processes; the persistent cache compiles each once per
# machine. Keyed by the program, the compile options and XLA_FLAGS, so a hit is the same executable.
CACHE_DIR = os.environ.get("M2VLA_TEST_COMPILE_CACHE", f"/tmp/m2vla_jax_test_compile_cache_{os.getuid()}")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  # Programs that compile in under 0.3 s are not worth a file each.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
  compilation_cache.reset_cache()
  yield


def pytest_collection_modifyitems(session, config, items):
  """Files with slow tests first, each file's tests kept together and in order.

  `--dist loadfile` hands whole files to the workers in collection order; a heavy file collected
  last keeps one worker busy while the other idles. Longest-first keeps both busy to the end."""
  del session, config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)   # stable: order within files kept


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


class ServeProcess:
  """`python -m m2vla_jax.serve <args> --port=0` on loopback, one emulated device, the session's
  compilation cache; `uri` once it prints its address. `stop()` sends SIGTERM."""

  def __init__(self, *args: str):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(1), JAX_PLATFORMS="cpu", PYTHONPATH=repo,
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

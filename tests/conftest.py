"""Test-wide setup: 8 emulated CPU devices (sharding tests), deterministic partitionable RNG, the
compilation cache, file order for xdist, and the GCS emulator fixture. Shared helpers: support.py."""
import os

# Must be set before jax initialises its backends.
# Appended, not defaulted: the suite also runs with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (other CPU code).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

import gcs_emulator  # noqa: E402
import support  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_platforms", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", support.CACHE_DIR)   # see support.CACHE_DIR
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


@pytest.fixture(scope="module")
def gcs():
  """The GCS emulator (bucket support.GCS_BUCKET), with this process's environment pointing tensorstore and
  gcsfs at it (restored after)."""
  emu = gcs_emulator.Emulator(support.GCS_BUCKET)
  old = gcs_emulator.set_env(emu.env)
  yield emu
  gcs_emulator.set_env(old)
  emu.stop()

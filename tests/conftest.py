"""Test-wide setup: 8 emulated CPU devices (sharding tests) and deterministic, partitionable RNG."""
import os

# Must be set before jax initialises its backends.
# Appended, not defaulted: the suite also runs with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (other CPU code).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_platforms", "cpu")


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

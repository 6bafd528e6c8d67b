"""The demonstration cache of every simulator workflow: names, reuse, and the data-registry entry.

Owns the one naming scheme for recorded demonstrations (`cache_name`: a readable prefix and a short
hash of the full generation spec), the spec file written beside the data (`SPEC_FILE`), the rule
for reusing a cache (`lookup`: only when the saved spec equals the requested one), the
build-or-reuse step (`ensure`), writing a recording with its statistics (`write_dataset`, through
`m2vla_jax.data.writer.write_rlds_dataset`), and the data-registry entry of such demonstrations
(`dataset_spec`, `register`).

Why a hash and a saved spec: names that spelled settings out went stale whenever a setting was
added (three such schemes existed, and a setting missing from a name reused data recorded for
another value); the hash covers every field of the spec, and the spec beside the data catches what
a name cannot: an interrupted write, a cache from before specs were saved, a hand-chosen name.

A spec is a JSON-able mapping of everything that changes the recorded data, e.g. for MJX
`{'simulator': 'mjx', 'tasks': [...], 'episodes_per_task': 600, 'seed': 0, 'experts_version': 3,
...}`. Layout: `<data_dir>/<name>/1.0.0/` holds the RLDS dataset (`dataset_info.json`, shards),
whatever statistics the simulator writes, and `demo_spec.json`, written last: a cache without it
is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping, TypeVar

log = logging.getLogger(__name__)

# Where each simulator's demonstrations go by default: `<ROOT>/<simulator>_demos` (configs may
# override it, e.g. M2VLA_SIM_DATA / M2VLA_MJX_DATA).
ROOT = os.path.join(os.path.expanduser("~"), ".cache", "m2vla_jax")
VERSION = "1.0.0"               # the version directory `write_rlds_dataset` writes by default
SPEC_FILE = "demo_spec.json"
DIGEST_CHARS = 10               # 40 bits: no accidental collision among a machine's caches
Report = TypeVar("Report")


def canonical(spec: Mapping[str, Any]) -> dict[str, Any]:
  """The spec as its JSON file reads back (tuples become lists, keys sorted)."""
  try:
    return json.loads(json.dumps(dict(spec), sort_keys=True))
  except TypeError as e:
    raise ValueError(f"demonstration spec {dict(spec)!r} is not JSON-able ({e}); convert its "
                     f"values to str, int, float, bool, lists or dicts") from e


def digest(spec: Mapping[str, Any]) -> str:
  """Hex digest of the canonical JSON of `spec` (DIGEST_CHARS characters)."""
  text = json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))
  return hashlib.sha1(text.encode()).hexdigest()[:DIGEST_CHARS]


def cache_name(prefix: str, spec: Mapping[str, Any]) -> str:
  """`<prefix>_<digest(spec)>` in lower case (TFDS dataset names are lower case).

  `prefix` is for people reading a cache directory (simulator, tasks, cameras, size, count); only
  the digest decides identity, so the prefix need not name every setting.
  """
  if not prefix:
    raise ValueError("demonstration cache prefix is empty; name the simulator and main settings")
  return f"{prefix}_{digest(spec)}".lower()


def check_name(field: str, name: str, expected: str, fix: str) -> None:
  """Raises unless a config's dataset name is the cache name of its demonstration settings."""
  if name != expected:
    raise ValueError(f"{field}={name!r} does not match the demonstration settings ({expected!r}); "
                     f"{fix}")


def default_data_dir(simulator: str) -> str:
  return os.path.join(ROOT, f"{simulator}_demos")


def dataset_dir(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, name, VERSION)


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  keys = sorted(set(saved) | set(wanted))
  return "; ".join(f"{k}: cached {saved.get(k, '<absent>')!r}, wanted {wanted.get(k, '<absent>')!r}"
                   for k in keys if saved.get(k) != wanted.get(k))


def lookup(data_dir: str, name: str, spec: Mapping[str, Any]) -> str | None:
  """The dataset directory if a complete cache of exactly `spec` is there; else None, with a log
  line saying why when something is there but cannot be reused."""
  path = dataset_dir(data_dir, name)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    if os.path.exists(os.path.join(data_dir, name)):
      log.warning("demonstration cache %s is incomplete (no dataset_info.json); rebuilding it",
                  path)
    return None
  spec_path = os.path.join(path, SPEC_FILE)
  if not os.path.exists(spec_path):
    log.warning("demonstration cache %s has no %s (an interrupted write, or written before specs "
                "were saved); rebuilding it", path, SPEC_FILE)
    return None
  with open(spec_path) as f:
    saved = json.load(f)
  wanted = canonical(spec)
  if saved != wanted:
    log.warning("demonstration cache %s was recorded for another spec (%s); rebuilding it", path,
                _differences(saved, wanted))
    return None
  return path


def write_spec(path: str, spec: Mapping[str, Any]) -> None:
  with open(os.path.join(path, SPEC_FILE), "w") as f:
    json.dump(canonical(spec), f, indent=1, sort_keys=True)


def ensure(data_dir: str, name: str, spec: Mapping[str, Any],
           build: Callable[[], tuple[str, Report]]) -> tuple[str, Report | None]:
  """Reuses the cache of `spec` under `name`, or rebuilds it with `build()`.

  `build` writes the dataset to `dataset_dir(data_dir, name)` (and any files beside it) and returns
  (that directory, a report of the recording). Returns (directory, report), the report None when
  the cache was reused. A directory of that name that `lookup` refuses is removed first, so no
  shard of the other recording mixes into the new one; the spec is written after `build` returns.
  """
  path = lookup(data_dir, name, spec)
  if path is not None:
    log.info("using cached demonstrations %s", path)
    return path, None
  if os.path.exists(os.path.join(data_dir, name)):
    shutil.rmtree(os.path.join(data_dir, name))
  path, report = build()
  if os.path.normpath(path) != os.path.normpath(dataset_dir(data_dir, name)):
    raise RuntimeError(f"demonstrations were written to {path}, not to the cache directory "
                       f"{dataset_dir(data_dir, name)}; write them under name={name!r} in "
                       f"data_dir={data_dir!r}")
  write_spec(path, spec)
  return path, report


def write_dataset(episodes, out_dir: str, name: str, description: str, stats=(),
                  stats_markdown: Callable[[Any], str] | None = None,
                  image_encoding: str = "jpeg") -> str:
  """Writes recorded episodes as RLDS `<out_dir>/<name>/1.0.0`, plus the recording's per-task
  statistics beside them (`stats.json` from each entry's `as_dict()`, `DEMOS.md` from
  `stats_markdown(stats)`) when there are any. Returns the dataset directory."""
  from m2vla_jax.data import writer  # pylint: disable=g-import-not-at-top
  path = writer.write_rlds_dataset(list(episodes), out_dir, name, image_encoding=image_encoding,
                                   progress=False, description=description)
  if stats:
    with open(os.path.join(path, "stats.json"), "w") as f:
      json.dump([s.as_dict() for s in stats], f, indent=1)
    if stats_markdown is not None:
      with open(os.path.join(path, "DEMOS.md"), "w") as f:
        f.write(stats_markdown(stats))
  return path


def dataset_spec(name: str, cameras: Mapping[str, str]):
  """The data-registry entry of simulator demonstrations.

  `cameras`: {pipeline camera slot: observation image key}, e.g. {'primary': 'image'}; proprio is
  'observation/state', the action 'action' (end-effector deltas). The gripper action is declared
  continuous: normalization then stays invertible, so the policy's output maps back to the
  simulator's action exactly.
  """
  from m2vla_jax.data.oxe import spec as oxe_spec  # pylint: disable=g-import-not-at-top
  return oxe_spec.DatasetSpec(name, dict(cameras), state=(oxe_spec.Field("observation/state"),),
                              action=(oxe_spec.Field("action"),),
                              action_encoding=oxe_spec.ActionEncoding.EEF_DELTA)


def register(name: str, cameras: Mapping[str, str]) -> None:
  """Registers `dataset_spec(name, cameras)` in this process's data registry, replacing an entry
  of that name, so the trainer's pipeline can read the demonstrations."""
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  oxe.register(dataset_spec(name, cameras), overwrite=True)

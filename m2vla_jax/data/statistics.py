"""Per-dataset action/proprio statistics (computed once, cached as JSON) and normalization.

Statistics are float64 numpy over every step of the split: mean, std, min, max, q01, q99 (linear
quantiles) of 'action' [A] and 'state' [S], plus the action gripper mask. They are cached at
`<cache_dir>/<dataset>-<hash>.json`, the hash covering the dataset path, version, split and the
registry entry's fingerprint, so editing an entry recomputes them. The same JSON is what the trainer
stores beside checkpoints (`save_statistics` / `load_statistics`).

Normalization (`normalize`):
  'zscore':  (x - mean) / std
  'bounds':  2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]
Gripper dims (mask True) are left as they are (already in {0, 1}). A dimension whose spread (std, or
q99 - q01) is below `eps` cannot be normalized: with zero_variance='passthrough' (the default; padded
and constant dims are common in OXE, e.g. language_table's rotation) it passes through unnormalized and a
warning names it; with zero_variance='error' a DataError names dataset, field and dim.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import numpy as np
import tqdm
from etils import epath

from m2vla_jax.data.errors import DataError, where
from m2vla_jax.data.rlds import LoadedDataset

log = logging.getLogger(__name__)
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
MODES = ("zscore", "bounds", "none")


def statistics_hash(ds: LoadedDataset) -> str:
  text = "|".join([ds.path, ds.version, ds.split, ds.spec.fingerprint()])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _array_stats(x: np.ndarray) -> dict[str, list[float]]:
  x = x.astype(np.float64)
  if x.shape[1] == 0:
    return {k: [] for k in STAT_NAMES}
  q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
  return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
          "max": x.max(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist()}


def compute_statistics(ds: LoadedDataset, progress: bool = True) -> dict:
  """Statistics of one loaded split (see module docstring); a JSON-able dict."""
  eps = ds.episodes
  if progress:
    eps = tqdm.tqdm(eps, desc=f"statistics {ds.name}", leave=False)
  actions, states = [], []
  for e in eps:
    actions.append(e["action"])
    states.append(e["state"])
  return {
      "dataset": ds.name, "path": ds.path, "version": ds.version, "split": ds.split,
      "hash": statistics_hash(ds), "num_episodes": len(ds.episodes), "num_steps": ds.num_steps,
      "action": _array_stats(np.concatenate(actions)), "state": _array_stats(np.concatenate(states)),
      "action_gripper_mask": ds.gripper_mask.astype(bool).tolist(),
  }


def save_statistics(stats: Mapping, path: str | os.PathLike) -> None:
  """Writes statistics JSON (a dict, or {dataset: dict} for a mixture), atomically."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(stats, indent=1))
  tmp.replace(path)


def load_statistics(path: str | os.PathLike) -> dict:
  path = epath.Path(path)
  if not path.exists():
    raise DataError(f"statistics file {path} does not exist.")
  return json.loads(path.read_text())


def default_cache_dir(data_dir: str) -> str:
  """`<data_dir>/m2vla_stats` when writable (local), else ~/.cache/m2vla_jax/stats."""
  if not str(data_dir).startswith("gs://") and os.access(data_dir, os.W_OK):
    return os.path.join(data_dir, "m2vla_stats")
  return os.path.join(os.path.expanduser("~"), ".cache", "m2vla_jax", "stats")


def dataset_statistics(ds: LoadedDataset, cache_dir: str | None = None, *, progress: bool = True,
                       recompute: bool = False) -> dict:
  """Cached statistics of `ds`: read from `<cache_dir>/<name>-<hash>.json` or computed and written."""
  cache_dir = cache_dir or default_cache_dir(os.path.dirname(os.path.dirname(ds.path)))
  path = epath.Path(cache_dir) / f"{ds.name}-{statistics_hash(ds)}.json"
  if path.exists() and not recompute:
    return load_statistics(path)
  stats = compute_statistics(ds, progress=progress)
  try:
    save_statistics(stats, path)
  except OSError as e:  # A read-only cache must not stop training; the numbers are in memory.
    log.warning("could not cache statistics at %s: %s", path, e)
  return stats


def normalizer(stats: Mapping, key: str, mode: str, *, mask: np.ndarray | None = None,
               eps: float = 1e-6, zero_variance: str = "passthrough"):
  """(scale [D], shift [D], lo [D], hi [D]) so that normalized = clip(x * scale + shift, lo, hi).

  Dims that are masked (gripper) or pass through get scale 1, shift 0 and infinite bounds.
  """
  if mode not in MODES:
    raise DataError(f"config.normalization={mode!r}; use one of {MODES}.")
  if zero_variance not in ("passthrough", "error"):
    raise DataError(f"config.zero_variance={zero_variance!r}; use 'passthrough' or 'error'.")
  s = {k: np.asarray(v, np.float64) for k, v in stats[key].items()}
  d = s["mean"].shape[0]
  scale, shift = np.ones(d), np.zeros(d)
  lo, hi = np.full(d, -np.inf), np.full(d, np.inf)
  mask = np.zeros(d, bool) if mask is None else np.asarray(mask, bool)
  if mode == "none":
    return scale, shift, lo, hi
  spread = s["std"] if mode == "zscore" else s["q99"] - s["q01"]
  for i in range(d):
    if mask[i]:
      continue
    if spread[i] < eps:
      msg = (f"{where(stats.get('dataset', '?'), field=key)} dim {i}: spread {spread[i]:.3g} < eps "
             f"{eps} ({mode}); it cannot be normalized")
      if zero_variance == "error":
        raise DataError(msg + ". Set zero_variance='passthrough' to leave it unnormalized, or fix the "
                        "registry entry.")
      log.warning("%s: passed through unnormalized.", msg)
      continue
    if mode == "zscore":
      scale[i], shift[i] = 1 / s["std"][i], -s["mean"][i] / s["std"][i]
    else:
      scale[i] = 2 / spread[i]
      shift[i] = -2 * s["q01"][i] / spread[i] - 1
      lo[i], hi[i] = -1.0, 1.0
  return scale, shift, lo, hi


def apply_normalizer(x: np.ndarray, norm) -> np.ndarray:
  """[..., D] -> normalized float32 [..., D]."""
  scale, shift, lo, hi = norm
  return np.clip(x * scale + shift, lo, hi).astype(np.float32)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return np.array_equal(np.asarray(a), np.asarray(b))


def run_normalizers(statistics: Mapping[str, Any], dataset: str | None = None
                    ) -> tuple[str, Any, Any]:
  """(dataset, state normalizer, action normalizer) from a run's statistics asset.

  `statistics` is {'normalization', 'datasets': {name: stats}}; `dataset` defaults to the only entry,
  or to the first when every entry is the same (a mixture trained with `shared_statistics`).
  The action normalizer leaves the gripper dimensions (`action_gripper_mask`) alone.
  """
  datasets = sorted(statistics.get("datasets", {}))
  if dataset is None:
    entries = [statistics["datasets"][d] for d in datasets]
    if not entries or not all(_same(e, entries[0]) for e in entries[1:]):
      raise ValueError(f"statistics hold datasets {datasets}; pass dataset= to pick one")
    dataset = datasets[0]
  if dataset not in datasets:
    raise ValueError(f"dataset={dataset!r} is not in the statistics ({datasets})")
  stats = statistics["datasets"][dataset]
  mode = statistics.get("normalization", "bounds")
  mask = np.asarray(stats.get("action_gripper_mask", [False] * len(stats["action"]["mean"])), bool)
  return dataset, normalizer(stats, "state", mode), normalizer(stats, "action", mode, mask=mask)

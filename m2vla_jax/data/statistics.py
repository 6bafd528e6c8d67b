"""Per-dataset action/proprio statistics (computed once, cached as JSON) and normalization.

Statistics are float64 numpy over every step of the split: mean, std, min, max, q01, q99 (linear
quantiles) of 'action' [A] and 'state' [S], plus the action gripper mask, the padding masks (dims the
registry entry fills with constants) and a summary of what the numbers rest on: the episodes skipped as
bad (`num_skipped_episodes`, the first `skipped_episodes`) and the dims that are constant except for
rare outliers (`near_constant`: {key: [{dim, value, min, max, outlier_fraction, ...}]}, q01 == q99 but
min < max; gripper and padding dims are not reported). They are cached at
`<cache_dir>/<dataset>-<hash>.json`, the hash covering the statistics `FORMAT`, the dataset path,
version, split, the registry entry's fingerprint and the skipped episodes, so editing an entry (or a
format change here) recomputes them; a cached file of another format is recomputed, never read.
The same JSON is what the trainer stores beside checkpoints (`save_statistics` / `load_statistics`);
`summary` renders its report for the run's log.

Normalization (`normalize`):
  'zscore':  (x - mean) / std
  'bounds':  2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]
Gripper and padding dims (mask True) are left as they are. A dimension whose spread (std, or
q99 - q01) is below `eps` cannot be normalized:
  zero_variance  (max - min < eps, a constant dim):          'passthrough' (default; warn) or 'error'
  near_constant  (max - min >= eps: constant but for rare     'passthrough' (default; warn) or 'error'
                  outliers, which would pass unnormalized)
'error' raises a DataError naming dataset, field and dim.
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
DEGENERATE = ("passthrough", "error")   # zero_variance / near_constant choices
# Bumped whenever the statistics change meaning or keys: older caches then miss (other hash) and are
# recomputed. 2: 8-dim OXE state layouts, padding masks, skipped episodes, near-constant report, raw
# NaN checks before gripper conversion.
FORMAT = 2
NEAR_CONSTANT_EPS = 1e-6   # |q99 - q01| below this with min < max: reported as near-constant
MAX_LISTED_SKIPS = 50      # skipped episodes listed by reason (all are counted)


def statistics_hash(ds: LoadedDataset) -> str:
  skipped = ",".join(str(i) for i, _ in ds.skipped)
  text = "|".join([f"format{FORMAT}", ds.path, ds.version, ds.split, ds.spec.fingerprint(), skipped])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _array_stats(x: np.ndarray) -> dict[str, list[float]]:
  x = x.astype(np.float64)
  if x.shape[1] == 0:
    return {k: [] for k in STAT_NAMES}
  q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
  return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
          "max": x.max(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist()}


def _near_constant(x: np.ndarray, stats: Mapping[str, list], skip: np.ndarray) -> list[dict]:
  """Dims of x [N, D] constant but for rare outliers: q99 - q01 < NEAR_CONSTANT_EPS < max - min."""
  out = []
  for i in range(x.shape[1]):
    lo, hi = stats["q01"][i], stats["q99"][i]
    if skip[i] or hi - lo >= NEAR_CONSTANT_EPS or stats["max"][i] - stats["min"][i] < NEAR_CONSTANT_EPS:
      continue
    outliers = np.abs(x[:, i] - lo) > NEAR_CONSTANT_EPS
    out.append({"dim": i, "value": lo, "min": stats["min"][i], "max": stats["max"][i],
                "outlier_fraction": float(outliers.mean()), "outlier_steps": int(outliers.sum())})
  return out


def _mask(mask: np.ndarray | None, d: int) -> np.ndarray:
  return np.zeros(d, bool) if mask is None else np.asarray(mask, bool)


def compute_statistics(ds: LoadedDataset, progress: bool = True) -> dict:
  """Statistics of one loaded split (see module docstring); a JSON-able dict."""
  eps = ds.episodes
  if progress:
    eps = tqdm.tqdm(eps, desc=f"statistics {ds.name}", leave=False)
  actions, states = [], []
  for e in eps:
    actions.append(e["action"])
    states.append(e["state"])
  action, state = np.concatenate(actions).astype(np.float64), np.concatenate(states).astype(np.float64)
  a_pad = _mask(getattr(ds, "action_padding_mask", None), action.shape[1])
  s_pad = _mask(getattr(ds, "state_padding_mask", None), state.shape[1])
  out = {
      "format": FORMAT, "dataset": ds.name, "path": ds.path, "version": ds.version, "split": ds.split,
      "hash": statistics_hash(ds), "num_episodes": len(ds.episodes), "num_steps": ds.num_steps,
      "num_skipped_episodes": len(ds.skipped),
      "skipped_episodes": [[int(i), r] for i, r in ds.skipped[:MAX_LISTED_SKIPS]],
      "action": _array_stats(action), "state": _array_stats(state),
      "action_gripper_mask": ds.gripper_mask.astype(bool).tolist(),
      "action_padding_mask": a_pad.tolist(), "state_padding_mask": s_pad.tolist(),
  }
  out["near_constant"] = {"action": _near_constant(action, out["action"], ds.gripper_mask | a_pad),
                         "state": _near_constant(state, out["state"], s_pad)}
  return out


def summary(stats: Mapping) -> str:
  """One-paragraph report of a dataset's statistics for the run's log: steps, skipped episodes and
  near-constant dims."""
  name = stats.get("dataset", "?")
  parts = [f"dataset {name!r}: {stats.get('num_episodes', '?')} episodes, {stats.get('num_steps', '?')} "
           f"steps, {stats.get('num_skipped_episodes', 0)} skipped as bad"]
  for i, reason in stats.get("skipped_episodes", [])[:3]:
    parts.append(f"  skipped episode {i}: {reason[:200]}")
  for key in ("action", "state"):
    for nc in stats.get("near_constant", {}).get(key, []):
      parts.append(f"  {key} dim {nc['dim']} is constant {nc['value']:.6g} but for "
                   f"{nc['outlier_steps']} outlier steps ({100 * nc['outlier_fraction']:.3g}%) in "
                   f"[{nc['min']:.6g}, {nc['max']:.6g}] (config.near_constant decides: passthrough or "
                   "error)")
  return "\n".join(parts)


def save_statistics(stats: Mapping, path: str | os.PathLike) -> None:
  """Writes statistics JSON (a dict, or {dataset: dict} for a mixture), atomically."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(stats, indent=1)
  if "://" in os.fspath(path):
    # An object store (gs://) publishes an upload whole, atomically, and has no atomic rename (it is a
    # copy plus a delete). Writing the object directly also avoids a shared `.tmp` object that every
    # host of a pod, writing the same statistics at once, would rename away from under the others.
    path.write_text(text)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
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
    try:
      cached = load_statistics(path)
    except (ValueError, OSError) as e:  # a torn or foreign file: recompute rather than fail
      log.warning("statistics cache %s unreadable (%s); recomputing.", path, e)
      cached = None
    if cached is not None and cached.get("format") == FORMAT:
      return cached
  stats = compute_statistics(ds, progress=progress)
  try:
    save_statistics(stats, path)
  except OSError as e:  # A read-only cache must not stop training; the numbers are in memory.
    log.warning("could not cache statistics at %s: %s", path, e)
  return stats


def normalizer(stats: Mapping, key: str, mode: str, *, mask: np.ndarray | None = None,
               eps: float = 1e-6, zero_variance: str = "passthrough", near_constant: str = "passthrough"):
  """(scale [D], shift [D], lo [D], hi [D]) so that normalized = clip(x * scale + shift, lo, hi).

  Dims that are masked (gripper, padding) or pass through get scale 1, shift 0 and infinite bounds;
  see the module docstring for zero_variance / near_constant.
  """
  if mode not in MODES:
    raise DataError(f"config.normalization={mode!r}; use one of {MODES}.")
  for name, value in (("zero_variance", zero_variance), ("near_constant", near_constant)):
    if value not in DEGENERATE:
      raise DataError(f"config.{name}={value!r}; use 'passthrough' or 'error'.")
  s = {k: np.asarray(stats[key][k], np.float64) for k in STAT_NAMES}
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
      where_ = f"{where(stats.get('dataset', '?'), field=key)} dim {i}"
      if s["max"][i] - s["min"][i] < eps:
        msg, option, choice = (f"{where_}: spread {spread[i]:.3g} < eps {eps} ({mode}); it cannot be "
                               "normalized", "zero_variance", zero_variance)
      else:
        msg, option, choice = (f"{where_}: constant {s['q01'][i]:.6g} but for rare outliers in "
                               f"[{s['min'][i]:.6g}, {s['max'][i]:.6g}] (spread {spread[i]:.3g} < eps "
                               f"{eps}, {mode}); the outliers would pass unnormalized", "near_constant",
                               near_constant)
      if choice == "error":
        raise DataError(f"{msg}. Set {option}='passthrough' to leave it unnormalized, or fix the "
                        "registry entry / drop the outlier episodes.")
      log.warning("%s: passed through unnormalized (%s='passthrough').", msg, option)
      continue
    if mode == "zscore":
      scale[i], shift[i] = 1 / s["std"][i], -s["mean"][i] / s["std"][i]
    else:
      scale[i] = 2 / spread[i]
      shift[i] = -2 * s["q01"][i] / spread[i] - 1
      lo[i], hi[i] = -1.0, 1.0
  return scale, shift, lo, hi


def skip_masks(stats: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """(state [S], action [A]) bool masks of dims never normalized: padding, and the action's gripper.
  Statistics written before the padding masks existed give gripper-only / empty masks."""
  d_a, d_s = len(stats["action"]["mean"]), len(stats["state"]["mean"])
  action = _mask(stats.get("action_gripper_mask"), d_a) | _mask(stats.get("action_padding_mask"), d_a)
  return _mask(stats.get("state_padding_mask"), d_s), action


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
  The normalizers leave the gripper and padding dimensions (`skip_masks`) alone.
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
  state_mask, action_mask = skip_masks(stats)
  return (dataset, normalizer(stats, "state", mode, mask=state_mask),
          normalizer(stats, "action", mode, mask=action_mask))

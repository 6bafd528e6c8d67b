"""Frozen-feature cache: compute a frozen backbone's output once per frame, train from it afterwards.

Owns the cache's validity rules, its key, its files and the data iterator that attaches cached features
to each batch. A policy that supports it (`policies/m2vla.py`) says which stage of its backbone no
trainable parameter feeds (`policy.cache_stage(params)`) and computes it (`policy.frozen_features`);
a batch carrying `observation['frozen_features']` skips that computation, so a training step runs only
the trainable parts. For a frozen Gemma 3 270M behind a frozen DINOv2 and projector, the step keeps the
queries' pass and the action head (bench/features.py measures the ratio).

    config.feature_cache.stage   'off' (default) | 'auto' (the deepest valid stage) | 'image_features' |
                                 'prefix' | 'outputs' (a request deeper than valid falls back, with a
                                 log line)
    config.feature_cache.dir     '' = beside each dataset (<data_dir>/<name>/frozen_features/), or a
                                 root that gets <root>/<name>/ (gs:// data needs a local root)
    config.feature_cache.dtype   'float32' | 'bfloat16' (stored as raw 16 bits; half the disk and reads)
    config.feature_cache.batch_size   frames per forward pass while building

Validity: the cache is used only when it cannot differ from what training would compute: off when the
pipeline augments images (a cached frame would be the unaugmented one) or when no stage is frozen (a
trainable tower). One slot per (dataset, stage): `<dir>/<stage>/manifest.json` + one `.npy` per feature
(rows = frames in the pipeline's order, frame_id - offset). The manifest holds the key's parts: a sha256
of the frozen parameters that feed the stage, the backbone config, the preprocessing (image size,
cameras, tokenizer, max tokens), the dataset's content fingerprint and the dtype. Any difference
rebuilds the slot with a log line naming what changed; a build writes to a temporary directory and
renames it, so an interrupted build never leaves a slot that looks valid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2vla_jax.core import tree_util

log = logging.getLogger(__name__)

STAGES = ("image_features", "prefix", "outputs")          # shallow -> deep
REQUESTS = ("off", "auto") + STAGES
DTYPES = ("float32", "bfloat16")
_FORMAT = 1


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(stage="off", dir="", dtype="float32", batch_size=32))


# ------------------------------------------------------------------ validity
def choose_stage(request: str, valid: str | None, *, augment: bool) -> tuple[str | None, str]:
  """(stage to use or None, why) from the config's request and the deepest valid stage."""
  if request not in REQUESTS:
    raise ValueError(f"config.feature_cache.stage={request!r}; use one of {REQUESTS}")
  if request == "off":
    return None, "config.feature_cache.stage='off'"
  if augment:
    return None, ("config.data.pipeline.augment=True: a cached frame would be the unaugmented one, "
                  "so the cache is off")
  if valid is None:
    return None, ("no stage of the backbone is frozen (a trainable image tower feeds everything), so "
                  "the cache is off")
  if request == "auto":
    return valid, f"stage '{valid}' (the deepest frozen one)"
  if STAGES.index(request) > STAGES.index(valid):
    return valid, (f"config.feature_cache.stage='{request}' is not frozen under config.model.trainable; "
                   f"using '{valid}'")
  return request, f"stage '{request}' as configured"


# ------------------------------------------------------------------ key
def params_digest(flat_params: Mapping[str, Any], prefixes: tuple[str, ...],
                  exclude: tuple[str, ...] = ()) -> str:
  """sha256 over (path, dtype, shape, bytes) of the parameters under `prefixes` (sorted paths)."""
  h = hashlib.sha256()
  for path in sorted(flat_params):
    if not path.startswith(prefixes) or (exclude and path.startswith(exclude)):
      continue
    a = np.asarray(jax.device_get(flat_params[path]))
    h.update(f"{path}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def stage_params(stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(path prefixes that feed `stage`, excluded prefixes)."""
  if stage == "image_features":
    return ("vlm/img/",), ()
  if stage == "prefix":
    return ("vlm/",), ("vlm/queries",)
  return ("vlm/",), ()


def manifest_for(*, stage: str, weights: str, backbone: str, preprocessing: Mapping[str, Any],
                 fingerprint: str, dtype: str, frames: int) -> dict:
  return {"format": _FORMAT, "stage": stage, "frozen_weights_sha256": weights, "backbone": backbone,
          "preprocessing": dict(preprocessing), "dataset_sha256": fingerprint, "dtype": dtype,
          "frames": int(frames)}


_WHY = {"format": "the cache format", "stage": "the stage", "frozen_weights_sha256": "the frozen weights",
        "backbone": "the backbone config", "preprocessing": "the preprocessing",
        "dataset_sha256": "the dataset's content", "dtype": "the storage dtype", "frames": "the frame count"}


def stale_reasons(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """What changed between a stored manifest and the current one (empty: the cache is valid)."""
  reasons = []
  for k in new:
    if old.get(k) != new[k]:
      if k == "preprocessing" and isinstance(old.get(k), dict):
        diff = sorted(f for f in set(old[k]) | set(new[k]) if old[k].get(f) != new[k].get(f))
        reasons.append(f"the preprocessing ({', '.join(diff)})")
      else:
        reasons.append(_WHY.get(k, k))
  return reasons


# ------------------------------------------------------------------ storage
def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    return np.asarray(jnp.asarray(x, jnp.bfloat16)).view(np.uint16)
  return np.asarray(x, np.float32)


def _from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return x.view(ml_dtypes.bfloat16)
  return x


@dataclasses.dataclass
class Slot:
  """One built cache slot: memory-mapped arrays [frames, ...] per feature."""
  path: str
  manifest: dict
  arrays: dict[str, np.ndarray]

  def rows(self, local: np.ndarray) -> dict[str, np.ndarray]:
    order = np.argsort(local, kind="stable")          # sorted reads are sequential on disk
    out = {}
    for k, a in self.arrays.items():
      rows = np.empty((len(local),) + a.shape[1:], a.dtype)
      rows[order] = a[local[order]]
      out[k] = _from_storage(rows, self.manifest["dtype"])
    return out


def open_slot(path: str) -> Slot | None:
  """The slot at `path` if it holds a complete build, else None."""
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.exists(manifest_path):
    return None
  with open(manifest_path) as f:
    manifest = json.load(f)
  arrays = {}
  for name in manifest.get("features", []):
    arrays[name] = np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
  return Slot(path, manifest, arrays)


def build_slot(path: str, manifest: Mapping[str, Any], dataset: Any,
               compute: Any, batch_size: int, progress: bool = False) -> Slot:
  """Computes `compute(batch) -> {name: [n, ...]}` over every frame of `dataset` into `path`."""
  import tqdm  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  arrays, n, t0 = {}, len(dataset), time.time()
  bar = tqdm.tqdm(total=n, desc=f"frozen features {dataset.name}", unit="frame", disable=not progress)
  next_log = n // 4
  for idx, batch in dataset.batches(batch_size):
    bar.update(len(idx))
    if not progress and idx[-1] + 1 >= next_log and idx[-1] + 1 < n:   # no bar: a line per quarter
      log.info("frozen-feature cache %s: %d / %d frames (%.0f s)", path, idx[-1] + 1, n, time.time() - t0)
      next_log += max(n // 4, 1)
    feats = jax.device_get(compute(batch))
    for k, v in feats.items():
      v = _to_storage(np.asarray(v), manifest["dtype"])
      if k not in arrays:
        arrays[k] = np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), mode="w+", dtype=v.dtype,
                                              shape=(n,) + v.shape[1:])
      arrays[k][idx] = v
  bar.close()
  for a in arrays.values():
    a.flush()
  seconds = time.time() - t0
  full = dict(manifest, features=sorted(arrays), build_seconds=round(seconds, 2),
              frames_per_s=round(n / max(seconds, 1e-9), 2))
  with open(os.path.join(tmp, "manifest.json"), "w") as f:
    json.dump(full, f, indent=1, sort_keys=True)
  del arrays
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  log.info("frozen-feature cache %s: %d frames in %.1f s (%.1f frames/s)", path, n, seconds,
           n / max(seconds, 1e-9))
  return open_slot(path)


def slot_path(root: str, dataset: Any, stage: str) -> str:
  if root:
    return os.path.join(root, dataset.name, stage)
  return os.path.join(os.path.dirname(str(dataset.path).rstrip("/")), "frozen_features", stage)


def load_or_build(path: str, manifest: Mapping[str, Any], dataset: Any, compute: Any,
                  batch_size: int, progress: bool = False) -> Slot:
  """The slot at `path` if its manifest matches, else a fresh build (logging why)."""
  slot = open_slot(path)
  if slot is not None:
    stored = {k: v for k, v in slot.manifest.items() if k in manifest}
    reasons = stale_reasons(stored, manifest)
    if not reasons:
      log.info("frozen-feature cache %s: reusing %d frames", path, manifest["frames"])
      return slot
    log.warning("frozen-feature cache %s is stale (%s changed); rebuilding", path, ", ".join(reasons))
  else:
    log.info("frozen-feature cache %s: building (none yet)", path)
  return build_slot(path, manifest, dataset, compute, batch_size, progress)


# ------------------------------------------------------------------ the trainer's side
class WithFrozenFeatures:
  """The trainer's data iterator with each batch's frozen features attached (by frame_id).

  Images are dropped from the batch when the cached stage covers them (they would only be
  transferred). get_state / set_state / statistics pass through, so exact resume is unchanged.
  """

  def __init__(self, data: Any, slots: list[tuple[int, int, Slot]], stage: str):
    self._data = data
    self._slots = slots            # (frame_id start, stop, slot)
    self.stage = stage
    for name in ("info", "normalization"):
      if hasattr(data, name):
        setattr(self, name, getattr(data, name))

  def __iter__(self) -> Iterator[dict]:
    return self

  def attach(self, batch: Mapping[str, Any]) -> dict:
    ids = np.asarray(batch["frame_id"], np.int64)
    parts: dict[str, np.ndarray] = {}
    found = np.zeros(len(ids), bool)
    for start, stop, slot in self._slots:
      sel = np.flatnonzero((ids >= start) & (ids < stop))
      if not sel.size:
        continue
      rows = slot.rows(ids[sel] - start)
      for k, v in rows.items():
        if k not in parts:
          parts[k] = np.zeros((len(ids),) + v.shape[1:], v.dtype)
        parts[k][sel] = v
      found[sel] = True
    if not found.all():
      raise ValueError(f"frame_id(s) {ids[~found][:5].tolist()} are in no frozen-feature cache slot; "
                       "the cache was built for another mixture (rebuild: delete the slot)")
    obs = dict(batch["observation"])
    obs.pop("images", None)
    obs["frozen_features"] = parts
    return {**batch, "observation": obs}

  def __next__(self) -> dict:
    return self.attach(next(self._data))

  def get_state(self) -> Any:
    return self._data.get_state()

  def set_state(self, state: Any) -> None:
    self._data.set_state(state)

  def statistics(self) -> dict:
    return self._data.statistics()


def attach(config: ml_collections.ConfigDict, policy: Any, params: Any, data: Any) -> Any:
  """`data` with cached frozen features, or `data` unchanged when the cache is off or invalid.

  Args:
    config: the training config (feature_cache, data.pipeline, data.tokenizer, model).
    policy: a policy with `cache_stage` / `frozen_features` (others: the cache is off).
    params: the policy's parameter tree (frozen parts as training holds them).
    data: the trainer's train iterator (frame_ids in the pipeline's layout).
  """
  fc = config.get("feature_cache") or default_config()
  request = str(fc.get("stage", "off"))
  if request == "off":
    return data
  if not hasattr(policy, "cache_stage"):
    log.warning("frozen-feature cache off: policy %s has no cache_stage", type(policy).__name__)
    return data
  if config.data.kind != "rlds":
    log.warning("frozen-feature cache off: config.data.kind=%r has no per-frame datasets", config.data.kind)
    return data
  pcfg = config.data.pipeline
  stage, why = choose_stage(request, policy.cache_stage(params), augment=bool(pcfg.get("augment", False)))
  if stage is None:
    log.warning("frozen-feature cache off: %s", why)
    return data
  log.info("frozen-feature cache: %s", why)
  dtype = str(fc.get("dtype", "float32"))
  if dtype not in DTYPES:
    raise ValueError(f"config.feature_cache.dtype={dtype!r}; use one of {DTYPES}")
  from m2vla_jax.data import loader  # pylint: disable=g-import-not-at-top
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  full_pcfg = loader.pipeline_config(config)
  root = str(fc.get("dir", "") or "")
  if not root and str(full_pcfg.data_dir).startswith("gs://"):
    raise ValueError("config.feature_cache.dir is empty but the data is on gs://; set a local directory")
  datasets = pipeline.ordered_datasets(full_pcfg, tokenizer=tokenizers.make_tokenizer(config.data.tokenizer),
                                       split="train")
  flat = tree_util.flatten(params)
  prefixes, exclude = stage_params(stage)
  weights = params_digest(flat, prefixes, exclude)
  preprocessing = {"image_size": list(full_pcfg.image_size), "cameras": list(full_pcfg.cameras),
                   "max_tokens": int(full_pcfg.max_tokens), "tokenizer": str(config.data.tokenizer)}
  vlm_cfg = policy.vlm_config
  # Only what the stage computes: the LLM is not in the first stage, the queries only in the last.
  backbone = {"image_features": repr((vlm_cfg.img, vlm_cfg.img_proj)),
              "prefix": repr(dataclasses.replace(vlm_cfg, num_queries=0)),
              "outputs": repr(vlm_cfg)}[stage]
  compute = jax.jit(lambda p, obs: policy.frozen_features(p, obs, stage))
  slots = []
  for ds in datasets:
    manifest = manifest_for(stage=stage, weights=weights, backbone=backbone, preprocessing=preprocessing,
                            fingerprint=ds.fingerprint, dtype=dtype, frames=len(ds))
    slot = load_or_build(slot_path(root, ds, stage), manifest, ds,
                         lambda batch: compute(params, batch["observation"]), int(fc.get("batch_size", 32)),
                         progress=bool(config.get("progress_bar", True)))
    slots.append((ds.frame_offset, ds.frame_offset + len(ds), slot))
  return WithFrozenFeatures(data, slots, stage)

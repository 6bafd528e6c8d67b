"""The grain input pipeline: registry mixture -> indexed frames -> shuffled, mixed, sharded batches.

    make_pipeline(config, tokenizer=tok, split='train', seed=0) -> grain DatasetIterator
    it.get_state() / it.set_state(state)    exact resume: the next batch is the one that would have come

Every dataset of the mixture is read once into memory as standardized episodes with images still encoded
(`rlds.load_dataset`), normalized with its statistics, and indexed by step: a random-access source
whose element i is the frame (episode e, step t) with its action chunk. grain then builds, lazily and
deterministically from (seed, index):

  per dataset:  global permutation, fresh each epoch, repeated (EpochShuffle)
                -> host shard [process_index::process_count]
  mix by weight (grain's deterministic weighted interleave) -> window shuffle (config.shuffle_buffer)
  -> decode + resize (+ random resized crop, color jitter) + tokenize -> batch

Shuffling permutes indices, so the "buffer" never holds decoded pixels; decoding happens only for the
frames that are sampled. The iterator state is one integer, hence exact resume in a fresh process.
For datasets too large to hold their encoded frames in host memory the same design holds with an
episode-level random-access source: TFDS array_record shards give O(1) access to an episode, the step
index needs only episode lengths (one pass, cached like the statistics), and a small LRU of
deserialized episodes serves the frames of the current shuffle window.

Batch (per host, B = config.batch_size // process_count), the contract of docs/ARCHITECTURE.md:
  observation/images      uint8 [B, C, H, W, 3]   C = len(config.cameras); absent cameras are zeros
  observation/image_mask  bool  [B, C]
  observation/state       f32   [B, S]            normalized; dims past a dataset's own S are 0
  observation/tokens      int32 [B, T]            T = config.max_tokens, right-padded
  observation/token_mask  bool  [B, T]
  actions                 f32   [B, H, A]         normalized chunk; dims past a dataset's A are 0
  action_mask             bool  [B, H]            False past the episode end (chunk repeats last action)
  frame_id                int32 [B]               offset(dataset) + step index within the split
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Mapping

import grain
import ml_collections
import numpy as np

from m2vla_jax.data import oxe
from m2vla_jax.data import statistics as stats_lib
from m2vla_jax.data import transforms
from m2vla_jax.data.errors import DataError
from m2vla_jax.data.rlds import LoadedDataset, load_dataset
from m2vla_jax.text import tokenizers

log = logging.getLogger(__name__)


def get_config() -> ml_collections.ConfigDict:
  """Data config; every field is documented here (single source of the defaults)."""
  c = ml_collections.ConfigDict()
  c.datasets = "bridge"          # mixture name (oxe.MIXTURES), 'a,b' (equal weights) or 'a:3,b:1'
  c.data_dir = ""                # root holding <name>/<version>/ TFDS directories; local or gs://
  c.cameras = ("primary", "wrist")  # batch camera slots, in order (registry slot names)
  c.image_size = (224, 224)      # (H, W) after resize
  # The batch geometry (H, A, S, T) is the policy's: a training run fills these from the policy
  # (`loader.pipeline_config`, policies' `batch_geometry`), so a config states each once, in
  # config.model. Set them yourself only when you build a pipeline without a policy.
  c.horizon = ml_collections.config_dict.placeholder(int)   # action chunk length H
  c.normalization = "bounds"     # 'bounds' (q01..q99 -> [-1, 1], clipped), 'zscore' or 'none'
  c.zero_variance = "passthrough"  # constant dim (spread < norm_eps): 'passthrough' (warn) or 'error'
  c.near_constant = "passthrough"  # dim constant but for rare outliers (spread < norm_eps < max - min;
                                 # listed in statistics['near_constant']): 'passthrough' (warn; the
                                 # outliers stay unnormalized) or 'error'
  c.norm_eps = 1e-6
  c.action_dim = 0               # A; 0 = widest dataset of the mixture (others zero-padded)
  c.state_dim = 0                # S; 0 = widest dataset of the mixture
  c.max_tokens = ml_collections.config_dict.placeholder(int)  # T
  c.batch_size = 32              # global batch; each host gets batch_size // process_count
  c.shuffle_buffer = 1024        # window shuffle of the mixed frame stream (0 = off); each dataset is
                                 # also fully permuted every epoch. A window longer than a dataset's
                                 # epoch can put one frame twice into a batch.
  c.balance_by_size = False      # weights *= number of steps (octo's balance_weights)
  c.augment = False              # random resized crop + color jitter (train split only)
  c.crop_scale = (0.8, 1.0)      # area fraction of the random crop
  c.crop_ratio = (0.9, 1.1)      # aspect ratio range of the random crop
  c.brightness = 0.2             # color jitter strengths: factor in [1 - s, 1 + s]
  c.contrast = 0.2
  c.saturation = 0.2
  c.skip_bad_episodes = False    # skip bad episodes instead of raising DataError; they are logged,
                                 # counted in statistics['num_skipped_episodes'] and PipelineInfo.skipped
  c.stats_dir = ""               # statistics cache; '' = statistics.default_cache_dir(data_dir)
  c.shared_statistics = ""       # a dataset of the mixture whose statistics normalize every dataset
                                 # ('' = each its own): for datasets of one robot and action space,
                                 # e.g. demonstrations plus DAgger rollouts of the same simulator
  c.num_threads = 2              # grain read threads
  c.prefetch = 8                 # batches prefetched
  c.progress = True              # tqdm bars while reading / computing statistics
  return c


@dataclasses.dataclass
class PipelineInfo:
  """What the pipeline read: weights, statistics (store them with checkpoints), frame_id ranges."""
  datasets: list[str]
  weights: list[float]                     # normalized sampling weights
  statistics: dict[str, dict]              # dataset -> statistics JSON dict
  frame_id_ranges: dict[str, tuple[int, int]]   # dataset -> [start, stop)
  skipped: dict[str, list[tuple[int, str]]]     # dataset -> (episode, reason) of skipped episodes
  action_dim: int
  state_dim: int
  gripper_masks: dict[str, list[bool]]     # dataset -> [A] (padded dims False)

  def dataset_of(self, frame_id: np.ndarray) -> np.ndarray:
    """int [N] index into `datasets` for each frame_id."""
    starts = np.array([self.frame_id_ranges[d][0] for d in self.datasets])
    return np.searchsorted(starts, np.asarray(frame_id), side="right") - 1


class FrameSource:
  """Random-access source over the steps of one loaded dataset: element i is one undecoded frame."""

  def __init__(self, ds: LoadedDataset, stats: Mapping, config, *, frame_offset: int,
               action_dim: int, state_dim: int):
    self.name = ds.name
    self.horizon = int(config.horizon)
    mode, eps = config.normalization, float(config.norm_eps)
    degenerate = dict(zero_variance=config.zero_variance,
                      near_constant=config.get("near_constant", "passthrough"))
    state_mask, action_mask = stats_lib.skip_masks(stats)   # gripper and padding dims
    a_norm = stats_lib.normalizer(stats, "action", mode, mask=action_mask, eps=eps, **degenerate)
    s_norm = stats_lib.normalizer(stats, "state", mode, mask=state_mask, eps=eps, **degenerate)
    self.actions, self.states, self.images, self.instructions = [], [], [], []
    lengths = []
    for e in ds.episodes:
      t = len(e["action"])
      a = np.zeros((t, action_dim), np.float32)
      a[:, : ds.action_dim] = stats_lib.apply_normalizer(e["action"], a_norm)
      s = np.zeros((t, state_dim), np.float32)
      s[:, : ds.state_dim] = stats_lib.apply_normalizer(e["state"], s_norm)
      self.actions.append(a)
      self.states.append(s)
      self.images.append([e["images"].get(slot) for slot in config.cameras])
      self.instructions.append(e["instruction"])
      lengths.append(t)
    lengths = np.asarray(lengths)
    self.step_episode = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    self.step_t = (np.arange(lengths.sum()) - starts[self.step_episode]).astype(np.int32)
    self.frame_offset = frame_offset

  def __len__(self) -> int:
    return int(self.step_episode.shape[0])

  def __getitem__(self, i: int) -> dict:
    e, t = int(self.step_episode[i]), int(self.step_t[i])
    chunk, mask = transforms.chunk_actions(self.actions[e], t, self.horizon)
    return {
        "images": [None if cam is None else cam[t] for cam in self.images[e]],
        "state": self.states[e][t],
        "actions": chunk,
        "action_mask": mask,
        "instruction": self.instructions[e][t],
        "frame_id": np.int32(self.frame_offset + i),
        "where": (self.name, e, t),
    }


class FrameTransform:
  """Undecoded frame -> batch element (decode, resize, optional augmentation, tokenize)."""

  def __init__(self, config, tokenize: tokenizers.Tokenize, augment: bool):
    self.size = tuple(int(x) for x in config.image_size)
    self.num_cameras = len(config.cameras)
    self.tokenize = tokenize
    self.augment = augment
    self.crop_scale, self.crop_ratio = tuple(config.crop_scale), tuple(config.crop_ratio)
    self.jitter = (float(config.brightness), float(config.contrast), float(config.saturation))
    self.cameras = tuple(config.cameras)

  def __call__(self, frame: dict, rng: np.random.Generator | None = None) -> dict:
    images = []
    for c, data in enumerate(frame["images"]):
      if data is None:
        images.append(None)
        continue
      try:
        if self.augment:
          box = transforms.random_crop_box(rng, self.crop_scale, self.crop_ratio)
          img = transforms.color_jitter(transforms.decode_resize(data, self.size, box), rng, *self.jitter)
        else:
          img = transforms.decode_resize(data, self.size)
      except Exception as e:
        name, ep, t = frame["where"]
        raise DataError(f"dataset {name!r} episode {ep} step {t} camera {self.cameras[c]!r}: "
                        f"cannot decode image: {e}") from e
      images.append(img)
    tokens, token_mask = self.tokenize(frame["instruction"])
    return {"images": images, "state": frame["state"], "tokens": tokens, "token_mask": token_mask,
            "actions": frame["actions"], "action_mask": frame["action_mask"],
            "frame_id": frame["frame_id"]}

  def collate(self, frames: list[dict]) -> dict:
    """Frames -> the contract batch; images written straight into one zeroed [B, C, H, W, 3] array."""
    n = len(frames)
    images = np.zeros((n, self.num_cameras, *self.size, 3), np.uint8)
    image_mask = np.zeros((n, self.num_cameras), bool)
    for b, f in enumerate(frames):
      for c, img in enumerate(f["images"]):
        if img is not None:
          images[b, c] = img
          image_mask[b, c] = True
    stack = lambda k: np.stack([f[k] for f in frames])
    return {
        "observation": {"images": images, "image_mask": image_mask, "state": stack("state"),
                        "tokens": stack("tokens"), "token_mask": stack("token_mask")},
        "actions": stack("actions"),
        "action_mask": stack("action_mask"),
        "frame_id": np.asarray([f["frame_id"] for f in frames], np.int32),
    }


class _Permutations:
  """Permutation of range(n) per key, from (seed, key); the newest few are cached.

  Grain's reader threads call in concurrently, so the cache is locked: two threads evicting the
  oldest entry at once raised KeyError (seen in a CI run). A permutation depends only on (seed, key),
  so which thread computes it changes nothing.
  """

  def __init__(self, seed: int, n: int, keep: int = 5):
    self.seed, self.n, self.keep = seed, n, keep
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __call__(self, key: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(key)
      if perm is None:
        perm = np.random.default_rng([self.seed, key]).permutation(self.n)
        if len(self._perms) >= self.keep:  # threads may straddle a boundary: keep a few
          self._perms.pop(min(self._perms))
        self._perms[key] = perm
      return perm


class WindowShuffle:
  """Infinite random-access view permuting consecutive windows of `size` elements of `parent`
  (permutation from (seed, window), cached), like grain's WindowShuffleMapDataset but cheaper."""

  def __init__(self, parent, size: int, seed: int):
    self.parent, self.size, self.seed = parent, size, seed
    self._perms = _Permutations(seed, size)

  def __len__(self) -> int:
    return len(self.parent)

  def __getitem__(self, i: int):
    w, j = divmod(int(i), self.size)
    return self.parent[w * self.size + int(self._perms(w)[j])]


class EpochShuffle:
  """Infinite random-access view: element i is base[perm_e[i mod n]], e = i // n, with a fresh
  permutation per epoch from (seed, e). Equivalent to grain's shuffle().repeat() but with the
  permutation materialized (n int64 per cached epoch), much cheaper per element than grain's
  index_shuffle and affordable because the datasets here are indexed in memory anyway."""

  def __init__(self, base, seed: int):
    self.base, self.seed, self.n = base, seed, len(base)
    self._perms = _Permutations(seed, self.n)

  def __len__(self) -> int:
    return 2**62

  def __getitem__(self, i: int):
    epoch, j = divmod(int(i), self.n)
    return self.base[int(self._perms(epoch)[j])]


def load_mixture(config, split: str, statistics: Mapping[str, Mapping] | None = None):
  """(loaded datasets, weights, statistics) for config.datasets; statistics computed/cached if None."""
  mix = oxe.resolve_mixture(config.datasets if not isinstance(config.datasets, ml_collections.ConfigDict)
                            else config.datasets.to_dict())
  if not config.data_dir:
    raise DataError("config.data_dir is empty; set it to the directory holding <dataset>/<version>/.")
  names = sorted(mix)
  shared = str(config.get("shared_statistics", "") or "")
  if shared and shared not in names:
    raise DataError(f"config.shared_statistics={shared!r} is not a dataset of the mixture "
                    f"{names}; name one of them or set ''.")
  loaded, stats = [], {}
  for name in names:
    ds = load_dataset(config.data_dir, oxe.get_spec(name), split,
                      skip_bad_episodes=bool(config.skip_bad_episodes), progress=bool(config.progress))
    loaded.append(ds)
    if statistics is not None:
      if name not in statistics:
        raise DataError(f"statistics given for {sorted(statistics)} but not for dataset {name!r}.")
      stats[name] = dict(statistics[name])
    elif shared and name != shared:
      continue          # normalized with the shared dataset's statistics (below), none computed
    else:
      stats[name] = stats_lib.dataset_statistics(ds, config.stats_dir or None,
                                                 progress=bool(config.progress))
    if len(stats[name]["action"]["mean"]) != ds.action_dim:
      raise DataError(f"dataset {name!r}: statistics have {len(stats[name]['action']['mean'])} action "
                      f"dims, the data {ds.action_dim}; they belong to another entry/version.")
    if len(stats[name]["state"]["mean"]) != ds.state_dim:
      raise DataError(f"dataset {name!r}: statistics have {len(stats[name]['state']['mean'])} state "
                      f"dims, the data {ds.state_dim}; they belong to another entry/version (e.g. "
                      "written before the 8-dim OXE state layouts): recompute them.")
    report = stats_lib.summary(stats[name])
    if ds.skipped or stats[name].get("near_constant", {}).get("action") or \
        stats[name].get("near_constant", {}).get("state"):
      log.warning("%s", report)
    else:
      log.info("%s", report)
  if shared:
    ref = loaded[names.index(shared)]
    for name, ds in zip(names, loaded):
      dims, ref_dims = (ds.state_dim, ds.action_dim), (ref.state_dim, ref.action_dim)
      if dims != ref_dims:
        raise DataError(f"config.shared_statistics={shared!r}: dataset {name!r} has (state, action) "
                        f"dims {dims}, {shared!r} {ref_dims}; only datasets of one robot and "
                        f"action space can share statistics.")
      stats[name] = stats[shared]
  weights = np.array([mix[n] for n in names], np.float64)
  if config.balance_by_size:
    weights *= np.array([d.num_steps for d in loaded])
  return loaded, (weights / weights.sum()).tolist(), stats


def require_geometry(config) -> None:
  """DataError unless the policy-owned fields (horizon, max_tokens) are set."""
  for field in ("horizon", "max_tokens"):
    if config.get(field) is None:
      raise DataError(f"config.{field} is unset: a training run takes it from the policy "
                      f"(config.model, through data.loader.pipeline_config); set it when you build a "
                      f"pipeline without one.")


def make_dataset(config, *, tokenizer: Any, split: str = "train", seed: int = 0,
                 statistics: Mapping[str, Mapping] | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[grain.IterDataset, PipelineInfo]:
  """The batched grain dataset and what it read; see the module docstring for the stages.

  split 'train' shuffles, repeats forever and augments (if config.augment); any other split reads each
  dataset once in file order (no augmentation) and keeps a last partial batch.
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if config.batch_size % process_count:
    raise DataError(f"config.batch_size={config.batch_size} is not divisible by process_count="
                    f"{process_count}.")
  require_geometry(config)
  if int(config.horizon) < 1:
    raise DataError(f"config.horizon={config.horizon} must be >= 1.")
  bad_cams = [c for c in config.cameras if c not in ("primary", "secondary", "wrist")]
  if bad_cams:
    raise DataError(f"config.cameras has unknown slots {bad_cams}; use 'primary', 'secondary', 'wrist'.")
  local_batch = config.batch_size // process_count
  train = split == "train"
  loaded, weights, stats = load_mixture(config, split, statistics)
  action_dim = int(config.action_dim) or max(d.action_dim for d in loaded)
  state_dim = int(config.state_dim) or max(d.state_dim for d in loaded)
  for d in loaded:
    if d.action_dim > action_dim or d.state_dim > state_dim:
      raise DataError(f"dataset {d.name!r} has action/state dims {d.action_dim}/{d.state_dim}, more "
                      f"than config.action_dim/state_dim = {action_dim}/{state_dim}.")
  offsets, total, sources = {}, 0, []
  for d in loaded:
    src = FrameSource(d, stats[d.name], config, frame_offset=total, action_dim=action_dim,
                      state_dim=state_dim)
    offsets[d.name] = (total, total + len(src))
    total += len(src)
    sources.append(src)
  if total >= 2**31:
    raise DataError(f"{total} frames do not fit int32 frame_id; split the mixture.")
  streams = []
  for k, src in enumerate(sources):
    # Hosts take interleaved positions of the same per-epoch permutation: disjoint within an epoch.
    ds = grain.MapDataset.source(EpochShuffle(src, seed * 1_000_003 + k) if train else src)
    streams.append(ds[process_index::process_count])
  ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
  if train and config.shuffle_buffer > 1:
    ds = grain.MapDataset.source(WindowShuffle(ds, int(config.shuffle_buffer), seed * 7 + 1))
  fn = FrameTransform(config, tokenizers.Tokenize(tokenizer, config.max_tokens), train and config.augment)
  ds = ds.random_map(fn, seed=seed) if (train and config.augment) else ds.map(fn)
  ds = ds.batch(local_batch, drop_remainder=train, batch_fn=fn.collate)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config.num_threads),
                                                prefetch_buffer_size=int(config.prefetch)))
  info = PipelineInfo(
      datasets=[d.name for d in loaded], weights=weights, statistics=stats, frame_id_ranges=offsets,
      skipped={d.name: d.skipped for d in loaded}, action_dim=action_dim, state_dim=state_dim,
      gripper_masks={d.name: np.pad(d.gripper_mask, (0, action_dim - d.action_dim)).tolist()
                     for d in loaded})
  return it_ds, info


def make_pipeline(config, *, tokenizer: Any, split: str = "train", seed: int = 0,
                  statistics: Mapping[str, Mapping] | None = None, process_index: int | None = None,
                  process_count: int | None = None):
  """Iterator of batches (numpy, per host) with get_state()/set_state(); `.info` is a PipelineInfo."""
  ds, info = make_dataset(config, tokenizer=tokenizer, split=split, seed=seed, statistics=statistics,
                          process_index=process_index, process_count=process_count)
  it = iter(ds)
  it.info = info
  return it


@dataclasses.dataclass
class OrderedDataset:
  """One dataset of a mixture read in step order, without augmentation (for per-frame caches).

  `batches(batch_size)` yields (local indices int [n], contract batch); the frame_id of local index i
  is `frame_offset + i`, as in the training pipeline built from the same config. `fingerprint` is a
  sha256 over everything of a frame that reaches the model's inputs (encoded images of the configured
  cameras, instructions, episode lengths), so a regenerated dataset under the same name is noticed.
  """
  name: str
  path: str
  frame_offset: int
  source: FrameSource
  transform: FrameTransform

  def __len__(self) -> int:
    return len(self.source)

  @property
  def fingerprint(self) -> str:
    import hashlib  # pylint: disable=g-import-not-at-top
    h = hashlib.sha256()
    h.update(np.asarray([len(i) for i in self.source.instructions], np.int64).tobytes())
    for cams, instr in zip(self.source.images, self.source.instructions):
      for cam in cams:
        h.update(b"\x00" if cam is None else b"\x01")
        for data in (cam if cam is not None else ()):
          h.update(bytes(data))
      for text in instr:
        h.update(str(text).encode("utf-8") + b"\x00")
    return h.hexdigest()

  def batches(self, batch_size: int):
    for start in range(0, len(self), batch_size):
      idx = np.arange(start, min(start + batch_size, len(self)))
      yield idx, self.transform.collate([self.transform(self.source[int(i)]) for i in idx])


def ordered_datasets(config, *, tokenizer: Any, split: str = "train") -> list[OrderedDataset]:
  """Every dataset of config's mixture, in the training pipeline's frame_id layout, unaugmented."""
  require_geometry(config)
  loaded, _, stats = load_mixture(config, split)
  action_dim = int(config.action_dim) or max(d.action_dim for d in loaded)
  state_dim = int(config.state_dim) or max(d.state_dim for d in loaded)
  fn = FrameTransform(config, tokenizers.Tokenize(tokenizer, config.max_tokens), augment=False)
  out, total = [], 0
  for d in loaded:
    src = FrameSource(d, stats[d.name], config, frame_offset=total, action_dim=action_dim,
                      state_dim=state_dim)
    out.append(OrderedDataset(d.name, d.path, total, src, fn))
    total += len(src)
  return out


def dataset_statistics(config, split: str = "train") -> dict[str, dict]:
  """{dataset: statistics} for config.datasets (computed once, then read from the cache)."""
  _, _, stats = load_mixture(config, split)
  return stats

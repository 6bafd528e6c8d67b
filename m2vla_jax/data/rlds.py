"""Reading RLDS datasets stored by TFDS (local path or gs://), one standardized episode at a time.

`tfds.builder_from_directory` opens a prepared dataset; episodes are read as serialized records
(tfrecord shards through `tf.data.TFRecordDataset`, array_record shards through TFDS's random-access
data source) and deserialized in numpy with images kept as encoded bytes, so nothing is decoded until a
frame is sampled. Each episode's steps become flat `{'observation/state': [T, 7], ...}` arrays, the
registry entry standardizes them (`oxe.spec.standardize_episode`), and the episode metadata
(`episode_metadata/file_path`, ...) rides along.

Everything is checked here, where data enters: the dataset directory, the entry's keys against the
feature spec, each record (a truncated or corrupt shard, a feature missing from one episode or holding
the wrong number or kind of values: the record is inspected to name the feature), image shapes
(JPEG/PNG headers, without decoding), non-finite values, instruction text and empty episodes. Every
failure is a `DataError` naming dataset, episode (its file, and the shard) and field, never a bare
library error; with `skip_bad_episodes=True` bad episodes are skipped, logged and listed in
`LoadedDataset.skipped` (the statistics report their count). A shard that stops being readable loses
the rest of its episodes: each is listed (the split's shard lengths say how many).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tqdm
from etils import epath
from PIL import Image

from m2vla_jax.data.errors import DataError, where
from m2vla_jax.data.oxe.spec import DatasetSpec, gripper_mask, padding_mask, standardize_episode

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedDataset:
  """All standardized episodes of one split, in file order, plus what is needed to index them.

  episodes[i]: {'images': {slot: object [T] of bytes}, 'state': f32 [T, S], 'action': f32 [T, A],
                'instruction': list[str] (T), 'episode_index': int, 'file_path': str | None}
  """
  spec: DatasetSpec
  path: str                        # the version directory
  version: str
  split: str
  episodes: list[dict]
  gripper_mask: np.ndarray         # bool [A]
  image_shapes: dict[str, tuple[int, int]]   # slot -> (H, W)
  skipped: list[tuple[int, str]]   # (episode index, reason)
  action_padding_mask: np.ndarray | None = None   # bool [A]: constant (padding) dims; None = none
  state_padding_mask: np.ndarray | None = None    # bool [S]

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def num_steps(self) -> int:
    return sum(len(e["action"]) for e in self.episodes)

  @property
  def action_dim(self) -> int:
    return int(self.gripper_mask.shape[0])

  @property
  def state_dim(self) -> int:
    return int(self.episodes[0]["state"].shape[1]) if self.episodes else 0


def version_dir(data_dir: str, spec: DatasetSpec) -> epath.Path:
  """`data_dir/name/version`; the newest version directory if the entry pins none."""
  root = epath.Path(data_dir) / spec.name
  if not root.exists():
    raise DataError(f"{where(spec.name)}: directory {root} does not exist (config.data_dir="
                    f"{data_dir!r}); download or write the dataset there, or fix data_dir.")
  if spec.version is not None:
    vdir = root / spec.version
    if not (vdir / "dataset_info.json").exists():
      raise DataError(f"{where(spec.name)}: {vdir} holds no dataset_info.json (version "
                      f"{spec.version!r} pinned by the registry entry).")
    return vdir
  versions = [p for p in root.iterdir() if (p / "dataset_info.json").exists()]
  if not versions:
    raise DataError(f"{where(spec.name)}: no version directory with dataset_info.json under {root}.")
  def key(p):
    try:
      return tuple(int(x) for x in p.name.split("."))
    except ValueError:
      return (-1,)
  return max(versions, key=key)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _image_keys(step_features) -> dict[str, Any]:
  """{'observation/image_0': Image feature, ...} for every Image feature of a step."""
  import tensorflow_datasets as tfds
  flat = {}
  def walk(feat, prefix):
    if isinstance(feat, tfds.features.FeaturesDict):
      for k, v in feat.items():
        walk(v, f"{prefix}{k}/")
    else:
      flat[prefix.rstrip("/")] = feat
  walk(step_features, "")
  return {k: v for k, v in flat.items() if isinstance(v, tfds.features.Image)}


def _skip_decoders(image_keys) -> dict:
  import tensorflow_datasets as tfds
  dec: dict = {}
  for path in image_keys:
    node = dec
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = tfds.decode.SkipDecoding()
  return {"steps": dec}


class RawReader:
  """Serialized-record access to one split of a prepared TFDS RLDS dataset."""

  def __init__(self, data_dir: str, spec: DatasetSpec, split: str):
    import tensorflow_datasets as tfds
    self.spec = spec
    self.path = version_dir(data_dir, spec)
    try:
      self.builder = tfds.builder_from_directory(os.fspath(self.path))
    except Exception as e:  # TFDS raises several types for malformed directories.
      raise DataError(f"{where(spec.name)}: cannot open {self.path} as a TFDS dataset: {e}") from e
    info = self.builder.info
    if split not in info.splits:
      raise DataError(f"{where(spec.name)}: split {split!r} not in {list(info.splits)} ({self.path}).")
    self.split = split
    self.version = str(info.version)
    self.num_episodes = info.splits[split].num_examples
    if "steps" not in info.features:
      raise DataError(f"{where(spec.name, field='steps')}: {self.path} is not an RLDS dataset (features "
                      f"{sorted(info.features.keys())}); RLDS episodes hold a 'steps' Dataset feature.")
    step_feat = info.features["steps"].feature
    self.step_keys = set(_flatten(step_feat.get_serialized_info()))
    self.image_features = _image_keys(step_feat)
    for key in spec.required_keys():
      if key not in self.step_keys:
        raise DataError(f"{where(spec.name, field=key)}: named by the registry entry but not a step "
                        f"feature of {self.path} (all episodes); features: {sorted(self.step_keys)}.")
    self.decoders = _skip_decoders(self.image_features)
    self.file_format = info.file_format

  def declared_shape(self, key: str) -> tuple | None:
    feat = self.image_features.get(key)
    return None if feat is None else tuple(feat.shape)

  def _shards(self) -> list[tuple[str, int | None]]:
    """(file, number of episodes or None if unrecorded) per shard, in split order."""
    split = self.builder.info.splits[self.split]
    files = [os.fspath(p) for p in split.filepaths]
    lengths = list(getattr(split, "shard_lengths", None) or [])
    return list(zip(files, lengths if len(lengths) == len(files) else [None] * len(files)))

  def _records(self) -> Iterator[tuple[int, str, bytes | DataError]]:
    """(episode index, shard file, serialized record or the DataError that replaces it), in file order.

    A shard that stops being readable (truncated or corrupt record, or fewer records than the split
    info says) yields one DataError per episode it loses, then reading goes on with the next shard.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds
    shards = self._shards()
    start = 0
    if self.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      from array_record.python import array_record_data_source
      try:
        source = array_record_data_source.ArrayRecordDataSource([f for f, _ in shards])
      except Exception as e:  # missing or unreadable shard files
        raise DataError(f"{where(self.spec.name)}: cannot open the array_record shards of split "
                        f"{self.split!r} in {self.path}: {type(e).__name__}: {e}") from e
      ends = np.cumsum([n or 0 for _, n in shards])
      for i in range(len(source)):
        shard = shards[min(int(np.searchsorted(ends, i, side="right")), len(shards) - 1)][0]
        try:
          rec = source[i]
        except Exception as e:  # a corrupt chunk: this record only (random access goes on)
          rec = DataError(f"{where(self.spec.name, i)} [shard {shard}]: unreadable record "
                          f"({type(e).__name__}: {e}); re-download the shard or set "
                          "skip_bad_episodes=True.")
        yield i, shard, rec
      return
    for shard, n in shards:
      i, error = start, None
      try:
        for rec in tf.data.TFRecordDataset(shard):
          yield i, shard, rec.numpy()
          i += 1
      except tf.errors.OpError as e:  # DataLossError: truncated / corrupt record; NotFoundError
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      if error is None and n is not None and i < start + n:
        error = f"the shard holds {i - start} records, the split info says {n}"
      if error is not None:
        lost = range(i, start + n) if (n is not None and start + n > i) else range(i, i + 1)
        for j in lost:
          yield j, shard, DataError(
              f"{where(self.spec.name, j)} [shard {shard}]: unreadable, the shard is damaged from "
              f"episode {i} on ({error}); {len(lost)} episode(s) of this shard lost. Re-download the "
              "shard or set skip_bad_episodes=True.")
      start = start + n if n is not None else i + (error is not None)

  def diagnose(self, raw: bytes) -> tuple[str | None, str]:
    """(field, what is wrong) for a record TFDS cannot deserialize: the first feature missing or holding
    the wrong kind or number of values; (None, '') if the record looks well formed."""
    import tensorflow as tf
    try:
      ex = tf.train.Example.FromString(raw)
    except Exception as e:
      return None, f"not a tf.train.Example ({type(e).__name__})"
    feats = ex.features.feature
    def expect(info):   # the tf.train.Feature list TFDS writes for a serialized TensorInfo
      d = info.dtype
      name = getattr(d, "name", str(d))
      if name in ("string", "object", "bytes", "str"):
        return "bytes_list"
      kind = np.dtype(d.as_numpy_dtype if hasattr(d, "as_numpy_dtype") else d).kind
      return "float_list" if kind == "f" else "int64_list"
    def values(f):
      kind = f.WhichOneof("kind")
      return kind, (len(getattr(f, kind).value) if kind else 0)
    top = _flatten(self.builder.info.features.get_serialized_info())
    steps_info = {f"steps/{k}": v for k, v in _flatten(
        self.builder.info.features["steps"].feature.get_serialized_info()).items()}
    t = values(feats["steps/is_first"])[1] if "steps/is_first" in feats else None
    for key, info in {**{k: v for k, v in top.items() if not k.startswith("steps/")},
                      **steps_info}.items():
      field = key[len("steps/"):] if key.startswith("steps/") else key
      if key not in feats:
        return field, "missing from this episode's record"
      kind, count = values(feats[key])
      want = expect(info)
      per_step = int(np.prod([d for d in info.shape if d is not None])) if info.shape else 1
      n_steps = t if key.startswith("steps/") else 1
      if count and kind != want:
        return field, f"holds a {kind}, the feature spec needs a {want} ({info.dtype})"
      if n_steps is not None and None not in (info.shape or ()) and count != n_steps * per_step:
        return field, (f"holds {count} values, the feature spec needs {n_steps} step(s) x "
                       f"{tuple(info.shape)} = {n_steps * per_step}")
    return None, ""

  def episodes(self) -> Iterator[tuple[int, dict | None, dict[str, Any], DataError | None]]:
    """(index, flat step arrays, flat episode metadata, None) per episode in file order, or
    (index, None, metadata, DataError) for an episode that cannot be read."""
    features = self.builder.info.features
    for i, shard, raw in self._records():
      if isinstance(raw, DataError):
        yield i, None, {}, raw
        continue
      try:
        ex = features.deserialize_example_np(raw, decoders=self.decoders)
      except Exception as e:  # TFDS raises TypeError / ValueError / tf errors, often naming nothing
        field, problem = self.diagnose(raw)
        fp = _file_path_of(raw)
        msg = (f"{where(self.spec.name, i, field, file_path=fp)} [shard {shard}]: "
               f"{problem or 'cannot be deserialized'} ({type(e).__name__}: {str(e)[:300]}); fix the "
               "episode or set skip_bad_episodes=True.")
        yield i, None, {"file_path": fp}, DataError(msg)
        continue
      steps_src = ex["steps"]
      steps = [_flatten(steps_src[j]) for j in range(len(steps_src))]
      flat = {}
      for k in self.step_keys:
        vals = [s[k] for s in steps]
        if k in self.image_features or (vals and isinstance(vals[0], (bytes, str))):
          arr = np.empty(len(vals), object)
          arr[:] = vals
        else:
          arr = np.asarray(vals)
        flat[k] = arr
      meta = _flatten(ex.get("episode_metadata", {}))
      yield i, flat, meta, None


def _file_path_of(raw: bytes) -> str | None:
  """episode_metadata/file_path straight from a serialized record (for records TFDS cannot read)."""
  try:
    import tensorflow as tf
    f = tf.train.Example.FromString(raw).features.feature.get("episode_metadata/file_path")
    return f.bytes_list.value[0].decode("utf-8", "replace") if f and f.bytes_list.value else None
  except Exception:  # the record is already known to be bad; the message just has no file
    return None


def image_size(data: Any) -> tuple[tuple[int, int], str]:
  """((H, W), mode) of an encoded image (header only) or of a uint8 array."""
  if isinstance(data, np.ndarray):
    return data.shape[:2], "RGB" if data.ndim == 3 and data.shape[-1] == 3 else f"shape{data.shape}"
  with Image.open(io.BytesIO(data)) as im:
    return (im.size[1], im.size[0]), im.mode


def load_dataset(data_dir: str, spec: DatasetSpec, split: str, *, skip_bad_episodes: bool = False,
                 progress: bool = True) -> LoadedDataset:
  """Reads and standardizes every episode of `split` (progress bar); see module docstring."""
  reader = RawReader(data_dir, spec, split)
  episodes, skipped, widths_seen, state_widths_seen = [], [], None, None
  shapes: dict[str, tuple[int, int]] = {}
  for slot, key in spec.cameras.items():
    declared = reader.declared_shape(f"observation/{key}")
    if declared and declared[0] is not None and declared[1] is not None:
      shapes[slot] = (int(declared[0]), int(declared[1]))
  it = reader.episodes()
  if progress:
    it = tqdm.tqdm(it, total=reader.num_episodes, desc=f"read {spec.name}/{split}", leave=False)
  for i, steps, meta, error in it:
    fp = meta.get("file_path")
    fp = fp.decode("utf-8", "replace") if isinstance(fp, bytes) else fp
    try:
      if error is not None:
        raise error
      ep = _checked_episode(spec, steps, i, fp, shapes)
      if widths_seen is None:
        widths_seen, state_widths_seen = ep["action_widths"], ep["state_widths"]
      elif ep["action_widths"] != widths_seen:
        raise DataError(f"{where(spec.name, i, 'action', file_path=fp)}: field widths "
                        f"{ep['action_widths']} differ from earlier episodes' {widths_seen}.")
      elif ep["state_widths"] != state_widths_seen:
        raise DataError(f"{where(spec.name, i, 'state', file_path=fp)}: field widths "
                        f"{ep['state_widths']} differ from earlier episodes' {state_widths_seen}.")
    except DataError as e:
      if not skip_bad_episodes:
        raise
      skipped.append((i, str(e)))
      log.warning("skipping: %s", e)
      continue
    ep["episode_index"] = i
    ep["file_path"] = fp
    del ep["action_widths"], ep["state_widths"]
    episodes.append(ep)
  if not episodes:
    reasons = "; ".join(r for _, r in skipped[:3])
    raise DataError(f"{where(spec.name)}: split {split!r} of {reader.path} has no usable episode "
                    f"({len(skipped)} skipped{': ' + reasons if reasons else ''}).")
  if skipped:
    log.warning("%s/%s: skipped %d of %d episodes (skip_bad_episodes=True; listed in the statistics)",
                spec.name, split, len(skipped), len(skipped) + len(episodes))
  return LoadedDataset(spec=spec, path=os.fspath(reader.path), version=reader.version, split=split,
                       episodes=episodes, gripper_mask=gripper_mask(spec, widths_seen),
                       image_shapes=shapes, skipped=skipped,
                       action_padding_mask=padding_mask(spec.action, widths_seen),
                       state_padding_mask=padding_mask(spec.state, state_widths_seen))


def _checked_episode(spec: DatasetSpec, steps, i: int, fp: str | None,
                     shapes: dict[str, tuple[int, int]]) -> dict:
  """The standardized episode with its image headers checked (RGB, one shape per camera slot)."""
  ep = standardize_episode(spec, steps, i, fp)
  for slot, frames in ep["images"].items():
    field = f"observation/{spec.cameras[slot]}"
    for t, frame in enumerate(frames):
      try:
        hw, mode = image_size(frame)
      except Exception as e:
        raise DataError(f"{where(spec.name, i, field, t, fp)}: undecodable image: {e}") from e
      if mode != "RGB":
        raise DataError(f"{where(spec.name, i, field, t, fp)}: image mode {mode}, expected RGB.")
      expected = shapes.setdefault(slot, tuple(hw))
      if tuple(hw) != expected:
        raise DataError(f"{where(spec.name, i, field, t, fp)}: image shape {tuple(hw) + (3,)}, "
                        f"expected {expected + (3,)} (declared or first episode's).")
  return ep

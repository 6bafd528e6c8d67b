"""Reading RLDS datasets stored by TFDS (local path or gs://), one standardized episode at a time.

`tfds.builder_from_directory` opens a prepared dataset; episodes are read as serialized records
(tfrecord shards through `tf.data.TFRecordDataset`, array_record shards through TFDS's random-access
data source) and deserialized in numpy with images kept as encoded bytes, so nothing is decoded until a
frame is sampled. Each episode's steps become flat `{'observation/state': [T, 7], ...}` arrays, the
registry entry standardizes them (`oxe.spec.standardize_episode`), and the episode metadata
(`episode_metadata/file_path`, ...) rides along.

Everything is checked here, where data enters: the dataset directory, the entry's keys against the
feature spec, image shapes (JPEG/PNG headers, without decoding), non-finite values and empty episodes.
Bad episodes raise `DataError` naming dataset, episode and field, or with `skip_bad_episodes=True` are
skipped and listed in `LoadedDataset.skipped`.
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
from m2vla_jax.data.oxe.spec import DatasetSpec, gripper_mask, standardize_episode

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

  def _records(self) -> Iterator[bytes]:
    import tensorflow as tf
    import tensorflow_datasets as tfds
    if self.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      from array_record.python import array_record_data_source
      files = [os.fspath(p) for p in self.builder.info.splits[self.split].filepaths]
      source = array_record_data_source.ArrayRecordDataSource(files)
      for i in range(len(source)):
        yield source[i]
    else:
      files = [os.fspath(p) for p in self.builder.info.splits[self.split].filepaths]
      for rec in tf.data.TFRecordDataset(files):
        yield rec.numpy()

  def episodes(self) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, Any]]]:
    """(index, flat step arrays, flat episode metadata) per episode, in file order."""
    features = self.builder.info.features
    for i, raw in enumerate(self._records()):
      ex = features.deserialize_example_np(raw, decoders=self.decoders)
      steps_src = ex["steps"]
      steps = [_flatten(steps_src[j]) for j in range(len(steps_src))]
      keys = self.step_keys
      flat = {}
      for k in keys:
        vals = [s[k] for s in steps]
        if k in self.image_features or (vals and isinstance(vals[0], (bytes, str))):
          arr = np.empty(len(vals), object)
          arr[:] = vals
        else:
          arr = np.asarray(vals)
        flat[k] = arr
      meta = _flatten(ex.get("episode_metadata", {}))
      yield i, flat, meta


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
  episodes, skipped, widths_seen = [], [], None
  shapes: dict[str, tuple[int, int]] = {}
  for slot, key in spec.cameras.items():
    declared = reader.declared_shape(f"observation/{key}")
    if declared and declared[0] is not None and declared[1] is not None:
      shapes[slot] = (int(declared[0]), int(declared[1]))
  state_dim = None
  it = reader.episodes()
  if progress:
    it = tqdm.tqdm(it, total=reader.num_episodes, desc=f"read {spec.name}/{split}", leave=False)
  for i, steps, meta in it:
    fp = meta.get("file_path")
    fp = fp.decode() if isinstance(fp, bytes) else fp
    try:
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
      if widths_seen is None:
        widths_seen = ep["action_widths"]
      elif ep["action_widths"] != widths_seen:
        raise DataError(f"{where(spec.name, i, 'action', file_path=fp)}: field widths "
                        f"{ep['action_widths']} differ from earlier episodes' {widths_seen}.")
      if state_dim is None:
        state_dim = ep["state"].shape[1]
      elif ep["state"].shape[1] != state_dim:
        raise DataError(f"{where(spec.name, i, 'state', file_path=fp)}: width {ep['state'].shape[1]} "
                        f"differs from earlier episodes' {state_dim}.")
    except DataError as e:
      if not skip_bad_episodes:
        raise
      skipped.append((i, str(e)))
      log.warning("skipping: %s", e)
      continue
    ep["episode_index"] = i
    ep["file_path"] = fp
    del ep["action_widths"]
    episodes.append(ep)
  if not episodes:
    reasons = "; ".join(r for _, r in skipped[:3])
    raise DataError(f"{where(spec.name)}: split {split!r} of {reader.path} has no usable episode "
                    f"({len(skipped)} skipped{': ' + reasons if reasons else ''}).")
  if skipped:
    log.warning("%s/%s: skipped %d of %d episodes", spec.name, split, len(skipped),
                len(skipped) + len(episodes))
  return LoadedDataset(spec=spec, path=os.fspath(reader.path), version=reader.version, split=split,
                       episodes=episodes, gripper_mask=gripper_mask(spec, widths_seen),
                       image_shapes=shapes, skipped=skipped)

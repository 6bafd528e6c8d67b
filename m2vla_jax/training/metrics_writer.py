"""TensorBoard scalars (tensorboardX) for the trainer, on process 0 only; local paths or gs://.

Vector metrics (e.g. per-layer MoL gates [L]) are written as one scalar per element, `name/i`. gs:// event
files go through `etils.epath` (TF's gfile or fsspec/gcsfs, whichever epath is configured with), like the
checkpoints; tensorboardX's own GCS writer would need the google-cloud-storage client and its credentials.
An object store cannot append, so a gs:// event file becomes visible when the writer is closed.
"""
from __future__ import annotations

from typing import Any, Mapping

from absl import logging
import numpy as np


class _GFileWriter:
  def __init__(self, path: str):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self._f = epath.Path(path).open("wb")

  def write(self, data: bytes) -> None:
    self._f.write(data)

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class _GFileWriterFactory:
  """tensorboardX's writer-factory interface (`open`, `directory_check`)."""

  def open(self, path: str) -> _GFileWriter:
    return _GFileWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores need no directories before objects are written.


_registered = False


def _register_gs() -> None:
  global _registered
  if not _registered:
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory("gs", _GFileWriterFactory())
    _registered = True


class MetricsWriter:
  """write(step, {name: scalar or 1-D array}); a no-op when disabled (non-zero processes)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      if logdir.startswith("gs://"):
        _register_gs()
      self._writer = SummaryWriter(logdir)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    flat = {}
    for name, value in scalars.items():
      arr = np.asarray(value)
      if arr.ndim == 0:
        flat[name] = float(arr)
      elif arr.ndim == 1:
        for i, v in enumerate(arr):
          flat[f"{name}/{i}"] = float(v)
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(flat.items())))
    if self._writer is not None:
      for k, v in flat.items():
        self._writer.add_scalar(k, v, step)
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

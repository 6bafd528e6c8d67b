"""The one exception type the data package raises for bad datasets, entries and configs.

Every message names the dataset, the episode (index and, where the data has one, its file path) and the
field, so a bad record is found without a debugger. Raising `DataError` where the data enters (reading,
standardization, statistics) keeps failures out of worker threads and tf.data graphs.
"""
from __future__ import annotations


class DataError(ValueError):
  """A dataset, registry entry or data config is unusable; the message says where and how to fix it."""


def where(dataset: str, episode: int | None = None, field: str | None = None,
          step: int | None = None, file_path: str | None = None) -> str:
  """'dataset 'x' episode 3 (file …) step 2 field 'action'' — the location prefix of error messages."""
  parts = [f"dataset {dataset!r}"]
  if episode is not None:
    parts.append(f"episode {episode}" + (f" ({file_path})" if file_path else ""))
  if step is not None:
    parts.append(f"step {step}")
  if field is not None:
    parts.append(f"field {field!r}")
  return " ".join(parts)

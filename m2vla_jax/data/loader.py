"""The trainer's data source for `config.data.kind='rlds'`: the grain RLDS pipeline behind the
trainer's data interface (iterator + get_state / set_state / statistics).

`config.data`: `pipeline` (the pipeline's own ConfigDict, `pipeline.get_config()` overridden by the
config file; its batch_size is the trainer's `config.batch_size` and its batch geometry the policy's,
see `pipeline_config`) and `tokenizer` (a
`text.tokenizers.make_tokenizer` spec). The pipeline shards by host itself, so every host passes the
same seed. Split 'val' maps to the dataset's validation split name (`config.data.val_split`).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from m2vla_jax.policies import registry
from m2vla_jax.text import tokenizers


class PipelineData:
  """The pipeline's iterator with the trainer's data interface (get_state / set_state / statistics)."""

  def __init__(self, iterator: Any, normalization: str):
    self._it = iterator
    self.normalization = normalization
    self.info = iterator.info

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> Any:
    return self._it.get_state()

  def set_state(self, state: Any) -> None:
    self._it.set_state(state)

  def statistics(self) -> dict:
    return {"normalization": self.normalization, "datasets": self.info.statistics, "gripper_masks": self.info.gripper_masks,
            "frame_id_ranges": {k: list(v) for k, v in self.info.frame_id_ranges.items()},
            "action_dim": self.info.action_dim, "state_dim": self.info.state_dim}


class GeometryError(ValueError):
  """config.data.pipeline states a batch dimension that disagrees with the policy's."""


def pipeline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's full pipeline config: `pipeline.get_config()` under config.data.pipeline, the batch
  size from config.batch_size and the batch geometry (horizon, state/action widths, text tokens)
  from the policy, so a config states each fact once. A pipeline field set to another value than the
  policy's is a GeometryError naming both fields (unset: None, or 0 for the widths)."""
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  base = pipeline.get_config()
  with base.unlocked():
    base.update(config.data.pipeline.to_dict() if "pipeline" in config.data else {})
  base.batch_size = config.batch_size
  geometry = registry.batch_geometry(config.policy, config.model)
  for field, value in geometry.items():
    given = base.get(field)
    if given not in (None, 0) and int(given) != value:
      model_field = "the VLM's max_text_tokens" if field == "max_tokens" else f"config.model.{field}"
      raise GeometryError(f"config.data.pipeline.{field}={given} disagrees with the policy's {value} "
                          f"({model_field}); leave config.data.pipeline.{field} unset: the loader "
                          f"takes it from the policy")
    base[field] = value
  return base


def make_data(config: ml_collections.ConfigDict, split: str, batch_size: int, seed: int,
              process_index: int = 0, process_count: int = 1) -> PipelineData:
  # The pipeline splits the global batch per host and shards by host itself (jax.process_*).
  del batch_size, seed, process_index, process_count
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split_name = config.data.get("val_split", "val") if split == "val" else split
  pcfg = pipeline_config(config)
  it = pipeline.make_pipeline(pcfg, tokenizer=tokenizers.make_tokenizer(config.data.tokenizer), split=split_name,
                              seed=config.seed)
  return PipelineData(it, pcfg.normalization)

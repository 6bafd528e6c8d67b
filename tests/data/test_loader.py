"""The loader builds the pipeline to the policy's batch geometry: a config states horizon, widths and
the text budget once (config.model), and a pipeline field that disagrees is an error naming both."""
import pytest

from m2vla_jax.data import loader
from m2vla_jax.data import pipeline
from m2vla_jax.data.errors import DataError
import support


def _rlds_config(**overrides):
  return support.debug_config("model=m2vla,data=rlds", **overrides)


def test_geometry_comes_from_the_policy():
  c = _rlds_config(**{"model.horizon": 6})
  with c.unlocked():
    c.model.vlm_overrides.max_text_tokens = 12
  p = loader.pipeline_config(c)
  # configs/debug.py sets none of these in data.pipeline; each is the policy's.
  assert (p.horizon, p.max_tokens, p.state_dim, p.action_dim) == (6, 12, 8, 7)
  assert p.batch_size == c.batch_size
  toy = support.debug_config("data=rlds", **{"model.num_tokens": 40})
  assert loader.pipeline_config(toy).max_tokens == 40


@pytest.mark.parametrize("field,value,model_field", [
    ("horizon", 3, "config.model.horizon"),
    ("max_tokens", 99, "the VLM's max_text_tokens"),
    ("action_dim", 9, "config.model.action_dim")])
def test_a_pipeline_field_that_disagrees_names_both(field, value, model_field):
  c = _rlds_config(**{f"data.pipeline.{field}": value})
  with pytest.raises(loader.GeometryError, match=rf"config.data.pipeline.{field}={value} disagrees "
                                                 rf"with the policy's \d+ \({model_field}\)"):
    loader.pipeline_config(c)
  # The same value as the policy's is accepted (old run configs carry both).
  same = loader.pipeline_config(_rlds_config())[field]
  assert loader.pipeline_config(_rlds_config(**{f"data.pipeline.{field}": same}))[field] == same


def test_a_pipeline_without_a_policy_must_be_given_its_geometry(tmp_path):
  c = pipeline.get_config()
  c.update(data_dir=str(tmp_path), datasets="bridge")
  with pytest.raises(DataError, match=r"config.horizon is unset: a training run takes it from the policy"):
    pipeline.make_pipeline(c, tokenizer=None, process_index=0, process_count=1)

"""Parameter groups of the optimizer (training/optimizer.py): per-group peak learning rates, global clipping,
and the errors a bad `config.optimizer.groups` gets."""
import ml_collections
import numpy as np
import pytest

from m2vla_jax.training import config_base
from m2vla_jax.training import optimizer
from m2vla_jax.training import validation


def _config(groups, clip=0.0, weight_decay=0.1):
  c = config_base.base_config()
  c.total_steps = 10
  c.optimizer.warmup_steps = 0
  c.optimizer.clip_grad_norm = clip
  c.optimizer.weight_decay = weight_decay
  c.optimizer.groups = groups
  return c


def _adam_first_step(p, g, lr, wd, eps):
  """numpy float64: AdamW's first update (bias-corrected m = g, v = g^2), decay on >1-D params only."""
  p, g = np.float64(p), np.float64(g)
  decay = wd * p if p.ndim > 1 else 0.0
  return -lr * (g / (np.abs(g) + eps) + decay)


def test_each_group_steps_at_its_own_learning_rate():
  rng = np.random.default_rng(0)
  params = {"vlm/llm/lora_a": rng.normal(size=(4, 3)).astype(np.float32),
            "vlm/router/w": rng.normal(size=(3, 2)).astype(np.float32),
            "head/w": rng.normal(size=(3, 3)).astype(np.float32),
            "head/b": rng.normal(size=(3,)).astype(np.float32)}
  grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  c = _config([("adapters", r"vlm/llm/.*", 1e-5), ("router", r"vlm/router/.*", 3e-4)])
  validation.validate_config(c)
  tx, _ = optimizer.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(params), params)
  lrs = {"vlm/llm/lora_a": 1e-5, "vlm/router/w": 3e-4, "head/w": c.optimizer.lr, "head/b": c.optimizer.lr}
  for k in params:
    # The schedule's value at step 0 with no warmup is the group's peak lr.
    want = _adam_first_step(params[k], grads[k], lrs[k], c.optimizer.weight_decay, c.optimizer.eps)
    np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-5, atol=1e-12, err_msg=k)


def _numpy_adamw_two_steps(params, grads_seq, lrs, clip, b1, b2, eps):
  """float64 reference: global-norm clipping over ALL parameters, then Adam per parameter at its lr."""
  m = {k: 0.0 for k in params}
  v = {k: 0.0 for k in params}
  p = {k: np.float64(x) for k, x in params.items()}
  for t, grads in enumerate(grads_seq, start=1):
    norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in grads.values()))
    scale = min(1.0, clip / norm)
    for k, g in grads.items():
      g = np.float64(g) * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      p[k] = p[k] - lrs[k] * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
  return p


def test_clipping_stays_global_across_groups():
  # Step 1's gradients (global norm 10) are clipped by one factor for both groups; clipping each group
  # on its own would scale 'a' by 1/6 and 'b' by 1/8 and change step 2's Adam moments.
  params = {"a/w": np.ones((2, 2), np.float32), "b/w": np.ones((2, 2), np.float32)}
  steps = [{"a/w": np.full((2, 2), 3.0, np.float32), "b/w": np.full((2, 2), 4.0, np.float32)},
           {"a/w": np.full((2, 2), 0.03, np.float32), "b/w": np.full((2, 2), -0.04, np.float32)}]
  c = _config([("a", "a/.*", 1e-3)], clip=1.0, weight_decay=0.0)
  c.optimizer.end_lr_factor = 1.0   # a constant lr over both steps keeps the reference simple
  tx, _ = optimizer.make_optimizer(c)
  state, p = tx.init(params), dict(params)
  for grads in steps:
    updates, state = tx.update(grads, state, p)
    p = {k: p[k] + np.asarray(updates[k]) for k in p}
  o = c.optimizer
  want = _numpy_adamw_two_steps(params, steps, {"a/w": 1e-3, "b/w": o.lr}, 1.0, o.b1, o.b2, o.eps)
  for k in p:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("groups,match", [
    ([("default", "head/.*", 1e-3)], r"optimizer.groups\[0\].*'default'"),
    ([("a", "head/.*", 1e-3), ("a", "vlm/.*", 1e-3)], r"optimizer.groups\[1\].*used twice"),
    ([("a", "head/.*")], r"optimizer.groups\[0\].*triple"),
    ([("a", "head/.*", -1.0)], r"optimizer.groups\[0\].*lr >= 0"),
])
def test_bad_groups_name_the_field(groups, match):
  c = _config(groups)
  c.policy = "toy"
  c.model = ml_collections.ConfigDict()
  with pytest.raises(config_base.ConfigError, match=match):
    validation.validate_config(c)


def test_describe_groups_counts_every_parameter():
  trainable = {"head/w": np.zeros((10, 10), np.float32), "vlm/llm/lora_a": np.zeros((5,), np.float32)}
  frozen = {"vlm/llm/w": np.zeros((85,), np.float32)}
  c = _config([("adapters", "vlm/llm/.*", 1e-5)])
  tx, _ = optimizer.make_optimizer(c)
  table = optimizer.describe_groups(trainable, frozen, tx.init(trainable), c)
  assert "adapters" in table and "default" in table and "frozen" in table
  # 5 of 190 parameters are adapters, 100 the head, 85 frozen.
  assert "2.632%" in table and "52.632%" in table and "44.737%" in table
  # Adam keeps two float32 moments per trainable parameter: 2 * 4 * 105 bytes.
  assert f"{2 * 4 * 105 / 2**20:.2f} MiB" in table


def test_a_group_matching_no_trainable_parameter_is_an_error():
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  c = config_base.load_config_file("configs/debug.py").get_config("steps=2,batch=8")
  c.optimizer.groups = [("head", "head/.*", 1e-3), ("typo", "haed/.*", 1e-3)]
  validation.validate_config(c)
  example = next(trainer.build_data(c, "train"))
  with pytest.raises(config_base.ConfigError, match=r"optimizer.groups\[1\]: 'typo' regex 'haed/\.\*' "
                                                     r"matches no trainable parameter"):
    trainer.setup(c, example)

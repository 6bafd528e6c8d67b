"""LoRA, VLA-GSE and full fine-tuning as policy configs (policies/m2vla.py `adapter`, the trainer's
`prepare` hook, LoRA folded for inference and export, configs/sim_pretrained.py's comparison rows)."""
import jax
import numpy as np
import pytest

from m2vla_jax.core import freezing
from m2vla_jax.core import tree_util
from m2vla_jax.inference import policy as inference_policy
from m2vla_jax.models import adapters
from m2vla_jax.policies import m2vla
from m2vla_jax.training import config_base
from m2vla_jax.training import optimizer
from m2vla_jax.training import trainer
from m2vla_jax.training import validation

H, A, S = 4, 2, 3


def _config(kind, **kw):
  cfg = dict(vlm="tiny", num_cameras=1, state_dim=S, horizon=H, action_dim=A, frozen_dtype="float32",
             head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_blocks=2), msm=False,
             adapter=dict(kind=kind, targets="llm/.*", rank=4, alpha=8.0),
             trainable=m2vla.adapter_trainable_rules())
  cfg.update(kw)
  return cfg


def _batch(seed=0, b=3, t=4):
  r = np.random.default_rng(seed)
  return {"observation": {"images": r.integers(0, 256, (b, 1, 32, 32, 3)).astype(np.uint8),
                          "image_mask": np.ones((b, 1), bool),
                          "state": r.normal(size=(b, S)).astype(np.float32),
                          "tokens": r.integers(1, 100, (b, t)).astype(np.int32),
                          "token_mask": np.ones((b, t), bool)},
          "actions": r.uniform(-1, 1, (b, H, A)).astype(np.float32),
          "action_mask": np.ones((b, H), bool), "frame_id": np.arange(b, dtype=np.int32)}


def _trainer_config(model):
  c = config_base.base_config()
  c.policy = "m2vla"
  c.model = m2vla.get_config()
  for k, v in model.items():
    if isinstance(v, dict):
      c.model[k].update(v)
    else:
      c.model[k] = v
  c.mesh.data = 1
  return c


def test_lora_trains_only_adapters_and_head_and_folds_for_inference():
  config = _trainer_config(_config("lora"))
  policy = trainer.build_policy(config)
  batch = _batch()
  params, state = jax.jit(policy.init)(jax.random.PRNGKey(0), batch)
  mask = tree_util.flatten(policy.frozen_mask(params))
  trains = sorted(k for k, v in mask.items() if v)
  assert all(k.startswith("head/") or "_lora_" in k for k in trains)
  assert any(k.startswith("vlm/llm/layers/attn/") and k.endswith("_lora_b") for k in trains)
  # What trains is decided by the policy's rules; that no gradient reaches a frozen path is checked
  # for the adapter layers in tests/models/test_adapters.py and for the policy's stop-gradient in tests/policies/test_m2vla.py.
  # A trained head (its output layer starts at zero, which would hide the backbone) and trained
  # adapters (B perturbed), folded into the weights the way inference and export load a LoRA run
  # (`inference.policy.fold_lora`): the plain policy it returns acts the same.
  r = np.random.default_rng(1)
  flat = tree_util.flatten(params)
  for k in flat:
    if k.startswith("head/"):
      flat[k] = flat[k] + r.normal(scale=0.1, size=flat[k].shape).astype(np.float32)
  for k in trains:
    if k.endswith("_lora_b"):
      flat[k] = r.normal(scale=0.05, size=flat[k].shape).astype(np.float32)
  params = tree_util.unflatten(flat)
  folded_config, plain, merged = inference_policy.fold_lora(config, policy, params)
  assert plain.adapter_config is None and folded_config.model.adapter.kind is None
  assert config.model.adapter.kind == "lora"                     # the run's own config is untouched
  assert not any("_lora_" in k for k in tree_util.flatten(merged))
  obs = batch["observation"]
  adapted = np.asarray(jax.jit(policy.sample_actions)(params, state, obs, jax.random.PRNGKey(2)))
  folded = np.asarray(jax.jit(plain.sample_actions)(merged, state, obs, jax.random.PRNGKey(2)))
  base = tree_util.unflatten({k: v for k, v in tree_util.flatten(params["vlm"]).items()
                              if "_lora_" not in k})
  unadapted = np.asarray(jax.jit(plain.sample_actions)({**params, "vlm": base}, state, obs,
                                                       jax.random.PRNGKey(2)))
  # float32 sums in another order (W x + B A x vs (W + B A) x): agreement to ~1e-6 of the actions'
  # scale; the adapters themselves move the actions by orders of magnitude more.
  scale = np.abs(adapted).max()
  np.testing.assert_allclose(folded, adapted, rtol=0, atol=1e-4 * scale)
  assert np.abs(unadapted - adapted).max() > 100 * 1e-4 * scale
  # GSE's experts are routed per token: nothing folds, the policy comes back as it was.
  gse_config = _trainer_config(_config("gse", adapter=dict(kind="gse", targets="llm/.*", rank=8)))
  gse = trainer.build_policy(gse_config)
  assert inference_policy.fold_lora(gse_config, gse, params) == (gse_config, gse, params)


def test_gse_is_spectrally_initialised_at_setup_and_adds_its_aux_loss():
  c = _trainer_config(_config("gse", adapter=dict(kind="gse", targets="llm/.*", rank=8, svd="exact")))
  batch = _batch(1)
  s = trainer.setup(c, batch, devices=jax.devices()[:1])
  policy, params = s.policy, s.state.params()
  flat = tree_util.flatten(params)
  # prepare ran: B is no longer zero and W' = W - sum_i s_i B_i A_i, i.e. W' + sum = the init's W.
  # The trainer's init draws from the first half of PRNGKey(seed) (train_state.make_init_fn).
  fresh, _ = jax.jit(policy.init)(jax.random.split(jax.random.PRNGKey(c.seed))[0], batch)
  w0 = np.asarray(tree_util.flatten(fresh)["vlm/llm/layers/mlp/linear"], np.float64)
  w1 = np.asarray(flat["vlm/llm/layers/mlp/linear"], np.float64)
  a = np.asarray(flat["vlm/llm/layers/mlp/linear_gse_a"], np.float64)      # [L, E, d_in, r_e]
  b = np.asarray(flat["vlm/llm/layers/mlp/linear_gse_b"], np.float64)      # [L, E, r_e, d_out]
  sc = np.asarray(flat["vlm/llm/layers/mlp/linear_gse_scale"], np.float64)  # [L, E]
  assert np.any(b)
  delta = np.einsum("le,ledr,lero->ldo", sc, a, b)
  np.testing.assert_allclose(w1 + delta, w0, rtol=0, atol=1e-5 * np.abs(w0).max())
  trains = [k for k, v in tree_util.flatten(policy.frozen_mask(params)).items() if v]
  assert not any(k.endswith("_gse_scale") for k in trains) and any(k.endswith("_gse_router") for k in trains)
  loss, (metrics, _) = jax.jit(policy.loss)(params, s.state.policy_state, batch, jax.random.PRNGKey(3))
  assert float(metrics["gse_aux"]) > 0
  np.testing.assert_allclose(float(loss), float(metrics["l1"]) + 0.01 * float(metrics["gse_aux"]),
                             rtol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora", "gse", "mole"])
def test_comparison_rows_are_configs_of_one_trainer(method):
  path = "configs/sim_pretrained.py"
  c = config_base.load_config_file(path).get_config(f"method={method},steps=10")
  validation.validate_config(c)
  if method == "full":
    assert [tuple(r) for r in c.model.trainable] == [(".*", True)]
    assert optimizer.group_of("vlm/llm/layers/mlp/linear", optimizer.groups(c)) == "backbone"
  elif method in ("lora", "gse"):
    assert c.model.adapter.kind == method and c.model.adapter.targets == "llm/.*"
    assert freezing.trains("vlm/llm/layers/mlp/linear_lora_a", c.model.trainable)
    assert not freezing.trains("vlm/llm/layers/mlp/linear", c.model.trainable)
  else:
    assert c.policy == "mole_vla" and c.model.router.num_skip == 9 and c.model.cogkd.weight == 0.5
  with pytest.raises(config_base.ConfigError, match="method='lorra'"):
    config_base.load_config_file(path).get_config("method=lorra")

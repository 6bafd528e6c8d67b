"""MoLe-VLA policy (policies/mole_vla.py): the contract on a skipping backbone, what trains, the two
loss terms against their definitions, the EMA teacher, and the config errors."""
import jax
import numpy as np
import pytest

from m2vla_jax.core import tree_util
from m2vla_jax.models import layer_skip
from m2vla_jax.policies import mole_vla
from m2vla_jax.policies import registry

H, A, S = 4, 2, 3


def _config(**kw):
  # tiny_gemma3: a 6-layer LLM, so that skipping has a choice to make.
  cfg = dict(vlm="tiny_gemma3", num_cameras=1, state_dim=S, horizon=H, action_dim=A,
             frozen_dtype="float32", head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64,
                                               num_blocks=2),
             router=dict(num_skip=2, width=32, mlp_dim=16, num_heads=2, ff_dim=32))
  cfg.update(kw)
  return cfg


def _batch(seed=0, b=4, t=5):
  r = np.random.default_rng(seed)
  lengths = r.integers(2, t + 1, b)
  return {"observation": {"images": r.integers(0, 256, (b, 1, 32, 32, 3)).astype(np.uint8),
                          "image_mask": np.ones((b, 1), bool),
                          "state": r.normal(size=(b, S)).astype(np.float32),
                          "tokens": r.integers(1, 100, (b, t)).astype(np.int32),
                          "token_mask": np.arange(t)[None] < lengths[:, None]},
          "actions": r.uniform(-1, 1, (b, H, A)).astype(np.float32),
          "action_mask": np.ones((b, H), bool), "frame_id": np.arange(b, dtype=np.int32)}


def _init(policy, batch):
  # Jitted: an eager init of the skipping backbone dispatches every scanned op one by one.
  return jax.jit(policy.init)(jax.random.PRNGKey(0), batch)


@pytest.fixture(scope="module")
def frozen_regime():
  policy = registry.policy_class("mole_vla")(_config())
  batch = _batch()
  params, state = _init(policy, batch)
  return policy, params, state, batch


@pytest.fixture(scope="module")
def computed(frozen_regime):
  """One compile each of the loss with its gradient and of the (skipping) backbone, shared by tests."""
  policy, params, state, batch = frozen_regime
  loss_grad = jax.jit(jax.value_and_grad(
      lambda p: policy.loss(p, state, batch, jax.random.PRNGKey(1)), has_aux=True))
  (loss, (metrics, new_state)), grads = loss_grad(params)
  feats = jax.jit(policy.backbone)(params["vlm"], batch["observation"])
  return dict(loss=loss, metrics=metrics, new_state=new_state, grads=grads, feats=feats)


def test_contract_and_what_trains(frozen_regime, computed):
  policy, params, state, batch = frozen_regime
  assert policy.vlm_config.router.num_skip == 2 and policy.vlm_config.llm.depth == 6
  # MoLe alone: every head block reads the last slot (the state after the last kept layer).
  assert policy.layer_for_block == (5, 5)
  loss, metrics, new_state, grads = (computed[k] for k in ("loss", "metrics", "new_state", "grads"))
  assert np.isfinite(float(loss)) and new_state == {}
  keep = np.asarray(metrics["layer_keep"])
  # Each sample keeps exactly k = 4 of 6 layers: the batch-mean keep frequencies sum to 4.
  np.testing.assert_allclose(keep.sum(), 4.0, rtol=0, atol=1e-6)
  assert 0 < float(metrics["router_entropy"]) <= np.log(6) + 1e-6
  flat = tree_util.flatten(grads)
  mask = tree_util.flatten(policy.frozen_mask(params))
  for path, g in flat.items():
    if not mask[path]:
      assert not np.any(np.asarray(g)), path
  router = {k: g for k, g in flat.items() if k.startswith("vlm/router/")}
  assert router and all(mask[k] for k in router)
  # The router learns through the gates (straight-through), the balance loss and CogKD.
  assert sum(float(np.abs(np.asarray(g)).sum()) for g in router.values()) > 0
  actions = jax.jit(policy.sample_actions)(params, state, batch["observation"], jax.random.PRNGKey(2))
  assert actions.shape == (4, H, A) and np.isfinite(np.asarray(actions)).all()


def test_loss_terms_match_their_definitions(frozen_regime, computed):
  policy, params, _, batch = frozen_regime
  c = policy.config
  obs = batch["observation"]
  feats = computed["feats"]
  teacher = jax.jit(policy._full_depth)(params["vlm"], obs)  # pylint: disable=protected-access
  route = feats["route"]
  probs = np.asarray(route["probs"], np.float64)
  hard = np.asarray(route["gates"], np.float64)
  assert set(np.unique(hard)) <= {0.0, 1.0}
  loss, metrics = computed["loss"], computed["metrics"]
  np.testing.assert_allclose(float(metrics["balance"]), np.mean(hard * probs), rtol=1e-6)
  logits = np.asarray(route["logits"], np.float64)
  np.testing.assert_allclose(float(metrics["router_logit_std"]), logits.std(axis=-1).mean(), rtol=1e-5)
  entropy = -np.sum(probs * np.log(probs), axis=-1).mean()
  np.testing.assert_allclose(float(metrics["router_entropy"]), entropy, rtol=1e-5)
  kd = layer_skip.cogkd_loss(teacher["final"], feats["final"], feats["mask"], c.cogkd.mix)
  np.testing.assert_allclose(float(metrics["cogkd"]), float(kd), rtol=1e-5)
  # The teacher runs every layer: its states differ from the skipping student's.
  assert float(metrics["cogkd"]) > 0
  # loss = action + w_bal * balance + w_kd * cogkd, where the one-step objective's action loss is its L1.
  want = float(metrics["l1"]) + c.balance_weight * float(metrics["balance"]) + c.cogkd.weight * float(kd)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_ema_teacher_follows_the_llm():
  policy = mole_vla.MoLeVLA(_config(
      trainable=[("vlm/router/.*", True), ("vlm/llm/.*", True), ("vlm/.*", False), (".*", True)],
      cogkd=dict(teacher="ema", ema_decay=0.9)))
  batch = _batch(1)
  params, state = _init(policy, batch)
  teacher = tree_util.flatten(state["cogkd_teacher"])
  llm = tree_util.flatten(params["vlm"]["llm"])
  assert teacher.keys() == llm.keys()
  moved = jax.tree_util.tree_map(lambda x: x + 1.0, params["vlm"]["llm"])
  params = {**params, "vlm": {**params["vlm"], "llm": moved}}
  _, (metrics, new_state) = jax.jit(policy.loss)(params, state, batch, jax.random.PRNGKey(1))
  assert "cogkd" in metrics
  for k, v in tree_util.flatten(new_state["cogkd_teacher"]).items():
    want = 0.9 * np.asarray(teacher[k], np.float64) + 0.1 * (np.asarray(llm[k], np.float64) + 1.0)
    np.testing.assert_allclose(np.asarray(v), want, rtol=1e-6, atol=1e-6, err_msg=k)
  # prepare (after pretrained weights are loaded) restarts the teacher from the backbone's weights.
  _, restarted = policy.prepare(params, new_state)
  for k, v in tree_util.flatten(restarted["cogkd_teacher"]).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(tree_util.flatten(moved)[k]), err_msg=k)


def test_mole_times_m2_reads_the_layer_slots():
  policy = mole_vla.MoLeVLA(_config(head_reads="layers", mol=True, msm=True, memory=dict(size=64, k=2),
                                    head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64,
                                              num_blocks=2)))
  # Blocks read layers spread over the depth (M²'s mapping), not only the last slot.
  assert len(set(policy.layer_for_block)) == 2 and policy.head_config.mol
  batch = _batch(2)
  params, state = _init(policy, batch)
  loss, (metrics, new_state) = jax.jit(policy.loss)(params, state, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and int(metrics["msm_valid"]) == 4 and "cogkd" in metrics
  feats = jax.jit(policy.backbone)(params["vlm"], batch["observation"])
  ids = np.asarray(feats["route"]["ids"])
  query = np.asarray(feats["query"])
  # A skipped layer's slot carries the state of the slot before it.
  for b in range(ids.shape[0]):
    for layer in range(1, 6):
      if layer not in ids[b]:
        np.testing.assert_array_equal(query[layer, b], query[layer - 1, b])


def test_only_the_image_features_stage_is_cacheable(frozen_regime):
  policy, params, _, _ = frozen_regime
  assert policy.cache_stage(params) == "image_features"


@pytest.mark.parametrize("override,match", [
    (dict(router=dict(num_skip=6)), r"router.num_skip"),
    (dict(router=dict(num_skip=-1)), r"num_skip=-1"),
    (dict(head_reads="first"), r"head_reads='first'"),
    (dict(cogkd=dict(teacher="twin")), r"cogkd.teacher='twin'"),
    (dict(trainable=[("vlm/llm/.*", True), (".*", True)]), r"cogkd.teacher='frozen' needs a frozen LLM"),
])
def test_bad_config_names_the_field(override, match):
  with pytest.raises((ValueError, TypeError), match=match):
    mole_vla.MoLeVLA(_config(**override))


def test_router_statistics_over_frames(computed, tmp_path):
  from m2vla_jax.evaluation import offline  # pylint: disable=g-import-not-at-top
  route = computed["feats"]["route"]
  gates, probs = np.asarray(route["gates"]), np.asarray(route["probs"])
  stats = offline.RouterStatistics()
  stats.add(gates[:2], probs[:2])
  stats.add(gates[2:], probs[2:])
  summary = stats.summary()
  # Brute force over the 4 frames: the mean of the 0/1 keep decisions and of the entropies.
  np.testing.assert_allclose(summary["keep_frequency"], gates.astype(np.float64).mean(0), atol=1e-12)
  entropy = np.mean([-(p * np.log(p)).sum() for p in probs.astype(np.float64)])
  np.testing.assert_allclose(summary["mean_entropy_nats"], entropy, rtol=1e-9)
  assert summary["layers_kept_per_frame"] == pytest.approx(4.0) and summary["num_frames"] == 4
  routes = [tuple(np.flatnonzero(g).tolist()) for g in gates]
  assert summary["distinct_routes"] == len(set(routes))
  assert sorted((tuple(r["kept_layers"]), r["frames"]) for r in summary["top_routes"]) == sorted(
      (r, routes.count(r)) for r in set(routes))
  # One route repeated: the count a router that stopped learning shows.
  same = offline.RouterStatistics()
  same.add(np.repeat(gates[:1], 5, axis=0), np.repeat(probs[:1], 5, axis=0))
  assert same.summary()["distinct_routes"] == 1 and same.summary()["top_routes"][0]["frames"] == 5
  assert (tmp_path / "router_keep.png").name in offline.plot_router(summary, str(tmp_path))

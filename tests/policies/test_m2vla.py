"""M²-VLA policy: contract shapes, frozen-backbone gradients, optimizer state, validation, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from m2vla_jax.core import tree_util
from m2vla_jax.policies import m2vla
from m2vla_jax.core import freezing

H, A, S = 4, 2, 3
CORNERS = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)


def _config(**kw):
  cfg = dict(vlm="tiny", num_cameras=1, state_dim=S, horizon=H, action_dim=A, frozen_dtype="float32",
             head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_blocks=2),
             memory=dict(size=256, k=4))
  cfg.update(kw)
  return cfg


def square_batch(index, batch=16):
  """A colored square in one of four quadrants of a 32x32 image; the quadrant sets the action chunk
  (a ramp towards that corner). The square's color and the proprio state are distractors."""
  r = np.random.default_rng(index)
  quadrant = r.integers(0, 4, batch)
  images = np.full((batch, 1, 32, 32, 3), 40, np.uint8)
  for b in range(batch):
    y, x = divmod(quadrant[b], 2)
    images[b, 0, 16 * y:16 * y + 16, 16 * x:16 * x + 16] = r.integers(150, 256, 3)
  ramp = (np.arange(1, H + 1) / H)[None, :, None]
  return {
      "observation": {"images": images, "image_mask": np.ones((batch, 1), bool),
                      "state": r.normal(size=(batch, S)).astype(np.float32),
                      "tokens": np.ones((batch, 4), np.int32), "token_mask": np.ones((batch, 4), bool)},
      "actions": (CORNERS[quadrant][:, None, :] * ramp).astype(np.float32),
      "action_mask": np.ones((batch, H), bool),
      "frame_id": np.arange(index * batch, (index + 1) * batch, dtype=np.int32),
  }


_VLM_PARAMS = []


def _init(policy, seed=0):
  """policy.init with one random tiny backbone shared by every test (compiling the backbone's random
  init is the slowest part of these tests on CPU)."""
  if not _VLM_PARAMS:
    obs = square_batch(0, 2)["observation"]
    init = jax.jit(lambda r: policy.vlm.init(r, obs["images"], obs["image_mask"], obs["tokens"],
                                             obs["token_mask"])["params"])
    _VLM_PARAMS.append(init(jax.random.PRNGKey(123)))
  return jax.jit(policy.init)(jax.random.PRNGKey(seed), square_batch(0, 2), _VLM_PARAMS[0])


@pytest.fixture(scope="module")
def setup():
  """One policy, jitted functions and a filled memory shared by the tests (compiles dominate on CPU)."""
  policy = m2vla.M2VLA(_config())
  params, state = _init(policy)
  loss_fn = jax.jit(policy.loss)
  # The output layer is zero-initialised (which zeroes every upstream gradient on the very first step):
  # move it so that gradients are informative.
  params["head"]["action_out"]["kernel"] = 0.1 * jax.random.normal(
      jax.random.PRNGKey(7), params["head"]["action_out"]["kernel"].shape)
  loss, (metrics, filled) = loss_fn(params, state, square_batch(1), jax.random.PRNGKey(0))
  return dict(policy=policy, params=params, empty=state, filled=filled, loss_fn=loss_fn,
              first=(loss, metrics))


def test_init_layout_and_frozen_dtype():
  policy = m2vla.M2VLA(_config(frozen_dtype="bfloat16"))
  params, state = jax.eval_shape(policy.init, jax.random.PRNGKey(0), square_batch(0, 2))
  assert set(params) == {"vlm", "head"} and set(params["vlm"]) == {"img", "llm", "queries"}
  for path, leaf in tree_util.flatten(params).items():
    want = jnp.float32 if path == "vlm/queries" or path.startswith("head/") else jnp.bfloat16
    assert leaf.dtype == want, path
  # One stacked block per head block; keys = 3 pooled layers of width 32.
  assert params["head"]["blocks"]["query"]["kernel"].shape[0] == 2
  assert policy.key_layers == (0, 1, 1)
  assert state["msm"]["keys"].shape == (256, 3 * 32) and state["msm"]["values"].shape == (256, H, A)
  no_msm = m2vla.M2VLA(_config(msm=False))
  params, state = jax.eval_shape(no_msm.init, jax.random.PRNGKey(0), square_batch(0, 2))
  assert state == {} and "MSM" not in params["head"]["blocks"] and "memory_embed" not in params["head"]


def test_gradients_only_reach_trainable_params_and_optimizer_state_is_trainable_only(setup):
  policy, params, state = setup["policy"], setup["params"], setup["filled"]
  batch = square_batch(2)
  trainable, frozen = freezing.split(params, policy.frozen_mask(params))
  assert "vlm/queries" in trainable and not any(k.startswith("vlm/") and k != "vlm/queries" for k in trainable)
  assert frozen and all(k.startswith("vlm/img/") or k.startswith("vlm/llm/") for k in frozen)
  # Full gradient over every parameter (the policy stops gradients at frozen ones itself).
  grads = jax.jit(jax.grad(lambda p: policy.loss(p, state, batch, jax.random.PRNGKey(1))[0]))(params)
  flat = tree_util.flatten(grads)
  for path in frozen:
    assert float(jnp.abs(flat[path]).max()) == 0.0, path
  for path in trainable:
    assert float(jnp.abs(flat[path]).max()) > 0.0, path   # queries, head, projections, gates, alpha_v

  # Trainer view: only the trainable half is differentiated and has optimizer state.
  opt_state = optax.adamw(1e-3).init(trainable)
  assert set(opt_state[0].mu) == set(trainable)
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0)
  n_train = sum(x.size for x in trainable.values())
  n_frozen = sum(x.size for x in frozen.values())
  assert n_opt == 2 * n_train and n_frozen > n_train  # Adam's two moments, none for the backbone


def test_full_fine_tuning_config_differentiates_the_backbone(setup):
  """The full fine-tuning baseline: with trainable=[('.*', True)] no parameter is stop-gradiented."""
  params, state = setup["params"], setup["filled"]
  policy = m2vla.M2VLA(_config(trainable=[(".*", True)]))
  grads = jax.jit(jax.grad(lambda p: policy.loss(p, state, square_batch(2), jax.random.PRNGKey(1))[0]))(params)
  flat = tree_util.flatten(grads)
  for path in ("vlm/img/embedding/kernel", "vlm/llm/layers/mlp/linear", "vlm/llm/layers/attn/qkv_einsum/w"):
    assert float(jnp.abs(flat[path]).max()) > 0.0, path


def test_metrics_memory_update_and_sampling(setup):
  policy, params, loss_fn = setup["policy"], setup["params"], setup["loss_fn"]
  _, metrics = setup["first"]
  state1 = setup["filled"]
  assert float(metrics["msm_hits"]) == 0.0 and int(metrics["msm_valid"]) == 16   # retrieval before write
  assert metrics["alpha_s"].shape == (2,) and metrics["alpha_s_heads"].shape == (2, 2)
  assert metrics["alpha_v"].shape == (2,)
  assert np.all((metrics["alpha_s"] > 0) & (metrics["alpha_s"] < 1))
  np.testing.assert_array_equal(np.asarray(state1["msm"]["ids"][:16]), np.arange(16, 32))
  # Self-exclusion inside the policy: re-running batch 1, each sample finds the 15 OTHER entries only.
  _, (metrics3, state2) = loss_fn(params, state1, square_batch(1), jax.random.PRNGKey(0))
  assert float(metrics3["msm_hits"]) == 1.0 and int(metrics3["msm_valid"]) == 32
  actions = jax.jit(policy.sample_actions)(params, state1, square_batch(3)["observation"],
                                           jax.random.PRNGKey(0))
  assert actions.shape == (16, H, A) and np.all(np.isfinite(actions))


def test_backbone_runs_once_per_call_with_flow_matching():
  policy = m2vla.M2VLA(_config(head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_blocks=2,
                                         objective="flow_matching", flow_steps=5)))
  params, state = _init(policy)
  state = {"msm": msm_insert_one(state["msm"])}
  calls = {"vlm": 0, "head": 0}
  vlm_apply, head_apply = policy.vlm.apply, policy.head.apply

  def count(name, fn):
    def wrapped(*a, **k):
      calls[name] += 1
      return fn(*a, **k)
    return wrapped

  policy.vlm.apply = count("vlm", vlm_apply)      # instance attributes shadow the module methods
  policy.head.apply = count("head", head_apply)
  out = jax.jit(policy.sample_actions)(params, state, square_batch(1, 2)["observation"], jax.random.PRNGKey(0))
  assert out.shape == (2, H, A) and np.all(np.isfinite(out))
  # One backbone pass for 5 Euler steps (the head is traced once, inside the scan over steps).
  assert calls == {"vlm": 1, "head": 1}


def msm_insert_one(memory):
  from m2vla_jax.models import msm
  return msm.insert(memory, jnp.ones((1, memory["keys"].shape[1])), jnp.ones((1, H, A)),
                    jnp.zeros((1,), jnp.int32))


def test_sharded_memory_gives_the_same_loss(setup):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = m2vla.M2VLA(_config(memory=dict(size=256, k=4, shard_axis="data")), mesh=mesh)
  params, state = setup["params"], setup["filled"]
  batch = square_batch(5)
  l1, (_, s1) = setup["loss_fn"](params, state, batch, jax.random.PRNGKey(3))
  l2, (_, s2) = jax.jit(sharded.loss)(params, state, batch, jax.random.PRNGKey(3))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for k in s1["msm"]:
    np.testing.assert_array_equal(np.asarray(s1["msm"][k]), np.asarray(s2["msm"][k]))


def test_bad_inputs_name_the_field(setup):
  policy, params, state = setup["policy"], setup["params"], setup["empty"]
  good = square_batch(1, 2)
  rng = jax.random.PRNGKey(0)
  bad = dict(good, actions=np.zeros((2, H, A + 1), np.float32))
  with pytest.raises(ValueError, match=r"actions.*action_dim"):
    policy.loss(params, state, bad, rng)
  bad = dict(good, observation=dict(good["observation"], state=np.zeros((2, S + 2), np.float32)))
  with pytest.raises(ValueError, match=r"state.*state_dim"):
    policy.loss(params, state, bad, rng)
  obs = {k: v for k, v in good["observation"].items() if k != "images"}
  with pytest.raises(ValueError, match="images"):
    policy.sample_actions(params, state, obs, rng)
  obs = dict(good["observation"], images=np.zeros((2, 2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="num_cameras"):
    policy.sample_actions(params, state, obs, rng)
  with pytest.raises(ValueError, match="empty at inference"):
    policy.sample_actions(params, state, good["observation"], rng)
  with pytest.raises(Exception, match="empty at inference"):   # under jit: raised by a device callback
    jax.block_until_ready(jax.jit(policy.sample_actions)(params, state, good["observation"], rng))
  with pytest.raises(ValueError, match="unknown M²-VLA config field"):
    m2vla.M2VLA(_config(horizen=3))
  with pytest.raises(ValueError, match="key_layers"):
    m2vla.M2VLA(_config(memory=dict(key_layers=(0, 5))))


def _train(config, steps, lr, seed=0):
  policy = m2vla.M2VLA(config)
  params, state = _init(policy, seed)
  trainable, frozen = freezing.split(params, policy.frozen_mask(params))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 10, steps, lr * 0.01))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, state, batch, rng):
    def loss_fn(tr):
      return policy.loss(freezing.merge(tr, frozen), state, batch, rng)
    (loss, (_, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, state, loss

  losses = []
  for i in range(steps):
    trainable, opt_state, state, loss = step(trainable, opt_state, state, square_batch(i + 1),
                                             jax.random.PRNGKey(i))
    losses.append(float(loss))
  return np.mean(losses[:5]), np.mean(losses[-10:])


@pytest.mark.slow
def test_full_model_learns_the_square_task():
  first, last = _train(_config(), steps=250, lr=5e-3)
  assert last < 0.1 * first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("mol,msm", [(False, True), (True, False), (False, False)])
def test_ablations_train(mol, msm):
  first, last = _train(_config(mol=mol, msm=msm), steps=60, lr=5e-3)
  assert last < 0.7 * first, (first, last)

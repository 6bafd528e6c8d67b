"""Mesh construction and path/shape sharding rules on 8 emulated CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from m2vla_jax.training import sharding


def test_mesh_sizes_and_errors():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
  assert mesh.axis_names == ("data", "fsdp", "model")
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh({"dta": -1})
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 6 devices, have 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "model": 1})


def test_fsdp_rule_shards_largest_divisible_axis():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
  # Brute force: the largest axis whose size divides by 4; ties keep the earlier axis.
  for shape in [(6, 8), (8, 6), (3, 5), (12, 16, 4), (4,)]:
    spec = sharding.fsdp_spec(shape, 4, mesh, min_bytes=0)
    divisible = [i for i in range(len(shape)) if shape[i] % 4 == 0]
    if not divisible:
      assert spec == P()
    else:
      best = max(divisible, key=lambda i: (shape[i], -i))
      assert spec == P(*[("fsdp" if i == best else None) for i in range(len(shape))]), (shape, spec)
  assert sharding.fsdp_spec((16, 16), 4, mesh, min_bytes=4 * 16 * 16 + 1) == P()


def test_rules_and_optimizer_state_follow_parameter_paths():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  params = {"vlm/llm/embedder": jnp.zeros((16, 8)), "head/out/kernel": jnp.zeros((8, 6)),
            "head/out/bias": jnp.zeros((6,))}
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  rules = [(".*embedder", ("model", "fsdp")), (".*bias", None)]
  kw = dict(mesh=mesh, rules=rules, min_bytes=0, param_paths=set(params))
  ps = sharding.param_shardings(jax.eval_shape(lambda: params), **kw)
  assert ps["vlm/llm/embedder"].spec == P("model", "fsdp")
  assert ps["head/out/bias"].spec == P()
  assert ps["head/out/kernel"].spec == P("fsdp", None)  # default rule: 8 is the largest divisible axis
  os_ = sharding.param_shardings(opt_state, **kw)
  mu = os_[0].mu
  assert {k: v.spec for k, v in mu.items()} == {k: v.spec for k, v in ps.items()}
  with pytest.raises(ValueError, match="not divisible"):
    sharding.param_shardings(jax.eval_shape(lambda: {"x": jnp.zeros((3, 8))}), mesh=mesh,
                             rules=[("x", ("fsdp", None))], min_bytes=0, param_paths={"x"})


def test_state_entry_axis_and_global_batch():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  memory = {"keys": jnp.zeros((64, 5)), "values": jnp.zeros((64, 4, 7)), "ptr": jnp.zeros((), jnp.int32),
            "odd": jnp.zeros((6,))}
  sh = sharding.state_shardings(jax.eval_shape(lambda: memory), mesh)
  assert sh["keys"].spec == P(("data", "fsdp")) and sh["values"].spec == P(("data", "fsdp"))
  assert sh["ptr"].spec == P() and sh["odd"].spec == P()
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  g = sharding.host_to_global(batch, mesh)
  assert g["x"].shape == (16, 3) and g["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(g["x"]), batch["x"])
  assert len(g["x"].addressable_shards) == 8 and g["x"].addressable_shards[0].data.shape == (2, 3)

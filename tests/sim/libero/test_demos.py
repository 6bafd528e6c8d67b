"""LIBERO scripted demonstrations (sim/libero/demos.py), the small CPU run's config and workflow checks.

What runs without LIBERO: the no-op rule, the written layout read back through the registry's
`libero_*_no_noops` entry (OpenVLA's layout), the demo cache's spec, configs/libero_cpu.py, and the
held-out init states of its evaluation. With LIBERO installed (marked slow): one real demonstration.
"""
import dataclasses
import importlib.util

import numpy as np
import pytest

from m2vla_jax.data.rlds import load_dataset
from m2vla_jax.data.transforms import decode_image
from m2vla_jax.sim.libero import demos
from m2vla_jax.sim.libero import env as libero_env
from m2vla_jax.sim.libero import evaluate as libero_eval
from m2vla_jax.sim.libero import workflow
from m2vla_jax.training import config_base

needs_libero = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                  reason="LIBERO is not installed (pip install -e .[libero])")


def test_noop_mask_follows_openvla_regeneration():
  a = np.zeros((6, 7))
  a[:, 6] = -1.0
  a[1, 0] = 0.5            # moves: kept
  a[3, 6] = 1.0            # gripper closes with no motion: kept (the command changed)
  a[4, 6] = 1.0            # still closing, no motion: a no-op
  a[5, :3], a[5, 6] = 5e-5, 1.0   # |delta| = 8.7e-5 < 1e-4, gripper unchanged: a no-op
  # Step 0 has no motion (the first step looks at the deltas alone); step 2 repeats step 1's gripper.
  assert demos.noop_mask(a).tolist() == [True, False, True, False, True, True]
  assert not demos.noop_mask(np.ones((3, 7))).any()


def _expert_result(t=7, size=16, success=True, seed=0):
  """What `experts.run_expert_episode(..., record_every_step=True)` returns, with random contents."""
  rng = np.random.default_rng(seed)
  actions = rng.uniform(-1, 1, (t, 7)).astype(np.float32)
  actions[:, 6] = np.where(np.arange(t) < t // 2, -1.0, 1.0)
  actions[0, :6] = 0.0    # the first step of a real episode often waits: a no-op, dropped
  return {"instruction": "pick up the black bowl and place it on the plate", "init_index": 3,
          "success": success, "success_step": t - 2 if success else -1, "num_steps": t,
          "actions": actions, "states": rng.normal(size=(t, 8)).astype(np.float32),
          "images": rng.integers(0, 256, (t, 2, size, size, 3), dtype=np.uint8)}


def test_written_demos_read_back_in_the_registry_libero_layout(tmp_path):
  result = _expert_result()
  assert demos.episode_from_expert(_expert_result(success=False), "libero_spatial", 4) is None
  episode = demos.episode_from_expert(result, "libero_spatial", 4)
  assert episode["episode_metadata"] == {"file_path": "libero_spatial/4/init_3", "task_index": 4,
                                         "init_state": 3, "success_step": 5}
  name = "libero_spatial_test_demos"
  path = demos.write_demos([episode], str(tmp_path), name, image_encoding="png")
  assert path.endswith(f"{name}/1.0.0")
  demos.register(name, "libero_spatial")
  ds = load_dataset(str(tmp_path), demos.dataset_spec(name, "libero_spatial"), "train", progress=False)
  (ep,) = ds.episodes
  kept = slice(1, None)   # step 0 was a no-op
  for slot, camera in (("primary", 0), ("wrist", 1)):   # png: lossless
    np.testing.assert_array_equal(np.stack([decode_image(x) for x in ep["images"][slot]]),
                                  result["images"][kept, camera])
  np.testing.assert_array_equal(ep["state"], result["states"][kept])
  np.testing.assert_array_equal(ep["action"][:, :6], result["actions"][kept, :6])
  # The registry's gripper convention: LIBERO's +1 (close) -> 0, -1 (open) -> 1.
  np.testing.assert_array_equal(ep["action"][:, 6], (result["actions"][kept, 6] < 0).astype(np.float32))
  assert ep["instruction"] == [result["instruction"]] * 6


def test_demo_cache_spec_tracks_what_changes_the_demos():
  base = demos.DemoConfig(env=libero_env.EnvConfig(image_size=112), tasks=(0, 1), demos_per_task=30)
  spec = demos.generation_spec(base)
  name = demos.cache_name(spec)
  assert name.startswith("libero_spatial_scripted_112px_n30_t2_")
  # How the environments are hosted does not change the demos; what they record does.
  hosted = dataclasses.replace(base, workers=1, env=dataclasses.replace(
      base.env, worker_python="/venv/bin/python", isolate_process=False))
  assert demos.cache_name(demos.generation_spec(hosted)) == name
  for changed in (dataclasses.replace(base, noise_std=0.2), dataclasses.replace(base, tasks=(0, 2)),
                  dataclasses.replace(base, env=dataclasses.replace(base.env, render_size=224)),
                  dataclasses.replace(base, env=dataclasses.replace(base.env, reflections=False))):
    assert demos.cache_name(demos.generation_spec(changed)) != name
  with pytest.raises(ValueError, match="DemoConfig.demos_per_task=0"):
    demos.DemoConfig(demos_per_task=0)
  with pytest.raises(ValueError, match="DemoConfig.noise_std"):
    demos.DemoConfig(noise_std=-1.0)


def test_libero_cpu_config_evaluates_on_init_states_no_demo_started_from():
  c = config_base.load_config_file("configs/libero_cpu.py").get_config("demos=20,eval_episodes=5,tasks=0-2")
  assert c.libero.tasks == (0, 1, 2) and c.data.pipeline.datasets == c.libero.dataset_name
  assert c.model.num_cameras == 2 and (c.model.state_dim, c.model.action_dim) == (8, 7)
  assert workflow.demo_config(c.libero).demos_per_task == 20
  from m2vla_jax import train  # pylint: disable=g-import-not-at-top
  assert train._workflow(c) is workflow.run  # pylint: disable=protected-access
  eval_config = workflow.eval_config(c.libero)
  episodes = libero_eval.episodes_of(eval_config)
  assert [e.reset_arg for e in episodes] == list(range(20, 25)) * 3
  assert {e.task for e in episodes} == {f"libero_spatial/{t}" for t in (0, 1, 2)}
  # The dataset name is derived from the demo settings; an edited one is caught before any work.
  with c.unlocked():
    c.libero.noise_std = 0.3
  with pytest.raises(ValueError, match="config.libero.dataset_name"):
    workflow.prepare_data(c)
  # The comparison rows of configs/sim_pretrained.py on this data, and each passes validation.
  from m2vla_jax.training import validation  # pylint: disable=g-import-not-at-top
  m2 = config_base.load_config_file("configs/libero_cpu.py").get_config("")
  for method in ("full", "lora", "gse", "mole"):
    row = config_base.load_config_file("configs/libero_cpu.py").get_config(f"method={method}")
    validation.validate_config(row, check_paths=False)
    # Same demonstrations, budget and evaluation as the M² row.
    assert row.data.pipeline.datasets == row.libero.dataset_name == m2.libero.dataset_name
    assert (row.total_steps, row.batch_size, row.libero.eval) == (m2.total_steps, m2.batch_size,
                                                                 m2.libero.eval)
  lora = config_base.load_config_file("configs/libero_cpu.py").get_config("method=lora,rank=8")
  assert lora.model.adapter.kind == "lora" and lora.model.adapter.rank == 8
  mole = config_base.load_config_file("configs/libero_cpu.py").get_config("method=mole,skip=6")
  assert mole.policy == "mole_vla" and mole.model.router.num_skip == 6
  assert [tuple(g) for g in mole.optimizer.groups] == [("router", "vlm/router/.*", 2e-5)]
  assert (mole.model.num_cameras, mole.model.state_dim, mole.model.action_dim) == (2, 8, 7)
  with pytest.raises(config_base.ConfigError, match="method="):
    config_base.load_config_file("configs/libero_cpu.py").get_config("method=dora")
  with pytest.raises(config_base.ConfigError, match="suite='goal'"):
    config_base.load_config_file("configs/libero_cpu.py").get_config("suite=goal")
  with pytest.raises(ValueError, match="EvalConfig.first_init_state=-1"):
    libero_eval.EvalConfig(first_init_state=-1)


@pytest.mark.slow
@needs_libero
def test_one_real_demonstration_is_recorded_in_the_layout():
  config = demos.DemoConfig(env=libero_env.EnvConfig(image_size=32, render_size=32), tasks=(0,),
                            demos_per_task=1, noise_std=0.1, workers=1)
  episodes, (stats,) = demos.generate(config)
  assert stats.attempts == 1 and stats.succeeded == 1, stats
  (ep,) = episodes
  t = len(ep["action"])
  assert 20 < t <= libero_env.SUITE_MAX_STEPS["libero_spatial"]
  assert ep["observation"]["image"].shape == (t, 32, 32, 3)
  assert ep["observation"]["wrist_image"].shape == (t, 32, 32, 3)
  assert ep["observation"]["state"].shape == (t, 8)
  assert set(np.unique(ep["action"][:, 6])) <= {-1.0, 1.0} and np.abs(ep["action"]).max() <= 1.0
  assert "black bowl" in ep["language_instruction"]
  assert ep["is_last"][-1] and ep["reward"][-1] == 1.0 and ep["reward"][:-1].sum() == 0

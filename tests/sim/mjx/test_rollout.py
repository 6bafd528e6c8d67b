"""Compiled MJX rollouts: experts solve the tasks, a random policy does not, reports, demos, errors.

One compiled rollout (policy switched by a parameter, so expert and random share the program)
serves the behaviour tests. References: success rates recomputed with numpy from the raw per-env
arrays, the writer's output read back through TFDS, Wilson intervals against a float64 formula.
"""
import os

# Before the first `import mujoco` of the process: it picks its OpenGL backend at import, and
# the render tests (and Meta-World's) need EGL.
os.environ.setdefault("MUJOCO_GL", "egl")

import math  # noqa: E402

import tensorflow_datasets as tfds  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.sim.mjx import experts  # noqa: E402
from m2vla_jax.sim.mjx import rollout as rl  # noqa: E402
from m2vla_jax.sim.mjx import scene as scene_lib  # noqa: E402
from m2vla_jax.sim.mjx import tasks  # noqa: E402
import support  # noqa: E402

N_ENVS = 12       # 4 episodes per task
HORIZON = 80
ENV = rl.EnvParams(execute_steps=1, image_size=32, record=True)


def switch_policy(params, obs, rng):
  """Expert when params['random'] is False, uniform random actions otherwise (one compile)."""
  return jnp.where(params["random"], experts.random_policy(None, obs, rng),
                   experts.expert_policy(None, obs, rng))


@pytest.fixture(scope="module")
def results():
  expert = rl.rollout(switch_policy, {"random": jnp.array(False)}, ENV, jax.random.key(0),
                      N_ENVS, HORIZON)
  rand = rl.rollout(switch_policy, {"random": jnp.array(True)}, ENV, jax.random.key(0),
                    N_ENVS, HORIZON)
  return expert, rand


@pytest.mark.slow
def test_experts_succeed_and_random_fails(results):
  expert, rand = results
  assert expert["tasks"] == [tasks.TASKS[i % 3] for i in range(N_ENVS)]
  assert not expert["nonfinite"].any() and not rand["nonfinite"].any()
  assert expert["success"].mean() >= 0.8, (expert["success"], expert["tasks"])
  for t in tasks.TASKS:
    per_task = [s for s, tt in zip(expert["success"], expert["tasks"]) if tt == t]
    assert np.mean(per_task) >= 0.5, (t, per_task)
  assert rand["success"].mean() <= 0.2, rand["success"]
  assert expert["returns"].mean() > rand["returns"].mean()
  # success_step is the first success; the expert needs some steps to get there
  ok = expert["success"]
  assert (expert["success_step"][ok] > 10).all() and (expert["success_step"][~ok] == -1).all()


@pytest.mark.slow
def test_summary_matches_numpy_and_wilson(results):
  expert, _ = results
  s = rl.summarize(expert)
  z = 1.959963984540054
  for t in tasks.TASKS:
    succ = np.array([x for x, tt in zip(expert["success"], expert["tasks"]) if tt == t])
    e = s["per_task"][t]
    assert e["episodes"] == len(succ) and e["successes"] == succ.sum()
    p, n = succ.mean(), len(succ)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    np.testing.assert_allclose(e["ci95"], [max(0, center - half), min(1, center + half)],
                               atol=1e-12)
  per_task_means = [np.mean([x for x, tt in zip(expert["success"], expert["tasks"]) if tt == t])
                    for t in tasks.TASKS]
  np.testing.assert_allclose(s["mean_success"], np.mean(per_task_means), atol=1e-12)
  assert sum(v["episodes"] for v in s["per_instruction"].values()) == N_ENVS


@pytest.mark.slow
def test_grounding_measure_sees_the_expert_go_to_the_named_block(results):
  expert, rand = results
  s = rl.summarize(expert)
  # The expert always heads for the named block, but pushing it the hand can pass a neighbour
  # within a millimetre of its closest approach to the named one (1.5 mm measured in one push
  # episode): the argmin then flips with the machine's last float bits. So: the measure counts the
  # named block in nearly every episode, and wherever it does not, the named block was a near tie
  # (within a quarter block, 1 cm), not a wrong target. A policy ignoring the colour word scores ~1/3.
  closest = [e["closest_block"] for e in s["episode_records"]]
  assert s["named_block_closest"] >= 10 / N_ENVS, closest
  assert all(e["named_block_closest"] >= 0.5 for e in s["per_task"].values()), closest
  p = tasks.Privileged.unpack(np.asarray(expert["privileged"]))
  min_dist = np.linalg.norm(p.hand[..., None, :2] - p.blocks[..., :2], axis=-1).min(0)  # [N, 3]
  named = min_dist[np.arange(N_ENVS), p.block_id[0]]
  assert (named - min_dist.min(-1) <= scene_lib.BLOCK_HALF / 2).all(), (named, min_dist)
  # Brute force on random trajectories: the block (moving or not) with the smallest xy distance
  # to the hand over all recorded calls.
  p = np.random.default_rng(0).uniform(-0.2, 0.2, (5, 7, 18))
  ref = [min(range(3), key=lambda b: min(math.dist(p[r, i, :2], p[r, i, 4 + 3 * b:6 + 3 * b])
                                        for r in range(5))) for i in range(7)]
  np.testing.assert_array_equal(rl.closest_block(p), ref)
  assert 0.0 <= rl.summarize(rand)["named_block_closest"] <= 1.0


@pytest.mark.slow
def test_recorded_frames_show_the_scene(results):
  expert, _ = results
  frames = expert["frames"]
  assert frames.shape == (HORIZON, N_ENVS, 1, 32, 32, 3) and frames.dtype == np.uint8
  assert expert["actions"].shape == (HORIZON, N_ENVS, 4)
  assert np.abs(expert["actions"]).max() <= 1.0
  # the scene changes over the episode (the hand moves) and differs between envs (random layout)
  assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1
  assert np.abs(frames[0, 0].astype(int) - frames[0, 1].astype(int)).mean() > 1


@pytest.mark.slow
def test_demos_through_the_rlds_writer(results, tmp_path):
  from m2vla_jax.data import writer
  expert, _ = results
  episodes = experts.demo_episodes(expert)
  assert len(episodes) == int(expert["success"].sum())
  path = writer.write_rlds_dataset(episodes, str(tmp_path), "mjx_demos", image_encoding="png",
                                   progress=False)
  ds = tfds.builder_from_directory(path).as_dataset(split="train")
  for ep, ref in zip(tfds.as_numpy(ds), episodes):
    steps = list(ep["steps"])   # as_numpy already made the nested steps an iterable of numpy
    assert len(steps) == len(ref["action"])
    np.testing.assert_array_equal(np.stack([s["observation"]["image"] for s in steps]),
                                  ref["observation"]["image"])        # png: lossless
    np.testing.assert_allclose(np.stack([s["action"] for s in steps]), ref["action"])
    assert steps[0]["language_instruction"].decode() == ref["language_instruction"]


def test_demo_episodes_keep_post_success_steps_within_the_rollout():
  t_max, n = 10, 3
  result = {"frames": np.arange(t_max * n).reshape(t_max, n, 1, 1, 1, 1).astype(np.uint8),
            "states": np.zeros((t_max, n, 4)), "actions": np.zeros((t_max, n, 4)),
            "instructions": ["a", "b", "c"], "tasks": ["pick_lift"] * n,
            "success": np.array([True, True, False]), "success_step": np.array([2, 8, -1])}
  cut = [len(e["action"]) for e in experts.demo_episodes(result)]
  assert cut == [3, 9]                     # through the first success; the failure is dropped
  long = experts.demo_episodes(result, post_success_steps=4)
  assert [len(e["action"]) for e in long] == [7, 10]    # 3 + 4; 9 + 4 capped at the horizon
  np.testing.assert_array_equal(long[0]["observation"]["image"][:, 0, 0, 0], np.arange(7) * n)
  assert len(experts.demo_episodes(result, only_successful=False, post_success_steps=4)) == 3
  # only the listed tasks keep them
  mixed = dict(result, tasks=["pick_lift", "place_on_target", "pick_lift"])
  only_place = experts.demo_episodes(mixed, post_success_steps=4, post_success_tasks=("place_on_target",))
  assert [len(e["action"]) for e in only_place] == [3, 10]
  with pytest.raises(ValueError, match="post_success_tasks names 'push_to_target', which is not among"):
    experts.collect_demos("/nonexistent", "x", tasks=("pick_lift",), post_success_steps=1,
                          post_success_tasks=("push_to_target",))
  with pytest.raises(ValueError, match="post_success_steps=-1 must be >= 0"):
    experts.collect_demos("/nonexistent", "x", post_success_steps=-1)
  with pytest.raises(ValueError, match=r"image_keys=\('image', 'wrist_image'\) name 2 cameras; "
                                       r"the rollout rendered 1"):
    experts.demo_episodes(result, image_keys=("image", "wrist_image"))
  # two cameras: one observation key each, in the rollout's camera order
  two = dict(result, frames=np.concatenate([result["frames"], 255 - result["frames"]], axis=2))
  ep = experts.demo_episodes(two, image_keys=("image", "wrist_image"))[0]
  np.testing.assert_array_equal(ep["observation"]["wrist_image"], 255 - ep["observation"]["image"])


def test_camera_slots():
  assert experts.camera_slots(("table",)) == (("primary", "image"),)
  assert experts.camera_slots(("table", "wrist")) == (("primary", "image"), ("wrist", "wrist_image"))
  assert experts.camera_slots(("front", "table")) == (("primary", "image"),
                                                     ("secondary", "table_image"))
  with pytest.raises(ValueError, match="at most one each"):
    experts.camera_slots(("table", "front", "wrist", "table"))
  with pytest.raises(ValueError, match="cameras is empty"):
    experts.camera_slots(())


def test_invalid_inputs_fail_before_compilation():
  with pytest.raises(ValueError, match="task='stack' is unknown"):
    rl.EnvParams(tasks=("pick_lift", "stack"))
  with pytest.raises(ValueError, match="in the vocabulary of none"):
    rl.EnvParams(tasks=("pick_lift",), instructions=("push the red block to the white square",))
  with pytest.raises(ValueError, match="not in the vocabulary of task 'pick_lift'"):
    tasks.parse("pick_lift", "pick up the purple block")
  with pytest.raises(ValueError, match="horizon=0"):
    rl.rollout(experts.expert_policy, None, ENV, jax.random.key(0), 4, 0)
  with pytest.raises(ValueError, match="n_envs=0"):
    rl.rollout(experts.expert_policy, None, ENV, jax.random.key(0), 0, 10)
  with pytest.raises(ValueError, match="execute_steps=0"):
    rl.EnvParams(execute_steps=0)
  with pytest.raises(ValueError, match=r"EnvParams.cameras=\('side',\): camera 'side' is unknown"):
    rl.EnvParams(cameras=("side",))


def test_mixture_assignment_and_tokens():
  env = rl.EnvParams(tasks=("pick_lift", "place_on_target"),
                     instructions=("lift the blue block", "pick up the red block",
                                   "put the green block on the white square"))
  eps = env.episodes(6)
  assert [e.task for e in eps] == ["pick_lift", "place_on_target"] * 3
  assert [e.text for e in eps[::2]] == ["pick up the red block", "lift the blue block",
                                        "pick up the red block"]
  assert [e.block for e in eps[::2]] == [0, 2, 0]
  tokens, mask = env.tokenize([e.text for e in eps])
  assert mask.sum(1).tolist() == [1 + len(e.text.split()) for e in eps]     # BOS + one per word
  assert (tokens[~mask] == 0).all() and (tokens[mask] > 0).all() and (tokens[:, 0] == 1).all()
  # same words -> same ids ('the'); the colour word, which decides the block, differs
  # ("pick up the red block" vs "lift the blue block")
  assert tokens[0, 3] == tokens[2, 2] and tokens[0, 4] != tokens[2, 3]


@pytest.mark.slow
def test_recorded_privileged_state_relabels_to_the_executed_expert_actions(results):
  # collect_demos labels each recorded state with the expert's action in it; without noise that
  # must be exactly the action the rollout executed (execute_steps=1: one state per step).
  expert, _ = results
  assert expert["privileged"].shape == (HORIZON, N_ENVS, tasks.PRIVILEGED_DIM)
  labels = np.asarray(jax.vmap(jax.vmap(experts.expert_action))(expert["privileged"]))
  # Two programs (the rollout's scan body and this vmap) fuse the expert's arithmetic differently;
  # its proportional gains amplify last-bit differences of the state to ~3e-6 in a few elements
  # (measured on AVX-512 and AVX2 code). Labels taken one step off differ by more than 1e-4 in 31%
  # of the elements (up to 2.0), so 1e-4 still pins the relabelling.
  np.testing.assert_allclose(labels, expert["actions"], atol=1e-4)


def test_default_tokenizer_is_the_training_tokenizer_of_configs_mjx():
  # Expert rollouts and the trained policy must see the same ids for the same instruction.
  from m2vla_jax.training import config_base  # pylint: disable=g-import-not-at-top
  from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  config = config_base.load_config_file(
      os.path.join(str(support.CONFIGS), "mjx.py")).get_config("tokenizer=words")
  training = tokenizers.make_tokenizer(config.data.tokenizer)
  for task in tasks.TASKS:
    for ins in tasks.vocabulary(task):
      assert rl.word_tokenizer(ins.text) == training.encode(ins.text)
  with pytest.raises(ValueError, match=r"words \['purple'\] are not in the tokenizer's word list"):
    rl.word_tokenizer("pick up the purple block")


def test_privileged_unpack_reads_back_the_state_it_was_built_from():
  scene = scene_lib.load()
  keys = jax.random.split(jax.random.key(3), 4)
  states = jax.vmap(lambda k, t, b: tasks.reset(scene, k, t, b))(
      keys, jnp.array([0, 1, 2, 1]), jnp.array([2, 0, 1, 2]))
  priv = np.asarray(jax.vmap(lambda s: tasks.privileged(scene, s))(states))
  p = tasks.Privileged.unpack(priv)                   # numpy, leading batch axis kept
  qpos = np.asarray(states.data.qpos)
  np.testing.assert_array_equal(p.hand, qpos[:, scene_lib.HAND_QPOS])
  np.testing.assert_allclose(
      p.blocks, np.asarray(jax.vmap(lambda q: tasks.block_positions(scene, q))(states.data.qpos)))
  np.testing.assert_array_equal(p.goal, np.asarray(states.data.mocap_pos)[:, 0])
  np.testing.assert_array_equal(p.task_id, [0, 1, 2, 1])
  np.testing.assert_array_equal(p.block_id, [2, 0, 1, 2])
  assert p.blocks.shape == (4, scene_lib.NUM_BLOCKS, 3)
  with pytest.raises(ValueError, match="privileged state has 17 columns, expected 18"):
    tasks.Privileged.unpack(priv[:, :17])


def test_noisy_expert_perturbs_only_the_hand_motion():
  scene = scene_lib.load()
  states = jax.vmap(lambda k: tasks.reset(scene, k, 0, 1))(jax.random.split(jax.random.key(0), 256))
  priv = np.array(jax.vmap(lambda s: tasks.privileged(scene, s))(states))
  # hand just above the named block (index 1): the xy actions are then unsaturated
  rs = np.random.default_rng(0)
  priv[:, :3] = priv[:, 7:10] + np.array([0, 0, 0.02]) + rs.uniform(-0.005, 0.005, (256, 3))
  obs = {"privileged": jnp.asarray(priv)}
  clean = np.asarray(experts.expert_policy(None, obs, None))
  np.testing.assert_array_equal(
      np.asarray(experts.noisy_expert_policy(0.0, obs, jax.random.key(1))), clean)
  noisy = np.asarray(experts.noisy_expert_policy(0.3, obs, jax.random.key(1)))
  np.testing.assert_array_equal(noisy[..., 3], clean[..., 3])          # gripper untouched
  assert np.abs(noisy).max() <= 1.0
  inside = np.abs(clean[..., :3]) < 0.4                                # away from the clip
  diff = (noisy[..., :3] - clean[..., :3])[inside]
  assert diff.size > 100 and abs(diff.std() - 0.3) < 0.05 and abs(diff.mean()) < 0.05


def test_dagger_round_with_beta_one_records_the_expert_rollout(results):
  """With beta = 1 the mixed policy is the expert: the round's labels and observations are the
  independent expert rollout's executed actions and states (first 20 steps: before any contact,
  where two separately compiled programs cannot drift apart)."""
  from m2vla_jax.sim.mjx import dagger
  expert, _ = results
  learner = lambda params, obs, rng: jnp.broadcast_to(params, (obs["state"].shape[0], 3, 4))
  episodes, summary = dagger.collect(learner, jnp.zeros(4), ENV, jax.random.key(0), N_ENVS,
                                     HORIZON, beta=1.0)
  assert len(episodes) == N_ENVS and summary["episodes"] == N_ENVS   # failures would be kept too
  executed, states = np.asarray(expert["actions"]), np.asarray(expert["states"])
  for i, ep in enumerate(episodes):
    np.testing.assert_allclose(ep["action"][:20], executed[:20, i], atol=1e-4)
    np.testing.assert_allclose(ep["observation"]["state"][:20], states[:20, i], atol=1e-5)
    assert ep["observation"]["image"].shape[1:] == (32, 32, 3)
    # cut at the expert's first success, like the demonstrations
    assert len(ep["action"]) == int(expert["success_step"][i]) + 1
  # ... or kept going after it for the tasks the demonstrations keep post-success steps of
  # (same compiled program: only the cut differs)
  kept, _ = dagger.collect(learner, jnp.zeros(4), ENV, jax.random.key(0), N_ENVS, HORIZON,
                           beta=1.0, post_success_steps=3, post_success_tasks=("place_on_target",))
  for i, ep in enumerate(kept):
    post = 3 if ep["episode_metadata"]["task"] == "place_on_target" else 0
    assert len(ep["action"]) == min(int(expert["success_step"][i]) + 1 + post, HORIZON)

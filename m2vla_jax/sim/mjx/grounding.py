"""Grounding pretraining of a simulation backbone on rendered MJX scenes: where is the named block?

M²-VLA keeps a *pretrained* VLM frozen and trusts it to know where "the red block" is (PaliGemma
learned that from detection and referring-expression pretraining). The tiny backbones of the
simulation configs cannot be downloaded pretrained and start random, and behaviour cloning alone
never bound the colour word to a block, not even on its training episodes (docs/results/mjx_runs.md, runs 1-13).
This stage is their stand-in for that pretraining:

  * data: an endless stream of fresh random scenes, rendered inside the compiled step by the
    rollouts' own ray caster (same cameras, resolution and pixels as the policy sees), each with a
    random instruction of the task vocabulary, tokenized by the training tokenizer. Hand position
    and finger opening are random, and in some scenes the named block sits in the hand or on the
    goal square, the states demonstrations pass through;
  * target (`TARGETS`, metres x 10): the named block's xyz, the goal's xy, the hand's xyz and
    every colour's block xy, regressed (L1) from the VLM's query tokens (final states, through a
    small MLP that is dropped afterwards);
  * output: a big_vision `.npz` of the VLM parameters ('params/img/...', 'params/llm/...',
    'params/queries') that the trainer loads with `config.init.checkpoint` (target prefix
    'vlm/'), and a JSON of the held-out errors in cm.

No demonstration, action or episode is seen here: the scenes are new every step, so nothing can
be memorised, and the policy's demos stay the only behaviour data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2vla_jax.core import freezing
from m2vla_jax.data import loader
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.mjx import render as render_lib
from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks as tasks_lib
from m2vla_jax.training import train_state

log = logging.getLogger(__name__)

# Columns of the target vector, in order (each is a position in metres x TARGET_SCALE). The
# instruction's task is deliberately not a target: with its one-hot added, cloned policies
# pushed in 0-5 of 50 episodes instead of 26-27 (docs/results/mjx_runs.md, runs 22-24).
TARGETS = ("named_x", "named_y", "named_z", "goal_x", "goal_y", "hand_x", "hand_y", "hand_z") + tuple(
    f"{c}_{a}" for c in scene_lib.COLORS for a in "xy")
TARGET_SCALE = 10.0
# Scene mix: the named block in the hand, or on the goal square (else where the layout put it).
P_IN_HAND, P_ON_GOAL = 0.25, 0.15
_HAND_LO = np.array([-0.2, -0.15, 0.01], np.float32)
_HAND_HI = np.array([0.2, 0.15, 0.15], np.float32)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the pretraining run depends on (all of it goes into the cache name)."""
  vlm: str
  vlm_overrides: tuple[tuple[str, Any], ...]
  tokenizer: str
  max_tokens: int
  tasks: tuple[str, ...]
  cameras: tuple[str, ...]
  image_size: int
  steps: int
  batch_size: int
  lr: float
  seed: int

  def __post_init__(self):
    for t in self.tasks:
      tasks_lib.check_task(t)
    scene_lib.check_cameras(self.cameras, "grounding cameras (config.mjx.cameras)")
    for field in ("steps", "batch_size", "image_size", "max_tokens"):
      if getattr(self, field) < 1:
        raise ValueError(f"config.mjx.pretrain / grounding: {field}={getattr(self, field)} must be >= 1")
    if not self.lr > 0:
      raise ValueError(f"config.mjx.pretrain.lr={self.lr} must be > 0")

  @property
  def vlm_config(self) -> vlm_lib.VLMConfig:
    return vlm_lib.get_config(self.vlm, **dict(self.vlm_overrides))

  def spec(self) -> dict[str, Any]:
    """Everything the pretrained backbone depends on, as JSON: the settings and the targets."""
    return demo_cache.canonical({**dataclasses.asdict(self), "targets": list(TARGETS)})

  def cache_name(self) -> str:
    """The cache scheme every simulator cache uses (`demo_cache.cache_name`): a readable prefix and
    the digest of `spec()`, so a file name changes with every setting."""
    cams = "-".join(self.cameras)
    return demo_cache.cache_name(
        f"ground_{self.vlm}_{cams}_{self.image_size}px_s{self.steps}_b{self.batch_size}", self.spec())


def settings_from_config(config) -> Settings:
  """`Settings` from a configs/mjx.py-style config (model, data and mjx.pretrain sections)."""
  p = config.mjx.pretrain
  return Settings(vlm=str(config.model.vlm),
                  vlm_overrides=tuple(sorted(dict(config.model.vlm_overrides).items())),
                  tokenizer=str(config.data.tokenizer), max_tokens=int(loader.pipeline_config(config).max_tokens),
                  tasks=tuple(config.mjx.tasks), cameras=tuple(config.mjx.cameras),
                  image_size=int(config.mjx.image_size), steps=int(p.steps),
                  batch_size=int(p.batch_size), lr=float(p.lr), seed=int(p.seed))


def instruction_table(tasks: Sequence[str], tokenizer: str, max_tokens: int
                      ) -> dict[str, np.ndarray]:
  """Every instruction of `tasks`: tokens int32 [I, T], token_mask bool [I, T], block int32 [I]."""
  from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  tokenize = tokenizers.Tokenize(tokenizers.make_tokenizer(tokenizer), max_tokens)
  vocab = [ins for t in tasks for ins in tasks_lib.vocabulary(t)]
  tokens, masks = zip(*(tokenize(ins.text) for ins in vocab))
  return {"tokens": np.stack(tokens).astype(np.int32), "token_mask": np.stack(masks).astype(bool),
          "block": np.array([ins.block for ins in vocab], np.int32),
          "text": np.array([ins.text for ins in vocab])}


def random_scene(scene: scene_lib.Scene, rng: jax.Array, block: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """(qpos [nq], goal [3]) of a random scene in which `block` (int32 []) is the named block."""
  k_layout, k_hand, k_finger, k_mix = jax.random.split(rng, 4)
  qpos, goal = tasks_lib.initial_qpos(k_layout, scene)
  hand = jax.random.uniform(k_hand, (3,), minval=_HAND_LO, maxval=_HAND_HI)
  qpos = qpos.at[scene_lib.HAND_QPOS].set(hand)
  qpos = qpos.at[scene_lib.FINGER_QPOS].set(
      jax.random.uniform(k_finger, (), minval=0.0, maxval=scene_lib.FINGER_OPEN))
  u = jax.random.uniform(k_mix)
  xyz = scene.block_qpos[:, :3]
  own = jnp.asarray(xyz)[block]
  in_hand = hand + jnp.array([0.0, 0.0, 0.015])     # where the expert's grasp holds a block
  on_goal = jnp.concatenate([goal[:2], jnp.array([scene_lib.BLOCK_HALF])])
  pos = jnp.where(u < P_IN_HAND, in_hand, jnp.where(u < P_IN_HAND + P_ON_GOAL, on_goal, qpos[own]))
  return qpos.at[own].set(pos), goal


def targets(scene: scene_lib.Scene, qpos: jax.Array, goal: jax.Array, block: jax.Array
            ) -> jax.Array:
  """float [len(TARGETS)] in metres x TARGET_SCALE."""
  blocks = tasks_lib.block_positions(scene, qpos)
  return TARGET_SCALE * jnp.concatenate([blocks[block], goal[:2], qpos[scene_lib.HAND_QPOS],
                                         blocks[:, :2].reshape(-1)])


def sample_batch(scene: scene_lib.Scene, table: dict[str, jax.Array], rng: jax.Array, n: int,
                 cameras: tuple[str, ...], image_size: int) -> dict[str, jax.Array]:
  """n random scenes: images uint8 [n, C, S, S, 3] (C = len(cameras)), tokens, token_mask,
  targets, instruction id."""
  from mujoco import mjx  # pylint: disable=g-import-not-at-top
  data0 = mjx.make_data(scene.mjx_model)
  k_ins, k_scene = jax.random.split(rng)
  ins = jax.random.randint(k_ins, (n,), 0, table["block"].shape[0])
  block = jnp.asarray(table["block"])[ins]

  def one(key, b):
    qpos, goal = random_scene(scene, key, b)
    # Identity mocap quaternion: mjx.make_data leaves it zero and the pad would be invisible
    # (tasks.reset says why).
    data = data0.replace(qpos=qpos, mocap_pos=goal[None], mocap_quat=jnp.array([[1.0, 0, 0, 0]]))
    img = render_lib.render(scene, data, cameras, image_size, image_size)["rgb"]
    return img, targets(scene, qpos, goal, b)

  images, target = jax.vmap(one)(jax.random.split(k_scene, n), block)
  return {"images": images, "image_mask": jnp.ones((n, len(cameras)), bool),
          "tokens": jnp.asarray(table["tokens"])[ins],
          "token_mask": jnp.asarray(table["token_mask"])[ins], "targets": target, "instruction": ins}


class GroundingProbe(nn.Module):
  """The VLM ('vlm', the policy's backbone tree) + an MLP from its query tokens to TARGETS."""
  config: vlm_lib.VLMConfig
  hidden: int = 128

  @nn.compact
  def __call__(self, images, image_mask, tokens, token_mask):
    if not self.config.num_queries:
      raise ValueError("grounding pretraining reads the query tokens; the VLM has num_queries=0")
    feats = vlm_lib.VLM(self.config, name="vlm")(images, image_mask, tokens, token_mask)
    q = feats["final"][:, -self.config.num_queries:].astype(jnp.float32)
    h = nn.gelu(nn.Dense(self.hidden, name="probe_hidden")(q.reshape(q.shape[0], -1)))
    return nn.Dense(len(TARGETS), name="probe_out")(h)


def errors_cm(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
  """Mean xy error (cm) of the named block, the goal, the hand and the colour-indexed blocks."""
  err = jnp.abs(pred - target) * (100.0 / TARGET_SCALE)
  idx = {name: i for i, name in enumerate(TARGETS)}
  pick = lambda names: jnp.mean(err[:, [idx[n] for n in names]])
  return {"named_block_xy": pick(["named_x", "named_y"]), "named_block_z": pick(["named_z"]),
          "goal_xy": pick(["goal_x", "goal_y"]), "hand_xyz": pick(["hand_x", "hand_y", "hand_z"]),
          "colour_blocks_xy": pick([f"{c}_{a}" for c in scene_lib.COLORS for a in "xy"])}


@dataclasses.dataclass(frozen=True)
class _ProbeObjective:
  """The policy contract `train_state.make_train_step` trains (`loss(params, state, batch, rng)
  -> (loss, (metrics, state))`): L1 from the probe's output to the targets; no state, no noise."""
  apply: Any

  def loss(self, params, state, batch, rng):
    del rng
    return jnp.mean(jnp.abs(self.apply(params, batch) - batch["targets"])), ({}, state)


def pretrain(settings: Settings, out_path: str, *, log_every: int = 500, eval_size: int = 512
             ) -> dict[str, Any]:
  """Trains the backbone on grounding, writes `out_path` (.npz) and `out_path`.json; the metrics."""
  from m2vla_jax.weights import npz  # pylint: disable=g-import-not-at-top
  scene = scene_lib.load()
  table = {k: jnp.asarray(v) for k, v in
           instruction_table(settings.tasks, settings.tokenizer, settings.max_tokens).items()
           if k != "text"}
  cfg = settings.vlm_config
  if cfg.img is None:
    raise ValueError(f"grounding pretraining needs an image tower; vlm={settings.vlm!r} is text-only")
  if cfg.img.image_size != settings.image_size:
    raise ValueError(f"vlm={settings.vlm!r} takes {cfg.img.image_size}px images but config.mjx."
                     f"image_size={settings.image_size}")
  model = GroundingProbe(cfg)
  apply = lambda p, b: model.apply({"params": p}, b["images"], b["image_mask"], b["tokens"],
                                   b["token_mask"])
  probe = _ProbeObjective(apply)
  k_init, k_eval, k_train = jax.random.split(jax.random.key(settings.seed), 3)
  # One compiled scene sampler (rendering dominates compile time) serves init, training and the
  # held-out set.
  sample = jax.jit(lambda rng: sample_batch(scene, table, rng, settings.batch_size,
                                             settings.cameras, settings.image_size))
  example = sample(k_init)
  params = model.init(k_init, example["images"], example["image_mask"], example["tokens"],
                      example["token_mask"])["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.lr, min(200, settings.steps // 10 + 1),
                                                settings.steps)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  # The trainer's state and step (training.train_state): every parameter trains, so `frozen` is
  # empty; the state is built from `params` here rather than by `make_init_fn`, whose own split of
  # the key would draw other initial weights than before (and than cached backbones were from).
  trainable, frozen = freezing.split(params, freezing.trainable_mask(params, [(".*", True)]))
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                                 frozen=frozen, opt_state=tx.init(trainable), ema=None,
                                 rng=k_train, policy_state={})
  step = jax.jit(train_state.make_train_step(probe, tx, schedule))

  # Held out: scenes from their own key, never drawn for training.
  parts = [sample(k) for k in jax.random.split(k_eval, -(-eval_size // settings.batch_size))]
  eval_batch = jax.tree.map(lambda *x: jnp.concatenate(x)[:eval_size], *parts)
  evaluate = jax.jit(lambda p: errors_cm(apply(p, eval_batch), eval_batch["targets"]))
  history, t0 = [], time.time()
  for i in range(settings.steps):
    state, metrics = step(state, sample(jax.random.fold_in(k_train, i)))
    if (i + 1) % log_every == 0 or i + 1 == settings.steps:
      params = state.params()
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"grounding pretraining: loss {loss} at step {i + 1}; lower "
                                 f"config.mjx.pretrain.lr={settings.lr}")
      errs = {k: float(v) for k, v in evaluate(params).items()}
      history.append({"step": i + 1, "loss": loss, **errs, "wall_s": time.time() - t0})
      print(f"grounding step {i + 1}: loss {loss:.3f}, held-out error (cm) named block xy "
            f"{errs['named_block_xy']:.2f}, goal {errs['goal_xy']:.2f}, hand {errs['hand_xyz']:.2f}",
            flush=True)
  npz.save_npz(out_path, state.params()["vlm"])
  report = {"spec": settings.spec(), "held_out_scenes": eval_size, "history": history, "final": history[-1]}
  with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=1)
  return report


def ensure_pretrained(settings: Settings, out_path: str) -> dict[str, Any] | None:
  """Runs `pretrain` unless `out_path` holds the backbone of exactly these settings (then None: the
  cached one is used). The report beside it (`out_path`.json, written last) holds the spec; a file
  without it (an interrupted write) or with another spec is trained again, with a warning."""
  if os.path.exists(out_path):
    report_path = out_path + ".json"
    saved = None
    if os.path.exists(report_path):
      with open(report_path) as f:
        saved = json.load(f).get("spec")
    if saved == settings.spec():
      print(f"using cached grounding-pretrained backbone {out_path}", flush=True)
      return None
    log.warning("grounding cache %s %s; training it again", out_path,
                "has no spec beside it" if saved is None else "was trained for another spec")
  return pretrain(settings, out_path)

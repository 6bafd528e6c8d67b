"""Closed-loop rollouts compiled end to end: reset, render, policy, physics, scoring in one XLA program.

Owns: `EnvParams` (which tasks and instructions, cameras, chunk execution), `rollout` (one
jitted function: `lax.scan` over policy calls and, inside, over the `execute_steps` control
steps of each action chunk; `vmap` over environments; no Python in the loop), scoring in the
simulators' shared report format (`summarize`, `report`, through `m2vla_jax.evaluation.summary`).

The policy contract (`policy_fn` is traced once per (policy_fn, EnvParams, n_envs, horizon)):
```
policy_fn(policy_params, obs, rng) -> float [N, H, 4]   H >= execute_steps, actions in [-1, 1]
obs = {
  'images':      uint8   [N, C, S, S, 3]   rendered cameras (only with EnvParams.render)
  'image_mask':  bool    [N, C]
  'state':       float32 [N, 4]    hand xyz, finger opening (raw units)
  'tokens':      int32   [N, T]    instruction tokens (EnvParams.tokenizer), right-padded
  'token_mask':  bool    [N, T]
  'privileged':  float32 [N, 18]   tasks.privileged (tasks.Privileged): scripted/oracle policies only
}
```
Episodes do not stop at success (the batch stays rectangular); success is the first step whose
state fulfils the instruction, as in Meta-World, and the return sums the dense reward up to it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from mujoco import mjx
import numpy as np

from m2vla_jax.evaluation import summary as summary_lib
from m2vla_jax.sim.mjx import render as render_lib
from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks as tasks_lib
from m2vla_jax.text import tokenizers

log = logging.getLogger(__name__)

PolicyFn = Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]


def task_words_spec() -> str:
  """The 'words:...' tokenizer spec of every word of every task's instructions: configs/mjx.py
  trains with it, and it is the rollouts' default tokenizer (`word_tokenizer`)."""
  return tokenizers.words_spec(ins.text for t in tasks_lib.TASKS for ins in tasks_lib.vocabulary(t))


@functools.lru_cache(maxsize=None)
def _task_vocabulary() -> tokenizers.WordVocabulary:
  return tokenizers.make_tokenizer(task_words_spec())


def word_tokenizer(text: str) -> list[int]:
  """Default tokenizer: BOS + one id per word of the tasks' vocabulary (pass a backbone tokenizer
  instead); a word outside it is an error."""
  return _task_vocabulary().encode(text)


@dataclasses.dataclass(frozen=True)
class EnvParams:
  """What to evaluate and how (hashable: it is part of the compiled function's cache key).

  Attributes:
    tasks: task names (tasks.TASKS); environments are dealt round-robin over them, so every task
      gets n_envs // len(tasks) episodes (plus one for the first n_envs % len(tasks) tasks).
    instructions: instruction texts, each in the vocabulary of one of `tasks`; None = the whole
      vocabulary of each task. A task's episodes cycle through its instructions.
    execute_steps: actions of each predicted chunk executed before the policy is called again.
    image_size: square camera resolution S.
    cameras: rendered cameras, in the order of obs['images'].
    num_cameras: pad obs['images'] to this many cameras (image_mask False); None = len(cameras).
    render: render obs['images'] (False for privileged-state policies: no ray casting at all).
    record: also return, per policy call, the observation images, proprio and tokens, and per
      control step the executed actions (for videos and demonstrations).
    max_tokens: T, instruction tokens are right-padded / truncated to this.
    tokenizer: str -> list[int]; None = `word_tokenizer`.
    layout_repeats: consecutive environments that start from the same layout (blocks, goal,
      hand). With all tasks and every instruction colour (e.g. 9 for 3 tasks x 3 colours with
      the default vocabulary order) one scene appears with every instruction: demonstrations
      then cannot be fitted from the image alone, the instruction has to be read.
  """
  tasks: tuple[str, ...] = tasks_lib.TASKS
  instructions: tuple[str, ...] | None = None
  execute_steps: int = 4
  image_size: int = 64
  cameras: tuple[str, ...] = ("front",)
  num_cameras: int | None = None
  render: bool = True
  record: bool = False
  max_tokens: int = 16
  tokenizer: Callable[[str], Sequence[int]] | None = None
  layout_repeats: int = 1

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "cameras", tuple(self.cameras))
    if not self.tasks:
      raise ValueError("EnvParams.tasks is empty; use some of " + str(tasks_lib.TASKS))
    for t in self.tasks:
      tasks_lib.check_task(t)
    if self.instructions is not None:
      object.__setattr__(self, "instructions", tuple(self.instructions))
      for text in self.instructions:
        if not any(text == i.text for t in self.tasks for i in tasks_lib.vocabulary(t)):
          vocab = {t: [i.text for i in tasks_lib.vocabulary(t)] for t in self.tasks}
          raise ValueError(f"EnvParams.instructions: {text!r} is in the vocabulary of none of the "
                           f"tasks {self.tasks}; vocabularies: {vocab}")
      missing = [t for t in self.tasks if not self.task_instructions(t)]
      if missing:
        raise ValueError(f"EnvParams.instructions has none for tasks {missing}; add some or drop "
                         f"those tasks")
    for field in ("execute_steps", "image_size", "max_tokens", "layout_repeats"):
      if getattr(self, field) < 1:
        raise ValueError(f"EnvParams.{field}={getattr(self, field)} must be >= 1")
    scene_lib.check_cameras(self.cameras, "EnvParams.cameras")
    if self.num_cameras is not None and self.num_cameras < len(self.cameras):
      raise ValueError(f"EnvParams.num_cameras={self.num_cameras} < len(cameras)="
                       f"{len(self.cameras)}")

  def task_instructions(self, task: str) -> list[tasks_lib.Instruction]:
    vocab = tasks_lib.vocabulary(task)
    if self.instructions is None:
      return list(vocab)
    return [i for i in vocab if i.text in self.instructions]

  def episodes(self, n_envs: int) -> list[tasks_lib.Instruction]:
    """The instruction of each environment (round-robin over tasks, then instructions)."""
    counts = {t: 0 for t in self.tasks}
    out = []
    for i in range(n_envs):
      task = self.tasks[i % len(self.tasks)]
      pool = self.task_instructions(task)
      out.append(pool[counts[task] % len(pool)])
      counts[task] += 1
    return out

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = self.tokenizer or word_tokenizer
    tokens = np.zeros((len(texts), self.max_tokens), np.int32)
    mask = np.zeros((len(texts), self.max_tokens), bool)
    for i, text in enumerate(texts):
      ids = list(tok(text))
      if len(ids) > self.max_tokens:    # a cut instruction could lose the colour word
        raise ValueError(f"instruction {text!r} has {len(ids)} tokens, more than "
                         f"EnvParams.max_tokens={self.max_tokens}; raise max_tokens")
      tokens[i, :len(ids)] = ids
      mask[i, :len(ids)] = True
    return tokens, mask


def env_step(scene: scene_lib.Scene, state: tasks_lib.EnvState, action: jax.Array
             ) -> tasks_lib.EnvState:
  """One control step (scene_lib.SUBSTEPS physics steps) of one environment; action float [4]."""
  mm = scene.mjx_model
  data = state.data.replace(ctrl=scene_lib.ctrl_from_action(state.data.qpos[scene_lib.HAND_QPOS],
                                                            action))
  data = jax.lax.fori_loop(0, scene_lib.SUBSTEPS, lambda _, d: mjx.step(mm, d), data)
  return tasks_lib.update_flags(scene, dataclasses.replace(state, data=data))


def observe(scene: scene_lib.Scene, env: EnvParams, states: tasks_lib.EnvState,
            tokens: jax.Array, token_mask: jax.Array) -> dict[str, jax.Array]:
  """The policy's observation of a batch of environments (see the module docstring)."""
  n = tokens.shape[0]
  obs = {"state": jax.vmap(tasks_lib.proprio)(states).astype(jnp.float32),
         "tokens": tokens, "token_mask": token_mask,
         "privileged": jax.vmap(functools.partial(tasks_lib.privileged, scene))(states)
                       .astype(jnp.float32)}
  if env.render:
    images = jax.vmap(lambda d: render_lib.render(scene, d, env.cameras, env.image_size,
                                                  env.image_size)["rgb"])(states.data)
    c = env.num_cameras or len(env.cameras)
    pad = c - len(env.cameras)
    if pad:
      images = jnp.concatenate([images, jnp.zeros((n, pad) + images.shape[2:], jnp.uint8)], 1)
    obs["images"] = images
    obs["image_mask"] = jnp.broadcast_to(jnp.arange(c) < len(env.cameras), (n, c))
  return obs


def reset_keys(env: EnvParams, k_reset: jax.Array, n_envs: int) -> jax.Array:
  """Per-environment reset keys [N]: `layout_repeats` consecutive environments share one."""
  r = env.layout_repeats
  keys = jax.random.split(k_reset, -(-n_envs // r))
  return keys[np.arange(n_envs) // r] if r > 1 else keys


@functools.lru_cache(maxsize=32)
def _compiled(policy_fn: PolicyFn, env: EnvParams, n_envs: int, horizon: int):
  scene = scene_lib.load()
  e = env.execute_steps
  n_calls = math.ceil(horizon / e)

  def run(params, rng, task_id, block, tokens, token_mask):
    k_reset, k_policy = jax.random.split(rng)
    states = jax.vmap(functools.partial(tasks_lib.reset, scene))(
        reset_keys(env, k_reset, n_envs), task_id, block)
    zeros = jnp.zeros(n_envs)
    carry0 = (states, zeros.astype(bool), jnp.full(n_envs, -1, jnp.int32), zeros,
              zeros.astype(bool))

    def policy_call(carry, r):
      states = carry[0]
      obs = observe(scene, env, states, tokens, token_mask)
      chunk = policy_fn(params, obs, jax.random.fold_in(k_policy, r))
      if chunk.ndim != 3 or chunk.shape[0] != n_envs or chunk.shape[1] < e or chunk.shape[2] != 4:
        raise ValueError(f"policy_fn returned shape {chunk.shape}; expected [N={n_envs}, H>="
                         f"execute_steps={e}, 4]")
      chunk = chunk.astype(jnp.float32)

      def control_step(carry, k):
        states, succ, succ_step, ret, bad = carry
        t = r * e + k
        valid = t < horizon
        action = chunk[:, k]
        states = jax.vmap(functools.partial(env_step, scene))(states, action)
        finite = jnp.isfinite(states.data.qpos).all(-1) & jnp.isfinite(action).all(-1)
        bad = bad | (~finite & valid & ~succ)
        ok = jax.vmap(functools.partial(tasks_lib.success, scene))(states) & finite & ~bad
        rew = jax.vmap(functools.partial(tasks_lib.reward, scene))(states)
        ret = ret + jnp.where(valid & ~succ & finite, rew, 0.0)
        succ_step = jnp.where(ok & ~succ & valid, t, succ_step)
        succ = succ | (ok & valid)
        return (states, succ, succ_step, ret, bad), action

      carry, actions = jax.lax.scan(control_step, carry, jnp.arange(e))
      rec = None
      if env.record:
        rec = {"state": obs["state"], "privileged": obs["privileged"], "actions": actions}
        if env.render:
          rec["images"] = obs["images"]
      return carry, rec

    carry, rec = jax.lax.scan(policy_call, carry0, jnp.arange(n_calls))
    states, succ, succ_step, ret, bad = carry
    out = {"success": succ, "success_step": succ_step, "returns": ret, "nonfinite": bad,
           "final_qpos": states.data.qpos}
    if env.record:
      # per control step actions [T, N, 4]; per policy call state [R, N, 4], privileged
      # [R, N, PRIVILEGED_DIM], images [R, N, C, ...]
      out["actions"] = rec["actions"].reshape((n_calls * e,) + rec["actions"].shape[2:])[:horizon]
      out["states"] = rec["state"]
      out["privileged"] = rec["privileged"]
      if env.render:
        out["frames"] = rec["images"]
    return out

  return jax.jit(run)


def check_args(policy_fn: PolicyFn, env_params: EnvParams, n_envs: int, horizon: int) -> None:
  """The argument checks of `rollout` (shared with `c_rollout`), before anything compiles."""
  if not isinstance(env_params, EnvParams):
    raise TypeError(f"env_params must be an EnvParams, got {type(env_params).__name__}")
  for name, v in (("n_envs", n_envs), ("horizon", horizon)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}={v!r} must be a positive int")
  if not callable(policy_fn):
    raise TypeError(f"policy_fn must be callable (params, obs, rng) -> [N, H, 4]; got "
                    f"{policy_fn!r}")


def rollout(policy_fn: PolicyFn, policy_params: Any, env_params: EnvParams, rng: jax.Array,
            n_envs: int, horizon: int) -> dict[str, Any]:
  """Runs `n_envs` episodes of `horizon` control steps with `policy_fn` in the loop, compiled.

  Returns numpy arrays: success bool [N], success_step int32 [N] (-1 if never), returns float [N],
  nonfinite bool [N] (physics or actions went non-finite), final_qpos [N, nq]; with
  `record`: actions [T, N, 4], states [R, N, 4], privileged [R, N, PRIVILEGED_DIM], frames uint8
  [R, N, C, S, S, 3] (R policy calls);
  plus host lists tasks, instructions (per env) and the env params, horizon.
  """
  check_args(policy_fn, env_params, n_envs, horizon)
  episodes = env_params.episodes(int(n_envs))
  tokens, token_mask = env_params.tokenize([e.text for e in episodes])
  fn = _compiled(policy_fn, env_params, int(n_envs), int(horizon))
  # Evaluation moves its few small inputs and results on purpose, also under a trainer's
  # jax_transfer_guard="disallow".
  with jax.transfer_guard("allow"):
    out = fn(policy_params, rng, np.array([e.task_id for e in episodes], np.int32),
             np.array([e.block for e in episodes], np.int32), tokens, token_mask)
    out = jax.tree.map(np.asarray, out)
  out.update(tasks=[e.task for e in episodes], instructions=[e.text for e in episodes],
             env_params=env_params, horizon=int(horizon))
  return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
  """Per-task and overall success with 95% Wilson intervals (`summary.summarize`, the format every
  simulator reports), plus mean return per task and per-instruction success."""
  episodes = []
  for i, (task, ins) in enumerate(zip(result["tasks"], result["instructions"])):
    ok = bool(result["success"][i])
    reason = "success" if ok else ("nonfinite_state" if result["nonfinite"][i] else "timeout")
    episodes.append(dict(task=task, index=i, instruction=ins, success=ok, reason=reason,
                         steps=int(result["success_step"][i]) + 1 if ok else result["horizon"],
                         ret=float(result["returns"][i])))
  summary = summary_lib.summarize(episodes)
  for task, entry in summary["per_task"].items():
    entry["mean_return"] = float(np.mean([e["ret"] for e in episodes if e["task"] == task]))
  per_ins: dict[str, list[int]] = {}
  for e in episodes:
    per_ins.setdefault(e["instruction"], []).append(int(e["success"]))
  summary["per_instruction"] = {k: {"successes": sum(v), "episodes": len(v)}
                                for k, v in per_ins.items()}
  if "privileged" in result:   # recorded rollouts: did the hand go to the block it was told to?
    closest = closest_block(result["privileged"])
    named = tasks_lib.Privileged.unpack(np.asarray(result["privileged"])[0]).block_id
    went = closest == named
    for i, e in enumerate(episodes):
      e["closest_block"] = int(closest[i])
    tasks = np.asarray(result["tasks"])
    summary["named_block_closest"] = float(went.mean())
    for task, entry in summary["per_task"].items():
      entry["named_block_closest"] = float(went[tasks == task].mean())
  summary["episode_records"] = episodes
  return summary


def closest_block(privileged: np.ndarray) -> np.ndarray:
  """int [N]: the block the hand came closest to (xy) over an episode; privileged [R, N, PRIVILEGED_DIM].

  A grounding measure that does not need success: with 3 blocks, a policy that ignores the colour
  word picks the named block about 1/3 of the time.
  """
  p = tasks_lib.Privileged.unpack(np.asarray(privileged))
  hand = p.hand[..., None, :2]                                    # [R, N, 1, 2]
  return np.linalg.norm(hand - p.blocks[..., :2], axis=-1).min(0).argmin(-1)


def report(result: dict[str, Any], out_dir: str | None = None, name: str = "mjx_eval"
           ) -> dict[str, Any]:
  """`summarize` a rollout result (compiled or `c_rollout`'s) and, with `out_dir`, write
  `<name>.json` / `<name>.png`."""
  env_params, horizon = result["env_params"], result["horizon"]
  summary = summarize(result)
  summary.update(name=name, tasks=list(env_params.tasks), horizon=int(horizon),
                 config={k: v for k, v in dataclasses.asdict(env_params).items()
                         if k != "tokenizer"})
  if out_dir:
    summary_lib.write_evaluation(summary, out_dir, name)
  log.info("%s", summary_lib.headline(name, summary))
  return summary

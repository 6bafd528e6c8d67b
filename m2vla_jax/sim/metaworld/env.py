"""Meta-World tasks as image + proprio environments for closed-loop evaluation and demonstrations.

Owns: task-name suites (MT10 / MT50 and the held-out task splits), construction of one Meta-World
task with a seeded initial state (Meta-World's own `_random_reset_space` sampling, drawn from the
environment's seeded generator instead of the global numpy one), fast offscreen rendering of a
primary and a wrist camera, proprio extraction, and turning simulator crashes into a clean
"episode failed" signal.

Observation returned by `MetaWorldEnv.reset` / `step` (one environment, no batch axis):
```
{
  'images':     uint8   [C, H, W, 3]   cameras in order (primary, wrist)
  'image_mask': bool    [C]
  'state':      float32 [4]            hand xyz (m, world frame) + gripper opening in [0, 1]
  'privileged': float64 [39]           Meta-World's full state vector (object poses, goal): scripted
                                       experts only; a learned policy must not read it
}
```
Actions are Meta-World's: float [4] in [-1, 1] (xyz mocap delta, gripper effort).

Rendering: Meta-World's default visual settings (4096 px shadow maps, 4x multisampling,
reflections) hold offscreen rendering to a few frames/s; we zero the shadow map and the
multisample count in the model's visual options and switch off shadows and reflections in the
scene's render flags, which makes it ~5-10x faster at the image sizes a VLA uses.
Process isolation: TensorFlow (the data pipeline) and Mesa's software EGL both carry LLVM, and a
process that loads both crashes (a segfault at `import tensorflow` after an EGL context exists,
or at the first render after TensorFlow was imported). `ProcessEnv` therefore runs a
`MetaWorldEnv` in a fresh Python process (`python -m m2vla_jax.sim.metaworld.env`, which imports
only MuJoCo and Meta-World) and talks to it over pipes; demonstrations and evaluation use it by
default, and it also steps a batch of environments in parallel on several cores.

The `corner` and `corner2` cameras are defined with their up axis pointing down (a 180-degree
roll in `xyz_base.xml`), so their images are rotated by 180 degrees (both axes flipped), which
restores the physical view; flipping only the rows would mirror the scene.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any

import mujoco
import numpy as np

from metaworld import env_dict as _mw_env_dict

from m2vla_jax.sim.metaworld import visual_shift
from m2vla_jax.sim.common import worker

SUITES: dict[str, tuple[str, ...]] = {
    "mt10": tuple(_mw_env_dict.MT10_V3),
    "mt50": tuple(_mw_env_dict.MT50_V3),
}
# Tasks kept out of training for the "held-out tasks" evaluation variant. For MT50 they are
# Meta-World's own ML45 test tasks; for MT10 they are ML10's test tasks that lie outside MT10.
HELD_OUT_TASKS: dict[str, tuple[str, ...]] = {
    "mt10": tuple(t for t in _mw_env_dict.ML10_V3["test"] if t not in _mw_env_dict.MT10_V3),
    "mt50": tuple(_mw_env_dict.ML45_V3["test"]),
}
# Cameras whose definition is rolled by 180 degrees (see module docstring).
FLIPPED_CAMERAS = frozenset({"corner", "corner2"})
WRIST_CAMERAS = ("gripperPOV", "behindGripper")
KNOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview") + WRIST_CAMERAS
STATE_DIM = 4
ACTION_DIM = 4
# MuJoCo warnings that mean the integrator went unstable; MuJoCo then silently resets the data,
# so an episode that hits one has no meaningful outcome.
_INSTABILITY_WARNINGS = (mujoco.mjtWarning.mjWARN_BADQACC, mujoco.mjtWarning.mjWARN_BADQPOS,
                         mujoco.mjtWarning.mjWARN_BADQVEL)


def suite_tasks(suite: str) -> tuple[str, ...]:
  """Task names of a suite ('mt10' or 'mt50'), in Meta-World's order."""
  if suite not in SUITES:
    raise ValueError(f"suite={suite!r} is unknown; use one of {sorted(SUITES)}")
  return SUITES[suite]


def train_tasks(suite: str) -> tuple[str, ...]:
  """The suite's tasks minus those held out of training (`HELD_OUT_TASKS`)."""
  held_out = set(HELD_OUT_TASKS[suite]) if suite in HELD_OUT_TASKS else set()
  return tuple(t for t in suite_tasks(suite) if t not in held_out)


# Episode seeds: training (demonstrations) and evaluation draw initial states from disjoint seed
# ranges, so evaluation always starts from layouts no demonstration was recorded from.
_SEED_STRIDE = 100_000
_SPLIT_OFFSETS = {"train": 0, "eval": 1 << 50}


def episode_seed(task: str, index: int, split: str = "train") -> int:
  """Seed of the `index`-th episode of `task` in `split` ('train' or 'eval'); disjoint across both.

  Seeds depend on the task name so that tasks do not share object layouts index by index.
  """
  if split not in _SPLIT_OFFSETS:
    raise ValueError(f"split={split!r} is unknown; use 'train' or 'eval'")
  if not 0 <= index < _SEED_STRIDE:
    raise ValueError(f"episode index={index} is outside [0, {_SEED_STRIDE})")
  return _SPLIT_OFFSETS[split] + zlib.crc32(task.encode()) * _SEED_STRIDE + index


def max_path_length(task: str) -> int:
  """The benchmark's step limit for a task (500 for every v3 task)."""
  return int(_env_class(task).max_path_length)


def _env_class(task: str):
  if task not in _mw_env_dict.ALL_V3_ENVIRONMENTS:
    raise ValueError(f"task={task!r} is not a Meta-World v3 task; names look like 'reach-v3', see "
                     f"metaworld.env_dict.ALL_V3_ENVIRONMENTS")
  return _mw_env_dict.ALL_V3_ENVIRONMENTS[task]


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """How an environment renders and how long its episodes are.

  Attributes:
    image_size: height and width of every camera image, pixels.
    primary_camera: third-person camera name.
    wrist_camera: wrist camera name, or None for a single camera.
    fast_render: disable shadows, reflections and multisampling (see module docstring).
    max_episode_steps: step limit; None uses the benchmark's `max_path_length`.
    isolate_process: `make_env` builds a `ProcessEnv` (required when TensorFlow is or will be
      imported in the same process; see module docstring) instead of an in-process env.
    visual_shift: None, or a `visual_shift.KINDS` name: an appearance change never seen in
      training, applied to the model once (robustness evaluation; `sim/metaworld/visual_shift.py`).
  """
  image_size: int = 224
  primary_camera: str = "corner"
  wrist_camera: str | None = "gripperPOV"
  fast_render: bool = True
  max_episode_steps: int | None = None
  isolate_process: bool = True
  visual_shift: str | None = None

  def __post_init__(self):
    if self.visual_shift is not None and self.visual_shift not in visual_shift.KINDS:
      raise ValueError(f"EnvConfig.visual_shift={self.visual_shift!r}; use None or one of "
                       f"{visual_shift.KINDS}")
    if self.image_size < 8:
      raise ValueError(f"EnvConfig.image_size={self.image_size} is too small; use >= 8 pixels")
    for field in ("primary_camera", "wrist_camera"):
      name = getattr(self, field)
      if name is not None and name not in KNOWN_CAMERAS:
        raise ValueError(f"EnvConfig.{field}={name!r} is not a Meta-World camera; use one of "
                         f"{KNOWN_CAMERAS}")

  @property
  def cameras(self) -> tuple[str, ...]:
    return (self.primary_camera,) + ((self.wrist_camera,) if self.wrist_camera else ())


class SimulationError(RuntimeError):
  """The simulator went unstable (NaN state or a MuJoCo instability warning)."""


class MetaWorldEnv:
  """One Meta-World task with seeded initial states, rendered cameras and crash detection.

  The environment is goal-observable (Meta-World's MT setting), so the 39-d `privileged` vector
  carries the goal that the scripted experts need. Episodes are seeded: `reset(seed)` draws the
  object and goal positions (Meta-World's `rand_vec`) from a generator seeded with `seed`, so a
  seed fully determines the initial state and train and evaluation seeds can be kept disjoint.
  """

  def __init__(self, task: str, config: EnvConfig = EnvConfig()):
    self.task = task
    self.config = config
    self._env = _env_class(task)()
    env = self._env
    # The MT setting: goal visible in the observation, a fresh rand_vec on every reset, drawn
    # from env.np_random (seeded by env.seed) rather than numpy's global generator.
    env._partially_observable = False
    del env.sawyer_observation_space  # cached property, recomputed for full observability
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    self.max_episode_steps = int(config.max_episode_steps or env.max_path_length)
    if self.max_episode_steps > env.max_path_length:
      raise ValueError(f"EnvConfig.max_episode_steps={config.max_episode_steps} exceeds the "
                       f"benchmark's max_path_length={env.max_path_length} for {task}")
    model = env.model
    if config.visual_shift is not None:
      visual_shift.apply(model, visual_shift.VisualShift(config.visual_shift), config.primary_camera)
    if config.fast_render:
      # Must be set before the renderer allocates its framebuffer.
      model.vis.quality.offsamples = 0
      model.vis.quality.shadowsize = 0
    self._renderer = mujoco.Renderer(model, config.image_size, config.image_size)
    if config.fast_render:
      self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
      self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    self._steps = 0
    self._warnings = np.zeros(len(_INSTABILITY_WARNINGS), np.int64)
    self.last_rand_vec: np.ndarray | None = None

  @property
  def raw_env(self):
    """The wrapped Meta-World environment (SawyerXYZEnv)."""
    return self._env

  @property
  def steps(self) -> int:
    return self._steps

  def close(self) -> None:
    if self._renderer is not None:
      self._renderer.close()
      self._renderer = None
    self._env.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def render(self, camera: str, flip: bool | None = None) -> np.ndarray:
    """uint8 [H, W, 3] image of `camera`; rolled cameras are rotated upright unless flip=False."""
    if camera not in KNOWN_CAMERAS:
      raise ValueError(f"camera={camera!r} is not a Meta-World camera; use one of {KNOWN_CAMERAS}")
    self._renderer.update_scene(self._env.data, camera=camera)
    image = self._renderer.render()
    if flip is None:
      flip = camera in FLIPPED_CAMERAS
    if flip:
      image = image[::-1, ::-1]
    return np.ascontiguousarray(image)

  def _observation(self, raw_obs: np.ndarray, render: bool) -> dict[str, np.ndarray]:
    cams = self.config.cameras
    if render:
      images = np.stack([self.render(c) for c in cams])
    else:
      size = self.config.image_size
      images = np.zeros((len(cams), size, size, 3), np.uint8)
    return {
        "images": images,
        "image_mask": np.full((len(cams),), render, bool),
        "state": np.asarray(raw_obs[:STATE_DIM], np.float32),
        "privileged": np.asarray(raw_obs, np.float64),
    }

  def _instability_count(self) -> np.ndarray:
    return np.array([self._env.data.warning[w].number for w in _INSTABILITY_WARNINGS], np.int64)

  def _check_stable(self, raw_obs: np.ndarray) -> None:
    data = self._env.data
    if not (np.all(np.isfinite(data.qpos)) and np.all(np.isfinite(data.qvel))
            and np.all(np.isfinite(raw_obs))):
      raise SimulationError(f"{self.task}: non-finite simulator state at step {self._steps}")
    counts = self._instability_count()
    grew = counts > self._warnings
    if np.any(grew):
      names = [mujoco.mjtWarning(w).name for w, g in zip(_INSTABILITY_WARNINGS, grew) if g]
      raise SimulationError(f"{self.task}: MuJoCo instability {names} at step {self._steps}")

  def reset(self, seed: int, render: bool = True) -> dict[str, np.ndarray]:
    """Starts an episode whose initial state is determined by `seed`."""
    env = self._env
    env.seed(int(seed))
    raw_obs, _ = env.reset()
    self.last_rand_vec = np.array(env._last_rand_vec, copy=True)
    self._steps = 0
    self._warnings = self._instability_count()
    self._check_stable(raw_obs)
    return self._observation(raw_obs, render)

  def step(self, action: np.ndarray, render: bool = True
           ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
    """Applies one action.

    Args:
      action: float [4], clipped to [-1, 1] (Meta-World's action space).
      render: render the cameras (False returns zero images and an all-False image_mask).

    Returns:
      (observation, reward, success, truncated, info): `success` is Meta-World's
      `info['success']` at this step, `truncated` is True at the step limit.

    Raises:
      SimulationError: NaN state or a MuJoCo instability warning during this step.
      ValueError: an action of the wrong shape or with non-finite entries.
    """
    action = np.asarray(action, np.float64).reshape(-1)
    if action.shape != (ACTION_DIM,):
      raise ValueError(f"action has shape {action.shape}; Meta-World takes [{ACTION_DIM}]")
    if not np.all(np.isfinite(action)):
      raise ValueError(f"action {action} has non-finite entries")
    if self._steps >= self.max_episode_steps:
      raise RuntimeError(f"{self.task}: episode already ended at step {self._steps}; call reset")
    raw_obs, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
    self._steps += 1
    self._check_stable(raw_obs)
    truncated = self._steps >= self.max_episode_steps
    return (self._observation(raw_obs, render), float(reward), bool(info["success"]), truncated,
            info)


def reference_render(env: MetaWorldEnv, camera: str) -> np.ndarray:
  """uint8 [H, W, 3] from a fresh MuJoCo renderer, never flipped: a reference for tests."""
  renderer = mujoco.Renderer(env.raw_env.model, env.config.image_size, env.config.image_size)
  try:
    if env.config.fast_render:
      renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
      renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    renderer.update_scene(env.raw_env.data, camera=camera)
    return renderer.render().copy()
  finally:
    renderer.close()


def inject_nan_state(env: MetaWorldEnv) -> None:
  """Fault injection for tests: the next step sees a NaN velocity."""
  env.raw_env.data.qvel[:] = np.nan


# Functions of the environment that `ProcessEnv.call` may run in the worker, by name.
_REMOTE_FUNCTIONS = {"reference_render": reference_render, "inject_nan_state": inject_nan_state}


class ProcessEnv(worker.WorkerClient):
  """A `MetaWorldEnv` in its own process (see module docstring), with the same interface.

  `step_async` / `step_wait` split a step so that a batch of environments simulates and renders
  in parallel. Exceptions raised in the worker (SimulationError, ValueError, ...) are re-raised
  here with their type; a dead worker raises RuntimeError.
  """

  def __init__(self, task: str, config: EnvConfig = EnvConfig()):
    _env_class(task)  # fail here, in the caller's process, on a bad name
    self.task, self.config = task, config
    self.steps = 0
    self.last_rand_vec = None
    child_env = dict(os.environ)
    child_env.setdefault("MUJOCO_GL", "egl")
    super().__init__("m2vla_jax.sim.metaworld.env", task, _REMOTE_FUNCTIONS, env=child_env)
    self.max_episode_steps = self.request("init", task, config)

  def set_task(self, task: str) -> None:
    """Switches the worker to another task (cheaper than starting a new process)."""
    _env_class(task)
    self.max_episode_steps = self.request("init", task, self.config)
    self.task = self.label = task

  def reset(self, seed: int, render: bool = True) -> dict[str, np.ndarray]:
    return self.request("reset", int(seed), render)

  def step(self, action: np.ndarray, render: bool = True):
    self.step_async(action, render)
    return self.step_wait()

  def step_async(self, action: np.ndarray, render: bool = True) -> None:
    super().step_async(np.asarray(action), render)

  def render(self, camera: str, flip: bool | None = None) -> np.ndarray:
    return self.request("render", camera, flip)


def make_env(task: str, config: EnvConfig = EnvConfig()):
  """A `ProcessEnv` (config.isolate_process, the default) or an in-process `MetaWorldEnv`."""
  return ProcessEnv(task, config) if config.isolate_process else MetaWorldEnv(task, config)


def _step(env: MetaWorldEnv, action, render):
  obs, reward, success, truncated, info = env.step(action, render)
  info = {k: (float(v) if np.isscalar(v) else v) for k, v in info.items()}
  return obs, reward, success, truncated, info


def _serve() -> None:
  """Worker loop of `ProcessEnv` (sim/common/worker.py's protocol)."""
  worker.serve(MetaWorldEnv, describe=lambda env: env.max_episode_steps,
               handlers={"reset": MetaWorldEnv.reset, "step": _step, "render": MetaWorldEnv.render},
               remote_functions=_REMOTE_FUNCTIONS,
               extras=lambda env: {"steps": env.steps if env is not None else 0,
                                   "last_rand_vec": env.last_rand_vec if env is not None else None})


if __name__ == "__main__":
  # Serve from the module imported under its package name, so that exceptions (SimulationError)
  # pickle as m2vla_jax.sim.metaworld.env.* rather than __main__.*.
  from m2vla_jax.sim.metaworld import env as _module  # pylint: disable=g-import-not-at-top
  _module._serve()  # pylint: disable=protected-access


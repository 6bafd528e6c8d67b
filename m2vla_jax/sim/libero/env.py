"""One LIBERO task under the standard evaluation protocol, run in its own process.

Owns: the protocol constants (per-suite step limits, the no-op warm-up, the seed, the render and
image sizes), turning a LIBERO observation into ours (rotated, resized cameras and the 8-d state),
the action contract, restoring the suite's benchmark init states, the success predicate, and
`ProcessEnv`, which runs a `LiberoEnv` in a separate Python process.

The protocol is the one published LIBERO numbers use (OpenVLA's `run_libero_eval.py`, openpi's
`examples/libero/main.py`); we followed openpi's file at commit 15a9616a00943ada6c20a0f158e3adb39df2ccac
(github.com/Physical-Intelligence/openpi/blob/15a9616a/examples/libero/main.py):
- the scene is rendered at 256 px (`LIBERO_ENV_RESOLUTION`, the resolution the training
  demonstrations were rendered at) and resized to the policy's size (224) with PIL bilinear
  (openpi's `image_tools.resize_with_pad`, which for square images is a plain resize);
- both images are rotated by 180 degrees (`img[::-1, ::-1]`): robosuite's offscreen renderer
  returns them upside down, and the training data were stored rotated;
- state = end-effector position (3), axis-angle of the end-effector quaternion (3, robosuite's
  `quat2axisangle`, quaternion in x, y, z, w order), gripper finger joint positions (2);
- action = 7-d OSC_POSE delta (xyz, axis-angle rotation, each in [-1, 1], scaled by robosuite's
  controller) plus the gripper: -1 opens, +1 closes (robosuite's Panda convention; openpi's
  dummy action `[0] * 6 + [-1]` holds the gripper open). OpenVLA binarizes the gripper
  (`np.sign`) after mapping its [0, 1] output; we binarize to {-1, +1} with 0 -> -1 (open);
- each episode: `env.reset()`, `env.set_init_state(init_states[i])` with the suite's benchmark
  init state i, then 10 no-op steps so that the objects, placed slightly above their supports,
  settle; the policy then gets at most 220 / 280 / 300 / 520 steps (spatial / object / goal / 10;
  400 for libero_90), the longest training demonstration plus a margin;
- seeding: LIBERO's `env.seed(s)` seeds numpy's global generator, and every `env.reset()` (a hard
  reset that rebuilds the scene) draws the placement of the fixtures (cabinet, stove, ...: welded
  bodies, absent from the init states) from it; `set_init_state` restores only the movable
  objects and the robot. openpi calls `env.seed(7)` once per task (OpenVLA: `env.seed(0)`) and runs
  init states 0..49 in order, so a fixture's pose depends on the episode's position in that
  sequence (measured here: the wooden cabinet moves by ~4 mm and ~1.3 degrees between episodes).
  `EnvConfig.episode_seeding` picks 'sequential' (openpi's: seed once when the environment is
  built; fresh environment + init states in order reproduces its draws) or 'per_init_state' (the
  default: seed `seed + init_index` before each reset, so an episode depends only on its index,
  whatever order or process runs it; init state 0 gets openpi's first draw);
- success = the task's BDDL goal predicate (`env.check_success()`), checked after every step.

Observation returned by `LiberoEnv.reset` / `step` (one environment, no batch axis):
```
{
  'images':     uint8   [2, S, S, 3]   (agentview, robot0_eye_in_hand), rotated, S = image_size
  'image_mask': bool    [2]
  'state':      float32 [8]            eef xyz (m), eef axis-angle (rad), 2 gripper qpos (m)
}
```

Process isolation: TensorFlow and Mesa's software EGL both carry LLVM and crash when loaded in one
process (see `sim/metaworld/env.py`), so `ProcessEnv` runs the environment in
`python -m m2vla_jax.sim.libero.env`, which imports only LIBERO, robosuite and MuJoCo. The worker
may use another interpreter (`EnvConfig.worker_python`): LIBERO then lives in its own virtual
environment and never touches the training one, as openpi keeps its simulators apart.

LIBERO itself is imported lazily, inside `LiberoEnv`, so that this module imports without it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np

from m2vla_jax.sim.common import worker
from m2vla_jax.sim.libero import experts

# Step limits of the policy (after the no-op steps), per suite: openpi's / OpenVLA's values.
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,   # longest training demonstration: 193 steps
    "libero_object": 280,    # 254
    "libero_goal": 300,      # 270
    "libero_10": 520,        # 505
    "libero_90": 400,        # 373
}
CAMERAS = ("agentview", "robot0_eye_in_hand")
STATE_DIM = 8
ACTION_DIM = 7
NUM_NOOP_STEPS = 10
# Zero arm motion, gripper open: what the protocol sends while objects settle.
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
RENDER_SIZE = 256
IMAGE_SIZE = 224
SEED = 7
EPISODE_SEEDINGS = ("per_init_state", "sequential")


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
  """Axis-angle [3] (rad) of a unit quaternion [4] in (x, y, z, w) order.

  robosuite's `transform_utils.quat2axisangle`, as openpi copies it: the real part is clipped to
  [-1, 1]; a rotation of (nearly) zero angle gives zeros.
  """
  quat = np.asarray(quat, np.float64)
  w = float(np.clip(quat[3], -1.0, 1.0))
  den = math.sqrt(1.0 - w * w)
  if math.isclose(den, 0.0):
    return np.zeros(3)
  return quat[:3] * 2.0 * math.acos(w) / den


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] with PIL bilinear, as openpi's client does; H == W."""
  if image.shape[:2] == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(image).resize((size, size), resample=Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """Which suite, and how its environments render and run.

  Attributes:
    suite: a LIBERO suite with a protocol step limit (`SUITE_MAX_STEPS`).
    image_size: side of the images given to the policy, pixels.
    render_size: side of the images the simulator renders, pixels; resized to `image_size`. The
      protocol renders at 256; setting it to `image_size` skips the resize (faster, but the
      images then differ from the protocol's).
    num_noop_steps: no-op steps after restoring an init state, before the policy acts.
    max_episode_steps: the policy's step limit; None uses the suite's (`SUITE_MAX_STEPS`).
    seed: LIBERO's seed (see module docstring, seeding).
    episode_seeding: 'per_init_state' (seed + init_index before every reset; order-independent)
      or 'sequential' (seed once when built, as openpi does).
    binarize_gripper: map the gripper action to {-1, +1} (> 0 closes, else opens).
    reflections: False sets every material's reflectance to 0 after each reset: about a third of
      the render time on CPU (EGL / Mesa) but the images change, so never for reported numbers
      (bench/libero.py flags it).
    isolate_process: `make_env` builds a `ProcessEnv` (see module docstring).
    worker_python: interpreter of the `ProcessEnv` worker; None uses this one (`sys.executable`).
  """
  suite: str = "libero_spatial"
  image_size: int = IMAGE_SIZE
  render_size: int = RENDER_SIZE
  num_noop_steps: int = NUM_NOOP_STEPS
  max_episode_steps: int | None = None
  seed: int = SEED
  episode_seeding: str = "per_init_state"
  binarize_gripper: bool = True
  reflections: bool = True
  isolate_process: bool = True
  worker_python: str | None = None

  def __post_init__(self):
    if self.suite not in SUITE_MAX_STEPS:
      raise ValueError(f"EnvConfig.suite={self.suite!r} has no protocol step limit; use one of "
                       f"{sorted(SUITE_MAX_STEPS)}")
    for field in ("image_size", "render_size"):
      if getattr(self, field) < 8:
        raise ValueError(f"EnvConfig.{field}={getattr(self, field)} is too small; use >= 8 pixels")
    if self.num_noop_steps < 0:
      raise ValueError(f"EnvConfig.num_noop_steps={self.num_noop_steps}; use >= 0 "
                       f"(the protocol uses {NUM_NOOP_STEPS})")
    if self.episode_seeding not in EPISODE_SEEDINGS:
      raise ValueError(f"EnvConfig.episode_seeding={self.episode_seeding!r}; use one of "
                       f"{EPISODE_SEEDINGS}")
    if self.max_episode_steps is not None and self.max_episode_steps < 1:
      raise ValueError(f"EnvConfig.max_episode_steps={self.max_episode_steps}; use >= 1 or None "
                       f"for the suite's limit")

  @property
  def episode_steps(self) -> int:
    """The policy's step limit."""
    return int(self.max_episode_steps or SUITE_MAX_STEPS[self.suite])


def _task_suite(suite: str):
  try:
    from libero.libero import benchmark  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("LIBERO is not installed; install the extra with `pip install -e .[libero]` "
                      "(or point EnvConfig.worker_python at an interpreter that has it)") from e
  return benchmark.get_benchmark_dict()[suite]()


class LiberoEnv:
  """One task of a LIBERO suite under the evaluation protocol (see module docstring).

  Attributes (after construction): `instruction` (the task's language), `num_init_states`,
  `max_episode_steps`.
  """

  def __init__(self, task_index: int, config: EnvConfig = EnvConfig()):
    from libero.libero import get_libero_path  # pylint: disable=g-import-not-at-top
    from libero.libero.envs import OffScreenRenderEnv  # pylint: disable=g-import-not-at-top
    suite = _task_suite(config.suite)
    if not 0 <= task_index < suite.n_tasks:
      raise ValueError(f"task_index={task_index} is outside [0, {suite.n_tasks}) for "
                       f"{config.suite}")
    self.config, self.task_index = config, int(task_index)
    task = suite.get_task(task_index)
    self.instruction = str(task.language)
    self._init_states = np.asarray(suite.get_task_init_states(task_index))
    self.num_init_states = len(self._init_states)
    self.max_episode_steps = config.episode_steps
    bddl = pathlib.Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
    self._env = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_heights=config.render_size,
                                   camera_widths=config.render_size)
    self._env.seed(config.seed)
    self._steps = 0
    self.last_raw_observation: dict[str, np.ndarray] | None = None

  @property
  def raw_env(self):
    """The wrapped LIBERO `OffScreenRenderEnv`."""
    return self._env

  @property
  def steps(self) -> int:
    """Policy steps taken in this episode (the no-op steps are not counted)."""
    return self._steps

  def close(self) -> None:
    if self._env is not None:
      self._env.close()
      self._env = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _observation(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    self.last_raw_observation = raw
    size = self.config.image_size
    images = np.stack([resize(np.ascontiguousarray(raw[f"{c}_image"][::-1, ::-1]), size)
                       for c in CAMERAS])
    state = np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]),
                            raw["robot0_gripper_qpos"]]).astype(np.float32)
    return {"images": images, "image_mask": np.ones((len(CAMERAS),), bool), "state": state}

  def reset(self, init_index: int) -> dict[str, np.ndarray]:
    """Restores the suite's benchmark init state `init_index` and runs the no-op steps."""
    if not 0 <= init_index < self.num_init_states:
      raise ValueError(f"init_index={init_index} is outside [0, {self.num_init_states}) for "
                       f"{self.config.suite} task {self.task_index}")
    if self.config.episode_seeding == "per_init_state":
      self._env.seed(self.config.seed + int(init_index))
    self._env.reset()
    if not self.config.reflections:
      # After reset: LIBERO rebuilds the MuJoCo model on reset, restoring the materials.
      self._env.sim.model.mat_reflectance[:] = 0.0
    raw = self._env.set_init_state(self._init_states[init_index])
    for _ in range(self.config.num_noop_steps):
      raw, _, _, _ = self._env.step(list(NOOP_ACTION))
    self._steps = 0
    return self._observation(raw)

  def step(self, action: np.ndarray
           ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
    """Applies one action.

    Args:
      action: float [7]: delta eef position and axis-angle rotation in [-1, 1] (clipped), then the
        gripper (-1 open, +1 close; binarized unless config.binarize_gripper is False).

    Returns:
      (observation, reward, success, truncated, info): `success` is the task's goal predicate
      after this step; `truncated` is True at the step limit.

    Raises:
      ValueError: an action of the wrong shape or with non-finite entries.
      RuntimeError: stepping past the step limit.
    """
    action = np.asarray(action, np.float64).reshape(-1)
    if action.shape != (ACTION_DIM,):
      raise ValueError(f"action has shape {action.shape}; LIBERO takes [{ACTION_DIM}] (delta xyz, "
                       f"delta axis-angle, gripper)")
    if not np.all(np.isfinite(action)):
      raise ValueError(f"action {action} has non-finite entries")
    if self._steps >= self.max_episode_steps:
      raise RuntimeError(f"{self.config.suite} task {self.task_index}: episode already ended at "
                         f"step {self._steps}; call reset")
    action = np.clip(action, -1.0, 1.0)
    if self.config.binarize_gripper:
      action[6] = 1.0 if action[6] > 0 else -1.0
    raw, reward, _, info = self._env.step(action.tolist())
    self._steps += 1
    success = bool(self._env.check_success())
    truncated = self._steps >= self.max_episode_steps
    return self._observation(raw), float(reward), success, truncated, dict(info)


def raw_observation(env: LiberoEnv) -> dict[str, np.ndarray]:
  """The last observation as LIBERO returned it (images unrotated, at render_size): for tests."""
  return dict(env.last_raw_observation)


def object_poses(env: LiberoEnv) -> dict[str, np.ndarray]:
  """Object name -> float64 [7]: world position and orientation (MuJoCo's w, x, y, z quaternion)."""
  data = env.raw_env.sim.data
  return {name: np.concatenate([data.body_xpos[i], data.body_xquat[i]])
          for name, i in env.raw_env.env.obj_body_id.items()}


def simulator_steps(env: LiberoEnv) -> int:
  """Control steps robosuite counted since its last reset (no-op steps included)."""
  return int(env.raw_env.env.timestep)


# Functions of the environment that `ProcessEnv.call` may run in the worker, by name.
_REMOTE_FUNCTIONS = {"raw_observation": raw_observation, "object_poses": object_poses,
                     "simulator_steps": simulator_steps,
                     "run_expert_episode": experts.run_expert_episode}


class ProcessEnv(worker.WorkerClient):
  """A `LiberoEnv` in its own process (see module docstring), with the same interface.

  `step_async` / `step_wait` split a step so that a batch of environments steps in parallel.
  Exceptions raised in the worker are re-raised here with their type; a dead worker raises
  RuntimeError.
  """

  def __init__(self, task_index: int, config: EnvConfig = EnvConfig()):
    self.task_index, self.config = int(task_index), config
    self.steps = 0
    child_env = dict(os.environ)
    child_env.setdefault("MUJOCO_GL", "egl")
    # robosuite 1.4's EGL context parses CUDA_VISIBLE_DEVICES as device numbers and fails on the
    # empty string that hides GPUs from JAX (int('')); unset, it tries every EGL device.
    if not child_env.get("CUDA_VISIBLE_DEVICES", "x").strip():
      del child_env["CUDA_VISIBLE_DEVICES"]
    # The worker imports this package from the same source tree, whichever interpreter runs it.
    root = str(pathlib.Path(__file__).resolve().parents[3])
    child_env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else []))
    super().__init__("m2vla_jax.sim.libero.env", f"{config.suite} task {self.task_index}",
                     _REMOTE_FUNCTIONS, python=config.worker_python, env=child_env,
                     close_timeout_s=30.0)
    info = self.request("init", task_index, config)
    self.instruction = info["instruction"]
    self.num_init_states = info["num_init_states"]
    self.max_episode_steps = info["max_episode_steps"]

  def reset(self, init_index: int) -> dict[str, np.ndarray]:
    return self.request("reset", int(init_index))

  def step(self, action: np.ndarray):
    self.step_async(action)
    return self.step_wait()

  def step_async(self, action: np.ndarray) -> None:
    super().step_async(np.asarray(action))


def make_env(task_index: int, config: EnvConfig = EnvConfig()):
  """A `ProcessEnv` (config.isolate_process, the default) or an in-process `LiberoEnv`."""
  return ProcessEnv(task_index, config) if config.isolate_process else LiberoEnv(task_index, config)


def _serve() -> None:
  """Worker loop of `ProcessEnv` (sim/common/worker.py's protocol)."""
  worker.serve(LiberoEnv, describe=lambda env: {"instruction": env.instruction,
                                                "num_init_states": env.num_init_states,
                                                "max_episode_steps": env.max_episode_steps},
               handlers={"reset": LiberoEnv.reset, "step": LiberoEnv.step},
               remote_functions=_REMOTE_FUNCTIONS,
               extras=lambda env: {"steps": env.steps if env is not None else 0})
  # robosuite's EGL contexts raise (harmless) errors from their finalizers at interpreter
  # shutdown; everything is closed and replied to, so leave without running them.
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  # Serve from the module imported under its package name, so that exceptions pickle as
  # m2vla_jax.sim.libero.env.* rather than __main__.*.
  from m2vla_jax.sim.libero import env as _module  # pylint: disable=g-import-not-at-top
  _module._serve()  # pylint: disable=protected-access

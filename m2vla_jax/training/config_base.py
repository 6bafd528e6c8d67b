"""Defaults every training config starts from, and big_vision-style short-argument parsing.

`base_config()` is the one source of truth for trainer fields and their types; config files
(configs/*.py) override what differs and return a locked ConfigDict, so a misspelt `--config.<key>`
override fails in flag parsing and an ill-typed one fails ConfigDict's type check, both before any work.
A bad short argument (`configs/sim.py:stepz=3`, `steps=abc`) raises `ConfigError`, the one exception type for
config mistakes (the trainer's `validate_config` raises it too); the entry point prints it as one line.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import types

import ml_collections
from ml_collections import config_dict

from m2vla_jax.training import feature_cache


def load_config_file(path: str, *, relative_to: str | None = None) -> types.ModuleType:
  """The module of a config file (`configs/*.py` are files, not a package), e.g. to build on a sibling.

  `relative_to`: a file whose folder `path` is relative to (a config passes its own `__file__`).
  """
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  name = "_m2vla_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} cannot be loaded")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class ConfigError(ValueError):
  """A config field or short argument is missing, ill-typed or out of range; the message names it."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'res=224,freeze=True' -> ConfigDict, values typed like their defaults.

  Raises:
    ConfigError: an item is not key=value, names no known key, or its value does not parse as the
      default's type; the message names the argument and lists the known keys.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  known = ", ".join(sorted(defaults))
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"config argument {item!r} is not key=value (known keys: {known})")
    key, value = item.split("=", 1)
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config argument {key!r}{hint}; known: {known}")
    kind = type(defaults[key])
    example = f"e.g. {key}={defaults[key]} (the default)"
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r} must be a bool (True/False), {example}")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ConfigError(f"config argument {key}={value!r} must be {article} {kind.__name__}, "
                          f"{example}") from None
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32                 # global, over all hosts
  c.grad_accum_steps = 1            # micro-batches per optimizer step (batch_size must divide)
  c.policy = "m2vla"                # policies/registry.py name or 'module:Class'
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.kind = "rlds"              # data/sources.py name or 'module:function'
  # What trains and the frozen parameters' dtype are the policy's facts (`config.model.trainable`,
  # `config.model.frozen_dtype`); the trainer reads them from the policy, so they are set once.
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=100, end_lr_factor=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
      clip_grad_norm=1.0))
  # Per-group peak learning rates: [(name, regex over trainable paths, lr)], first full match decides;
  # unmatched trainable parameters are group 'default' at optimizer.lr (training/optimizer.py).
  c.optimizer.groups = ()            # a tuple, so that --config.optimizer.groups=... parses
  c.ema_decay = 0.0                 # 0 disables the EMA of trainable params
  c.feature_cache = feature_cache.default_config()   # frozen-feature cache (training/feature_cache.py)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.param_rules = []       # [(regex, partition spec tuple)], before the default FSDP rule
  c.sharding.fsdp_min_bytes = 4 * 2**20
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = config_dict.placeholder(int)   # also keep every K-th step (None: off)
  c.checkpoint.async_save = True
  c.checkpoint.use_ocdbt = True     # see training/checkpoints.Checkpointer
  c.log_every = 10
  c.eval_every = 500                # 0 disables validation
  c.eval_steps = 8
  c.profile_steps = config_dict.placeholder(tuple)         # (first, last) step of a profiler trace
  c.peak_flops_per_device = config_dict.placeholder(float)  # MFU denominator; None: by device kind
  c.progress_bar = True
  c.required_fields = []            # dotted names that must be set (checked by validation.validate_config)
  return c


# The CPU-sized simulation configs (configs/sim.py: Meta-World, configs/mjx.py: the MJX suite)
# share the model head, the pipeline settings and the one-checkpoint schedule below; each file
# keeps only what differs (backbone, cameras, tokenizer, what trains).

def small_sim_model(*, vlm: str, num_cameras: int, horizon: int, mol: bool, msm: bool,
                    width: int, trainable: list[tuple[str, bool]]) -> ml_collections.ConfigDict:
  """M²-VLA with a small head for 4-d hand-motion control (hand xyz + gripper, state and action)."""
  from m2vla_jax.policies import m2vla  # pylint: disable=g-import-not-at-top
  m = m2vla.get_config()
  m.vlm = vlm
  m.num_cameras = num_cameras
  m.state_dim = 4
  m.action_dim = 4
  m.horizon = horizon
  m.mol = mol
  m.msm = msm
  m.head.width = width
  m.head.num_heads = 4
  m.head.head_dim = width // 4
  m.head.mlp_dim = 2 * width
  m.memory.size = 2048
  m.frozen_dtype = "float32"    # bf16 matmuls are slow on CPU and the backbones are tiny
  m.trainable = list(trainable)
  return m


def small_sim_pipeline(*, datasets: str, data_dir: str, cameras: tuple[str, ...],
                       image_size: int) -> ml_collections.ConfigDict:
  """The RLDS pipeline for locally recorded demos: one reader thread, a small shuffle buffer. Its
  batch geometry (horizon, widths, text tokens) comes from the policy (`data.loader.pipeline_config`)."""
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  p = pipeline.get_config()
  p.datasets = datasets
  p.data_dir = data_dir
  p.cameras = tuple(cameras)
  p.image_size = (image_size, image_size)
  p.shuffle_buffer = 1024
  p.progress = False
  p.num_threads = 1
  p.prefetch = 4
  return p


def single_checkpoint_schedule(c: ml_collections.ConfigDict, *, steps: int, lr: float,
                               warmup_steps: int) -> None:
  """In place: AdamW at `lr`, one synchronous checkpoint at the end (the workflows evaluate that),
  loss every 100 steps, no in-training validation, no progress bar (logs go to files)."""
  c.total_steps = steps
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = warmup_steps
  c.optimizer.weight_decay = 1e-4
  c.mesh.data = -1
  c.checkpoint.every = max(steps, 1)
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.log_every = 100
  c.eval_every = 0
  c.progress_bar = False

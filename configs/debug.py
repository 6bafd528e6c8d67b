"""Debug config: a tiny policy, CPU-sized shapes, a few steps. Short args: `configs/debug.py:steps=8,fsdp=2`.

model=toy (default) trains the trainer's toy policy on synthetic batches; model=m2vla trains the real
M²-VLA policy with a tiny backbone on the bridge debug sample (`$M2VLA_SHARED_DATA/octo_bridge_debug`, by
default `<repo>/../shared/data/octo_bridge_debug`; `data_dir=...` overrides it).
"""
import os

import ml_collections

from m2vla_jax.data import testing
from m2vla_jax.training import config_base
from m2vla_jax.policies import toy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_base.parse_arg(arg, steps=20, batch=16, fsdp=1, model="toy", data="synthetic",
                            data_dir=os.path.join(testing.shared_data_dir() or "../shared/data",
                                                  "octo_bridge_debug"))
  c = config_base.base_config()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.policy = a.model
  c.data.kind = a.data
  if a.model == "toy":
    c.model = toy.default_config()
  elif a.model == "m2vla":
    if a.data != "rlds":
      raise config_base.ConfigError("model=m2vla reads the bridge sample; add data=rlds")
    from m2vla_jax.policies import m2vla  # pylint: disable=g-import-not-at-top
    c.model = m2vla.get_config()
    c.model.vlm = "tiny"            # SigLIP tiny/16 (32x32 images) + 2-layer Gemma, 4 queries
    c.model.state_dim = 8             # bridge standardized state: octo's 8-dim layout
    c.model.horizon = 4
    c.model.action_dim = 7
    c.model.head.width = 32
    c.model.head.num_heads = 2
    c.model.head.head_dim = 16
    c.model.head.mlp_dim = 64
    c.model.memory.size = 64
  else:
    raise config_base.ConfigError(f"config argument model={a.model!r}: use model=toy or model=m2vla")
  if a.data == "rlds":
    from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    c.data.pipeline = pipeline.get_config()
    c.data.pipeline.datasets = "bridge"
    c.data.pipeline.data_dir = a.data_dir
    c.data.pipeline.image_size = (32, 32)
    c.data.pipeline.shuffle_buffer = 64
    c.data.pipeline.progress = False
    c.data.pipeline.num_threads = 1
    c.data.pipeline.prefetch = 2
    # UTF-8 bytes as ids (the toy embeds 258 ids; the tiny Gemma has 128, so bytes are folded into it);
    # a SentencePiece .model / .gguf path for a real Gemma.
    c.data.tokenizer = "bytes_mod:128" if a.model == "m2vla" else "byte"
    c.data.val_split = "val"
    if a.model == "toy":
      c.model.num_tokens = 48
      c.model.vocab = 258
      c.model.image_size = 32
      c.model.state_dim = 8         # bridge standardized state: octo's 8-dim layout
  # Fault injection of the synthetic data (tests): NaN actions in batch n; sleep before batches >= n.
  c.data.nan_at_batch = -1
  c.data.slow_after_batch = -1
  c.data.slow_seconds = 0.0
  c.data.val_batches = 4           # held-out synthetic batches (evaluation)
  c.optimizer.lr = 1e-2
  c.optimizer.warmup_steps = 1
  c.mesh.data = -1
  c.mesh.fsdp = a.fsdp
  c.sharding.fsdp_min_bytes = 0     # shard even tiny arrays so FSDP is exercised on CPU
  c.checkpoint.every = 5
  c.checkpoint.keep = 3
  c.log_every = 1
  c.eval_every = 10
  c.eval_steps = 2
  c.lock()
  return c

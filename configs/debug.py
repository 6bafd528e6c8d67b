"""Debug config: a tiny policy, CPU-sized shapes, a few steps. Short args: `configs/debug.py:steps=8,fsdp=2`.

model=toy (default) trains the trainer's toy policy on synthetic batches; model=m2vla trains the real
M²-VLA policy with a tiny backbone on the bridge debug sample (/work/shared/data/octo_bridge_debug).
"""
import ml_collections

from m2vla_jax.training import config_base
from m2vla_jax.training import toy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_base.parse_arg(arg, steps=20, batch=16, fsdp=1, model="toy", data="synthetic",
                            data_dir="/work/shared/data/octo_bridge_debug")
  c = config_base.base_config()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.policy = a.model
  c.data.kind = a.data
  if a.model == "toy":
    c.model = toy.default_config()
  else:
    c.model = ml_collections.ConfigDict()  # filled once models/m2vla.py exposes its debug config
  if a.data == "rlds":
    from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    c.data.pipeline = pipeline.get_config()
    c.data.pipeline.datasets = "bridge"
    c.data.pipeline.data_dir = a.data_dir
    c.data.pipeline.image_size = (32, 32)
    c.data.pipeline.max_tokens = 48
    c.data.pipeline.horizon = 4
    c.data.pipeline.shuffle_buffer = 64
    c.data.pipeline.progress = False
    c.data.pipeline.num_threads = 1
    c.data.pipeline.prefetch = 2
    c.data.tokenizer = "byte"       # m2vla_jax.data.testing.ByteTokenizer; a .model/.gguf path for Gemma
    c.data.val_split = "val"
    if a.model == "toy":
      c.model.num_tokens = 48
      c.model.vocab = 258
      c.model.image_size = 32
  # Fault injection of the synthetic data (tests): NaN actions in batch n; sleep before batches >= n.
  c.data.nan_at_batch = -1
  c.data.slow_after_batch = -1
  c.data.slow_seconds = 0.0
  c.data.val_batches = 4           # held-out synthetic batches (evaluation)
  c.trainable = [("vlm/.*", False), (".*", True)]
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

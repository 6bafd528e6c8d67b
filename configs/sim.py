"""Meta-World default: M²-VLA with a tiny backbone on expert demos of 4 tasks, CPU-sized (2 cores).

    python -m m2vla_jax.sim.workflow --config=configs/sim.py --workdir=/tmp/sim_run
    python -m m2vla_jax.sim.workflow --config=configs/sim.py:mol=False,msm=False --workdir=...

Short args: steps, batch, episodes (demos per task), eval_episodes (seen, per task), mol, msm,
horizon, execute (actions executed per chunk), train_img (train the tiny SigLIP tower),
data_dir (demo cache). The `sim` section is read by `m2vla_jax.sim.workflow` (prepare_data before
training, evaluate_run after).

What is frozen and why: no pretrained VLM can be downloaded here, so the backbone is the tiny
random-initialised PaliGemma layout ('tiny': SigLIP tiny/16 on 32x32 images -> 4 patch tokens,
2-layer width-32 Gemma). The Gemma layers stay frozen (random features of the instruction and
image tokens still separate tasks); the SigLIP tower trains by default (`train_img=True`) because a
frozen random 16x16x3 -> 32 patch projection throws away most of the object-position information
(see m2vla_jax/sim/RESULTS.md); the learnable queries and the whole action head train as in the paper.
"""
import os

import ml_collections

from m2vla_jax.sim import workflow
from m2vla_jax.training import config_base

# Tasks with reliable experts (m2vla_jax/sim/DEMOS.md) whose goal is visible in the image; the two
# window tasks share one scene, so the instruction (and the window's state) decides the motion.
TASKS = ("drawer-close-v3", "button-press-topdown-v3", "window-open-v3", "window-close-v3")
# Never trained: drawer-open shares drawer-close's scene (the instruction names the new motion).
HELD_OUT_TASKS = ("drawer-open-v3", "button-press-v3")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_base.parse_arg(arg, steps=3000, batch=64, episodes=15, eval_episodes=20, mol=True,
                            msm=True, horizon=8, execute=2, train_img=True, lr=1e-3, width=64,
                            data_dir=os.environ.get("M2VLA_SIM_DATA", workflow.DEFAULT_DATA_DIR))
  from m2vla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from m2vla_jax.models import m2vla  # pylint: disable=g-import-not-at-top
  c = config_base.base_config()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.policy = "m2vla"

  c.sim = ml_collections.ConfigDict()
  c.sim.suite = "mt10"
  c.sim.tasks = TASKS
  c.sim.held_out_tasks = HELD_OUT_TASKS
  c.sim.episodes_per_task = a.episodes
  c.sim.image_size = 32
  c.sim.primary_camera = "corner"
  c.sim.wrist_camera = ""            # one camera: software rendering costs ~12 ms per camera here
  c.sim.post_success_steps = 3
  c.sim.dataset_name = workflow.name_from_config(c.sim)
  c.sim.eval = ml_collections.ConfigDict()
  c.sim.eval.episodes_per_task = a.eval_episodes
  c.sim.eval.paraphrased_episodes = 10
  c.sim.eval.held_out_episodes = 10
  c.sim.eval.batch_size = 8
  c.sim.eval.execute_steps = a.execute
  # Demonstrations succeed within ~50-100 steps; a policy that has not succeeded by 200 steps
  # is scored as a failure (stricter than the benchmark's 500, and 2.5x cheaper to evaluate).
  c.sim.eval.max_episode_steps = 200
  c.sim.eval.num_videos = 2
  c.sim.eval.variants = ("seen", "paraphrased", "held_out_tasks")
  c.sim.eval.out_subdir = "sim_eval"

  c.model = m2vla.get_config()
  c.model.vlm = "tiny"
  c.model.num_cameras = 1
  c.model.state_dim = 4
  c.model.action_dim = 4
  c.model.horizon = a.horizon
  c.model.mol = a.mol
  c.model.msm = a.msm
  c.model.head.width = a.width
  c.model.head.num_heads = 4
  c.model.head.head_dim = a.width // 4
  c.model.head.mlp_dim = 2 * a.width
  c.model.memory.size = 2048
  c.model.frozen_dtype = "float32"    # bf16 matmuls are slow on CPU and the backbone is tiny
  rules = [("vlm/queries", True)]
  if a.train_img:
    rules.append(("vlm/img/.*", True))
  rules += [("vlm/.*", False), (".*", True)]
  c.model.trainable = rules
  c.trainable = list(rules)
  c.frozen_dtype = "float32"

  c.data.kind = "rlds"
  c.data.pipeline = pipeline.get_config()
  p = c.data.pipeline
  p.datasets = c.sim.dataset_name
  p.data_dir = a.data_dir
  p.cameras = ("primary",)
  p.image_size = (c.sim.image_size, c.sim.image_size)
  p.horizon = a.horizon
  # The tiny VLM accepts 16 text tokens (raise model.vlm_overrides.max_text_tokens together with
  # this), so byte tokens keep the first 15 characters of an instruction; the measured results use 16.
  p.max_tokens = 16
  p.shuffle_buffer = 1024
  p.progress = False
  p.num_threads = 1
  p.prefetch = 4
  c.data.tokenizer = "bytes_mod:128"   # UTF-8 bytes folded into the tiny Gemma's 128 ids
  c.data.val_split = "train"

  c.optimizer.lr = a.lr
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4
  c.mesh.data = -1
  c.checkpoint.every = max(a.steps, 1)
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.log_every = 100
  c.eval_every = 0
  c.progress_bar = False
  c.lock()
  return c

"""Full Meta-World MT10 (every MT10 task, held-out tasks from ML10's test split), sized for a
single accelerator rather than the 2-core CPU default (configs/sim.py keeps 4 tasks).

    python -m m2vla_jax.train --config=configs/metaworld_mt10.py --workdir=/tmp/mt10

Short args: those of configs/sim.py (steps, batch, episodes, eval_episodes, mol, msm, horizon,
execute, train_img, lr, width, data_dir). Defaults here: 50 demos per task, 50 evaluation episodes
per task (Meta-World's convention), a primary and a wrist camera, 20k steps.
"""
import ml_collections

from m2vla_jax.sim.metaworld import env as metaworld_env
from m2vla_jax.sim.metaworld import workflow
from m2vla_jax.training import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  defaults = "steps=20000,batch=256,episodes=50,eval_episodes=50,width=256"
  # parse_arg takes each key once: later keys in `arg` would repeat these, so merge by key.
  merged = {}
  for kv in filter(None, (defaults + ("," + arg if arg else "")).split(",")):
    if "=" not in kv:
      raise config_base.ConfigError(f"config argument {kv!r} is not key=value (keys: those of configs/sim.py)")
    key, value = kv.split("=", 1)
    merged[key] = value
  sim = config_base.load_config_file("sim.py", relative_to=__file__)
  c = sim.get_config(",".join(f"{k}={v}" for k, v in merged.items()))
  with c.unlocked():
    c.sim.tasks = metaworld_env.train_tasks("mt10")
    c.sim.held_out_tasks = metaworld_env.HELD_OUT_TASKS["mt10"]
    c.sim.wrist_camera = "gripperPOV"
    c.sim.dataset_name = workflow.name_from_config(c.sim)
    c.sim.eval.paraphrased_episodes = 50
    c.sim.eval.held_out_episodes = 50
    c.sim.eval.max_episode_steps = 500          # the benchmark's limit
    c.sim.eval.num_videos = 3
    c.data.pipeline.datasets = c.sim.dataset_name
    c.data.pipeline.cameras = ("primary", "wrist")
    c.data.pipeline.num_threads = 8
    c.data.pipeline.prefetch = 8
    c.model.num_cameras = 2
    c.model.memory.size = 4096
    c.checkpoint.every = 2000
    c.checkpoint.keep = 3
    c.log_every = 100
  return c

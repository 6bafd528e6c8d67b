"""Open X-Embodiment RLDS input pipeline: reading, standardization, statistics, transforms, batching."""

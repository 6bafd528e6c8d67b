"""Neural network modules (Flax linen): the frozen vision-language backbone and the action heads."""

"""Layer 0: what every other layer may use and that imports nothing of the package above it.

  tree_util.py   flat 'a/b/c' paths <-> nested parameter trees
  freezing.py    `config.trainable` rules: which parameter paths train, which stay frozen
  dtypes.py      the one table of dtype names configs may use
  registry.py    'name' or 'module:attribute' -> object, for registries configs name into
"""

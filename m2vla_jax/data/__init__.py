"""Open X-Embodiment RLDS input pipeline: reading, standardization, statistics, transforms, batching.

  errors.py      DataError: every bad dataset / entry / config names dataset, episode and field
  oxe/           typed per-dataset entries (spec.py) and the registry with named mixtures (registry.py)
  rlds.py        TFDS RLDS reading (tfrecord or array_record, local or gs://) into standardized episodes
  statistics.py  cached per-dataset statistics and normalization
  transforms.py  action chunking, image decode/resize/augment (tokenization: text/tokenizers.py)
  pipeline.py    grain pipeline: mixture, shuffle, host sharding, batches (docs/ARCHITECTURE.md contract)
  writer.py      in-memory episodes -> RLDS TFDS dataset on disk (simulator demonstrations)
  sources.py     the data sources a config names (config.data.kind)
  loader.py      the RLDS pipeline behind the trainer's data interface
  synthetic.py   synthetic batches for the toy policy and tests
  testing.py     helpers that write tiny datasets in published feature layouts (tests)
"""

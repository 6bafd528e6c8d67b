"""Serving: a trained policy behind a websocket, and the client robots and simulators run.

Owns the network side of inference; the observation -> action path stays `inference`'s.
  protocol.py  the wire format: msgpack, numpy arrays as {dtype, shape, bytes}, no pickle
  server.py    PolicyServer: validation, warm-up, the inference worker and micro-batching, health, token
  client.py    PolicyClient + ActionChunker; numpy + websockets + msgpack only (no JAX, no TensorFlow)

Nothing is imported here, so `import m2vla_jax.serving.client` loads no model code.
Entry point: `python -m m2vla_jax.serve --bundle=PATH | --workdir=RUN`.
"""

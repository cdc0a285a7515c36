"""bales-stream: serve batched CPU PyTorch inference from Redis Streams.

Modules, in the order a request meets them: ``settings`` (configuration), ``protocol``
(decoding entries), ``streams`` (Redis access), ``batcher``, ``registry``/``models``,
``inference`` (the executor bridge), ``replies``, ``worker`` (wires it together),
``sidecar`` (HTTP health/reload/metrics), ``service`` (lifecycle) and ``cli``.
The wire format itself lives in ``bales_producer.wire``.
"""

__version__ = "0.1.0"

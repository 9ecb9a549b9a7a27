"""fedpeft: federated, privacy-aware parameter-efficient fine-tuning on Flower.

The core library shared by ``server/`` and ``client/``: configuration, registries,
models, data, client methods, wire format and reporting.
"""

__version__ = "0.1.0"

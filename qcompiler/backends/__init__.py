"""Backends: build something that runs from a compiled ONNX graph."""

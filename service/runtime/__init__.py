"""Serving runtime: onnxruntime sessions and the registry of loaded models."""

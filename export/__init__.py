"""Turns a trained client into ONNX and runs it with ONNX Runtime."""

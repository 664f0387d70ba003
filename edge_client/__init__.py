"""The edge device process: local training, feature upload, ONNX export."""

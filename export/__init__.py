"""torch -> ONNX export of trained NCF models, verified against torch: `ncf export`."""

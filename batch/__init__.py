"""Batch scoring with ONNX Runtime: `ncf score`. Never imports torch."""

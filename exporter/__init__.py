"""Exporter: per-level on-device training artifacts (ExecuTorch and ONNX). Not built yet."""

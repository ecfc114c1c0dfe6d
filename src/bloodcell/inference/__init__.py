"""Inference: ``Predictor`` (``predict``), an exported .onnx file without torch (``onnx``), Grad-CAM
(``cam``) and export to ONNX / TorchScript (``export``). Importing this package loads no torch."""

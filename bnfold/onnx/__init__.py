"""ONNX side of bnfold: export a (folded) module, fold BatchNormalization in ONNX graphs,
verify two graphs against each other in onnxruntime."""

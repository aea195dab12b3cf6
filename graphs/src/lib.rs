//! Pure ONNX graph construction.

//! Checkpoint reading and ONNX export.

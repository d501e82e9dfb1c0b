"""What runs at serving time: graph contract, ONNX export, TensorRT build, manifest, runtimes."""

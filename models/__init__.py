"""Model tooling: multi-exit networks, ONNX graph inspection and splitting, profiling, bundles."""

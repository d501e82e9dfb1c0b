#!/bin/sh
# First start: export the ONNX graphs and build TensorRT engines into the engine volume.
set -eu
if [ ! -f "$GLIPV2_ENGINE_DIR/manifest.json" ]; then
    glipv2 export --model "$GLIPV2_MODEL_DIR" --out "$GLIPV2_ENGINE_DIR"
fi
if ! grep -q '"tensorrt"' "$GLIPV2_ENGINE_DIR/manifest.json"; then
    glipv2 build-engines --engines "$GLIPV2_ENGINE_DIR"
fi
exec glipv2 serve "$@"

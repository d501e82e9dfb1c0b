"""Names of runtimes, execution providers and precisions: one enum each, shared by the
settings, the command line and the runtimes (importing this module loads nothing heavy)."""

from __future__ import annotations

from enum import StrEnum


class RuntimeKind(StrEnum):
    """What runs the graphs: PyTorch eager on a model folder, or an engine folder's graphs."""

    PYTORCH = "pytorch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class OrtProvider(StrEnum):
    """ONNX Runtime execution providers we configure."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class Precision(StrEnum):
    """Precision of the heavy graphs: bf16 is PyTorch autocast, int8 the ONNX Runtime variant."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"

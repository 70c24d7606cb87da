"""Target backends and framework exporters; importing this package registers them."""

from __future__ import annotations

from . import onnx_from_keras as _onnx_keras  # noqa: F401
from . import onnx_target as _onnx  # noqa: F401
from . import tflite_target as _tflite  # noqa: F401

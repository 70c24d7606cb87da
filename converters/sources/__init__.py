"""Source loaders; importing this package registers them."""

from __future__ import annotations

from . import keras_source as _keras  # noqa: F401
from . import onnx_source as _onnx  # noqa: F401
from . import torch_source as _torch  # noqa: F401

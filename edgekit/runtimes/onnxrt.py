"""onnxruntime backend: execution providers and thread count from the options."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import RuntimeBackendError
from ..manifest import TensorSpec
from ._base import BackendInfo, RuntimeBackend, RuntimeOptions, Session, optional_import, register


class OnnxSession(Session):
    def __init__(self, sess: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._sess = sess
        self._output_names = [o.name for o in outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._sess.run(self._output_names, feeds))


@register
class OnnxRuntimeBackend(RuntimeBackend):
    KEY: ClassVar[str] = "onnxruntime"
    FORMAT: ClassVar[str] = "onnx"

    @classmethod
    def info(cls) -> BackendInfo:
        ort, note = optional_import("onnxruntime")
        if ort is None:
            return BackendInfo(cls.KEY, cls.FORMAT, False, None, note)
        providers = ", ".join(ort.get_available_providers())
        return BackendInfo(cls.KEY, cls.FORMAT, True, ort.__version__, f"providers: {providers}")

    @classmethod
    def load(
        cls, model: bytes, inputs: list[TensorSpec], outputs: list[TensorSpec],
        options: RuntimeOptions,
    ) -> Session:
        ort, note = optional_import("onnxruntime")
        if ort is None:
            raise RuntimeBackendError(f"onnxruntime is not available: {note}",
                                      hint="pip install onnxruntime")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        available = ort.get_available_providers()
        wanted = options.providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise RuntimeBackendError(
                f"execution providers {missing} are not available here (have: {available})",
                hint="remove them from the configuration or install the matching onnxruntime build",
            )
        try:
            sess = ort.InferenceSession(model, sess_options=so, providers=wanted)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime cannot load the model: {exc}") from exc
        return OnnxSession(sess, inputs, outputs)

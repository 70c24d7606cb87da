"""LiteRT backend: ``ai_edge_litert``, else ``tflite_runtime``, else ``tensorflow.lite``."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np

from ..errors import RuntimeBackendError
from ..manifest import TensorSpec
from ._base import BackendInfo, RuntimeBackend, RuntimeOptions, Session, optional_import, register

_CANDIDATES = (
    ("ai_edge_litert.interpreter", "ai_edge_litert"),
    ("tflite_runtime.interpreter", "tflite_runtime"),
    ("tensorflow.lite", "tensorflow"),
)


def _interpreter_module() -> tuple[Any, str, str]:
    notes = []
    for module_name, dist in _CANDIDATES:
        mod, note = optional_import(module_name)
        if mod is not None and hasattr(mod, "Interpreter"):
            version = getattr(optional_import(dist)[0], "__version__", "unknown")
            return mod, dist, str(version)
        notes.append(note)
    return None, "", "; ".join(notes)


class LiteRTSession(Session):
    def __init__(self, interp: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._interp = interp
        self._lock = threading.Lock()
        details = interp.get_input_details()
        by_name = {d["name"]: d for d in details}
        # TFLite renames inputs (serving_default_x:0); fall back to the declared order.
        self._in_index = [
            by_name[s.name]["index"] if s.name in by_name else details[i]["index"]
            for i, s in enumerate(inputs)
        ]
        out_details = interp.get_output_details()
        out_by_name = {d["name"]: d for d in out_details}
        self._out_index = [
            out_by_name[s.name]["index"] if s.name in out_by_name else out_details[i]["index"]
            for i, s in enumerate(outputs)
        ]
        self._shapes = {d["index"]: tuple(d["shape"]) for d in details}

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:  # a TFLite interpreter is not re-entrant
            resized = False
            for spec, idx in zip(self.inputs, self._in_index):
                shape = tuple(feeds[spec.name].shape)
                if self._shapes.get(idx) != shape:
                    self._interp.resize_tensor_input(idx, shape, strict=False)
                    self._shapes[idx] = shape
                    resized = True
            if resized:
                self._interp.allocate_tensors()
            for spec, idx in zip(self.inputs, self._in_index):
                self._interp.set_tensor(idx, np.ascontiguousarray(feeds[spec.name]))
            self._interp.invoke()
            return [np.array(self._interp.get_tensor(idx)) for idx in self._out_index]


@register
class LiteRTBackend(RuntimeBackend):
    KEY: ClassVar[str] = "litert"
    FORMAT: ClassVar[str] = "tflite"

    @classmethod
    def info(cls) -> BackendInfo:
        mod, dist, version = _interpreter_module()
        if mod is None:
            return BackendInfo(cls.KEY, cls.FORMAT, False, None, version)
        return BackendInfo(cls.KEY, cls.FORMAT, True, version, f"interpreter from {dist}")

    @classmethod
    def load(
        cls, model: bytes, inputs: list[TensorSpec], outputs: list[TensorSpec],
        options: RuntimeOptions,
    ) -> Session:
        mod, _dist, note = _interpreter_module()
        if mod is None:
            raise RuntimeBackendError(f"no LiteRT interpreter is available: {note}",
                                      hint="pip install ai-edge-litert")
        try:
            interp = mod.Interpreter(model_content=bytes(model),
                                     num_threads=options.threads or None)
            interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeBackendError(f"LiteRT cannot load the model: {exc}") from exc
        return LiteRTSession(interp, inputs, outputs)

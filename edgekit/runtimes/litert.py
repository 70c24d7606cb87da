"""LiteRT backend: ``ai_edge_litert``, else ``tflite_runtime``, else ``tensorflow.lite``."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np

from edgekit.errors import RuntimeBackendError
from edgekit.manifest import TensorSpec
from edgekit.runtimes._base import (
    BackendInfo,
    RuntimeBackend,
    RuntimeOptions,
    Session,
    optional_import,
    register,
)

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


def _tensor_indices(interp: Any, names: list[str], details: list[dict[str, Any]],
                    side: str) -> list[int]:
    """Interpreter tensor indices for the manifest's names, on one side (inputs/outputs).

    TFLite renames tensors after the serving signature (``serving_default_x:0``), so names
    are matched to tensor names, else to the keys of the model's only signature, else the
    manifest's order is taken as the model's own (the converter lists them that way).
    """
    by_name = {d["name"]: d["index"] for d in details}
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    signatures = interp.get_signature_list()
    if len(signatures) == 1:
        runner = interp.get_signature_runner(next(iter(signatures)))
        sig = runner.get_input_details() if side == "inputs" else runner.get_output_details()
        if all(n in sig for n in names):
            return [int(sig[n]["index"]) for n in names]
    if len(names) != len(details):
        raise RuntimeBackendError(
            f"the manifest names {len(names)} {side} but the model has {len(details)}")
    return [d["index"] for d in details]


class LiteRTSession(Session):
    def __init__(self, interp: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._interp = interp
        self._lock = threading.Lock()
        details = interp.get_input_details()
        self._in_index = _tensor_indices(interp, [s.name for s in inputs], details, "inputs")
        self._out_index = _tensor_indices(interp, [s.name for s in outputs],
                                          interp.get_output_details(), "outputs")
        self._shapes = {d["index"]: tuple(d["shape"]) for d in details}
        # A model exported with a fixed batch (litert-torch exports batch 1) cannot be
        # resized; larger batches run in slices of the fixed size.
        fixed = [int(d["shape_signature"][0]) for d in details
                 if len(d["shape_signature"]) and d["shape_signature"][0] != -1]
        self._fixed_batch = fixed[0] if fixed and len(fixed) == len(details) else None

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:  # a TFLite interpreter is not re-entrant
            step = self._fixed_batch
            batch = next(iter(feeds.values())).shape[0] if feeds else 0
            if step is None or batch == step:
                return self._invoke(feeds)
            parts = []
            for start in range(0, batch, step):
                chunk = {k: v[start : start + step] for k, v in feeds.items()}
                size = len(next(iter(chunk.values())))
                if size < step:
                    # Samples are independent at inference: pad the last slice with copies
                    # of its last sample and keep only the real rows.
                    chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - size, axis=0)])
                             for k, v in chunk.items()}
                parts.append([out[:size] for out in self._invoke(chunk)])
            return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]

    def _invoke(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        resized = False
        for spec, idx in zip(self.inputs, self._in_index, strict=True):
            shape = tuple(feeds[spec.name].shape)
            if self._shapes.get(idx) != shape:
                self._interp.resize_tensor_input(idx, shape, strict=False)
                self._shapes[idx] = shape
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for spec, idx in zip(self.inputs, self._in_index, strict=True):
            self._interp.set_tensor(idx, np.ascontiguousarray(feeds[spec.name]))
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(idx)) for idx in self._out_index]


@register
class LiteRTBackend(RuntimeBackend):
    KEY: ClassVar[str] = "litert"
    FORMAT: ClassVar[str] = "tflite"
    MODULES: ClassVar[tuple[str, ...]] = tuple(m for m, _ in _CANDIDATES)
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("ai-edge-litert", "tflite-runtime",
                                                "tensorflow", "tensorflow-cpu")

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

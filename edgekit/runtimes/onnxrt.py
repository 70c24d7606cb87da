"""onnxruntime backend: execution providers and thread count from the options."""

from __future__ import annotations

from collections.abc import Callable
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


class OnnxSession(Session):
    def __init__(self, sess: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._sess = sess
        self._call = _direct_run(sess)
        # A graph with a fixed batch (a torch.export program traced at batch 1) runs larger
        # batches in slices of that size, as the LiteRT session does.
        graph_inputs = sess.get_inputs()
        fixed = [int(i.shape[0]) for i in graph_inputs if i.shape and isinstance(i.shape[0], int)]
        self._fixed_batch = fixed[0] if fixed and len(fixed) == len(graph_inputs) else None

    @property
    def providers(self) -> list[str]:
        return list(self._sess.get_providers())

    def checked_runner(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """:meth:`run_checked` in one Python call over onnxruntime's (a graph without a
        fixed batch and without quantization, the common case): the output names' list is
        built once and a single output skips the zip."""
        if not self._plain or self._fixed_batch is not None:
            return self.run_checked
        call, names = self._call, list(self._output_names)
        only = names[0] if len(names) == 1 else None

        def run_checked(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                raw = call(names, feeds, None)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise RuntimeBackendError(f"inference failed: {exc}") from exc
            if only is not None:
                return {only: raw[0]}
            return dict(zip(names, raw, strict=True))

        return run_checked

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        step = self._fixed_batch
        if step is None:
            return self._call(self._output_names, feeds, None)  # type: ignore[no-any-return]
        batch = next(iter(feeds.values())).shape[0] if feeds else 0
        if batch == step or not step:
            return self._call(self._output_names, feeds, None)  # type: ignore[no-any-return]
        if batch % step:
            raise RuntimeBackendError(f"the model takes batches of {step}; got a batch of {batch}")
        parts = [self._call(self._output_names, {k: v[i : i + step] for k, v in feeds.items()},
                            None) for i in range(0, batch, step)]
        return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


def _direct_run(sess: Any) -> Any:
    """``run(output_names, feeds, run_options)`` of the session.

    On the CPU provider this is the compiled session's own ``run``: the public
    ``InferenceSession.run`` re-validates the input names and checks for graph capture in
    Python on every call (1-2 us, a fifth of a small model's run), which a
    :class:`~edgekit.runtimes.Session` has checked already. With other providers the public
    one is kept, for its fallback to the CPU when a provider fails.
    """
    compiled = getattr(sess, "_sess", None)
    if compiled is None or sess.get_providers() != ["CPUExecutionProvider"]:
        return sess.run
    return compiled.run


@register
class OnnxRuntimeBackend(RuntimeBackend):
    KEY: ClassVar[str] = "onnxruntime"
    FORMAT: ClassVar[str] = "onnx"
    MODULES: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnxruntime-gpu")

    @classmethod
    def info(cls) -> BackendInfo:
        ort, note = optional_import("onnxruntime")
        if ort is None:
            return BackendInfo(cls.KEY, cls.FORMAT, False, None, note)
        providers = list(ort.get_available_providers())
        return BackendInfo(cls.KEY, cls.FORMAT, True, ort.__version__,
                           f"providers: {', '.join(providers)}", providers)

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

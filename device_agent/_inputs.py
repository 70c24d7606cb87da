"""Inputs of a request: decoded from JSON, .npy or .npz, then checked against the manifest.

The check runs on every request, so it is written for the common case: an array that
already has the right dtype and shape costs a few attribute reads and no copy.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from edgekit.errors import InputError, ProtocolError
from edgekit.manifest import TensorSpec
from edgekit.protocol import EncodedArray, PredictRequest, decode_array

__all__ = ["InputValidator", "inputs_from_npy", "inputs_from_npz", "inputs_from_request"]

SINGLE_INPUT_ALIAS = "x"
R = TypeVar("R")


class InputValidator:
    """Checks request arrays against a model's input specs and casts them to its dtypes.

    Names must match (``x`` stands for the only input of a single-input model), every fixed
    dimension must match (the batch one too), a symbolic dimension (``batch``) must have the
    same size wherever it appears, rows may not exceed ``max_batch``, and float values must be
    finite. An int8/uint8 input with quantization parameters takes real values (the runtime
    quantizes them) or already-quantized integers.
    """

    def __init__(self, specs: list[TensorSpec], max_batch: int, where: str = "model") -> None:
        self.specs = specs
        self.max_batch = max_batch
        self.where = where
        self._names = [s.name for s in specs]
        self._plans = [(s.name, np.dtype(s.dtype), _real_range(s), tuple(s.shape))
                       for s in specs]
        # The common case gets a fast path: every input is [<one symbol>, fixed dims...],
        # unquantized, and arrives as an ndarray of the right dtype and shape.
        symbols = {s.shape[0] for s in specs if s.shape}
        simple = all(
            s.shape and isinstance(s.shape[0], str) and s.quantization is None
            and all(isinstance(d, int) and d > 0 for d in s.shape[1:]) for s in specs)
        self._fast = [(s.name, np.dtype(s.dtype), len(s.shape), tuple(s.shape[1:]),
                       np.dtype(s.dtype).kind == "f") for s in specs] \
            if simple and len(symbols) == 1 else None

    def answerer(self, run: Callable[[dict[str, np.ndarray]], R]
                 ) -> Callable[[Mapping[str, Any]], tuple[dict[str, np.ndarray], R]]:
        """A function that checks the feeds (as :meth:`check`) and gives the checked feeds
        to ``run``, returning both the checked feeds and ``run``'s result: the request
        path's one call per request. For a model with one plain input (the common case)
        the check is specialised to it: the dtype, a lookup of the shape among those that
        passed the full check before, and the finite check. Both accept and refuse the
        same feeds.

        The function raises: InputError: as :meth:`check`; and whatever ``run`` raises.
        """
        full = self.check
        if self._fast is None or len(self._fast) != 1:
            def check_run(feeds: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], R]:
                checked = full(feeds)
                return checked, run(checked)

            return check_run
        name, dtype, _ndim, _tail, is_float = self._fast[0]
        # The shapes that passed the full check (a shape passes or not whatever the values):
        # one dict lookup stands for the rank, fixed-dimension and batch-size checks. Each
        # maps to the zeros the finite check dots with (a view of one buffer), or None for
        # an array too large for the dot (or not float: no finite check). At most
        # ``max_batch`` shapes, one per batch size.
        passed: dict[tuple[int, ...], np.ndarray | None] = {}
        zeros = np.zeros(_DOT_MAX, dtype) if is_float else None

        def learn(checked: dict[str, np.ndarray]) -> None:
            arr = checked[name]
            size = arr.size
            passed[arr.shape] = zeros[:size] if zeros is not None and size <= _DOT_MAX else None

        def check_one_run(feeds: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], R]:
            if type(feeds) is dict and len(feeds) == 1:
                arr = feeds.get(name)
                if arr.__class__ is np.ndarray and arr.dtype == dtype:
                    z = passed.get(arr.shape, _UNSEEN)
                    if z is not _UNSEEN and (_finite_scalar(_vdot(arr, z)) if z is not None
                                             else not is_float or all_finite(arr)):
                        return feeds, run(feeds)  # type: ignore[arg-type]
            checked = full(feeds)
            learn(checked)
            return checked, run(checked)

        return check_one_run

    def check(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Return the feeds in the model's dtypes.

        Raises:
            InputError: lists every problem found (missing or unknown names, dtypes, shapes,
                batch size, non-finite values).
        """
        if self._fast is not None and type(feeds) is dict and len(feeds) == len(self._fast):
            rows = -1
            for name, dtype, ndim, tail, is_float in self._fast:
                arr = feeds.get(name)
                if (arr.__class__ is not np.ndarray or arr.ndim != ndim or arr.dtype != dtype
                        or arr.shape[1:] != tail or (rows >= 0 and arr.shape[0] != rows)):
                    break
                rows = arr.shape[0]
                if is_float and not all_finite(arr):
                    break
            else:
                if 0 < rows <= self.max_batch:
                    return feeds
        if type(feeds) is not dict and not isinstance(feeds, Mapping):
            raise InputError(f"inputs must map input names to arrays, found {type(feeds).__name__}",
                             hint=f"send {{{', '.join(repr(n) for n in self._names)}: ...}}")
        if (len(self._plans) == 1 and SINGLE_INPUT_ALIAS in feeds
                and self._names[0] not in feeds and len(feeds) == 1):
            feeds = {self._names[0]: feeds[SINGLE_INPUT_ALIAS]}
        problems: list[str] = []
        out: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for name, dtype, real_range, shape in self._plans:
            if name not in feeds:
                problems.append(f"input '{name}' is missing (shape {_fmt(shape)}, {dtype.name})")
                continue
            arr = _as_array(feeds[name], name, problems)
            if arr is None:
                continue
            arr = _cast(arr, name, dtype, real_range, problems)
            if arr is None:
                continue
            if not self._shape_ok(arr, name, shape, symbols, problems):
                continue
            out[name] = arr
        extra = [k for k in feeds if k not in self._names]
        if extra:
            problems.append(f"unknown input(s) {', '.join(map(repr, sorted(map(str, extra))))}"
                            f" (the model's inputs: {', '.join(self._names)})")
        if problems:
            raise InputError(f"inputs do not fit {self.where}: " + "; ".join(problems))
        return out

    def _shape_ok(self, arr: np.ndarray, name: str, shape: tuple[int | str, ...],
                  symbols: dict[str, tuple[int, str]], problems: list[str]) -> bool:
        if arr.ndim != len(shape):
            problems.append(f"input '{name}' has shape {_fmt(arr.shape)}, expected {_fmt(shape)}")
            return False
        ok = True
        for axis, (want, got) in enumerate(zip(shape, arr.shape, strict=True)):
            if isinstance(want, str):
                seen = symbols.setdefault(want, (got, name))
                if seen[0] != got:
                    problems.append(f"input '{name}' has {want}={got} but input '{seen[1]}' has"
                                    f" {want}={seen[0]}")
                    ok = False
            elif want > 0 and want != got:
                problems.append(f"input '{name}' has shape {_fmt(arr.shape)}, expected"
                                f" {_fmt(shape)} (axis {axis} must be {want})")
                ok = False
        if ok and arr.ndim:
            if arr.shape[0] == 0:
                problems.append(f"input '{name}' holds no rows")
                ok = False
            elif arr.shape[0] > self.max_batch:
                problems.append(f"input '{name}' holds {arr.shape[0]} rows, more than the limit"
                                f" of {self.max_batch} per request")
                ok = False
        if ok and arr.dtype.kind == "f" and not all_finite(arr):
            problems.append(f"input '{name}' holds NaN or infinite values")
            ok = False
        return ok


_isfinite = np.isfinite
_all = np.logical_and.reduce
# np.vdot's C function without the ``__array_function__`` dispatch before it (a fifth of
# the call on a small array); the arrays here are always plain ndarrays.
_vdot = getattr(np.vdot, "_implementation", np.vdot)
_finite_scalar = math.isfinite
_UNSEEN = np.empty(0)  # a shape not in ``passed`` (None there means: no dot product)
# Arrays up to this many elements are checked with one dot product against zeros.
_DOT_MAX = 2048
# Zeros per dtype and size: a model's shape checks pass at most ``max_batch`` sizes.
_zeros: dict[np.dtype[Any], dict[int, np.ndarray]] = {}


def _zeros_of(dtype: np.dtype[Any]) -> dict[int, np.ndarray]:
    return _zeros.setdefault(dtype, {})


def all_finite(arr: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity.

    A small array (a request to a small model, where this check is a tenth of the model's
    run) takes one call: its dot product with zeros is 0, or NaN once a value is NaN or
    infinite, and cannot overflow (a sum or a dot with itself can). ``np.vdot`` raises no
    floating-point warning for 0 * inf, unlike ``ndarray.dot``. A larger array takes the
    ufuncs, called directly (``ndarray.all`` goes through a Python wrapper).
    """
    size = arr.size
    if size <= _DOT_MAX:
        by_size = _zeros_of(arr.dtype)
        zeros = by_size.get(size)
        if zeros is None:
            zeros = by_size.setdefault(size, np.zeros(size, arr.dtype))
        return _finite_scalar(_vdot(arr, zeros))
    return bool(_all(_isfinite(arr), axis=None))


def _as_array(value: Any, name: str, problems: list[str]) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        problems.append(f"input '{name}' is not a rectangular array ({exc})")
        return None
    if arr.dtype.kind not in "biuf":
        problems.append(f"input '{name}' holds {arr.dtype} values, expected numbers")
        return None
    return arr


def _real_range(spec: TensorSpec) -> tuple[float, float] | None:
    """The real values a quantized input can represent (one step of slack each side)."""
    q = spec.quantization
    if q is None:
        return None
    info = np.iinfo(np.dtype(spec.dtype))
    low, high = q.scale * (info.min - q.zero_point), q.scale * (info.max - q.zero_point)
    return min(low, high) - abs(q.scale), max(low, high) + abs(q.scale)


def _cast(arr: np.ndarray, name: str, dtype: np.dtype[Any],
          real_range: tuple[float, float] | None, problems: list[str]) -> np.ndarray | None:
    have = arr.dtype
    if have == dtype:
        return arr
    kind = have.kind
    if kind not in "biuf":
        problems.append(f"input '{name}' has dtype {have}, expected {dtype.name}")
        return None
    if real_range is not None and kind in "iuf":
        # Real values; the runtime session quantizes them with the manifest's scale. Values
        # the quantization cannot represent would be clipped silently, so they are refused.
        real = arr.astype(np.float32)
        if real.size and (real.min() < real_range[0] or real.max() > real_range[1]):
            problems.append(f"input '{name}' holds values outside {real_range[0]:.4g} ..."
                            f" {real_range[1]:.4g}, the range its {dtype.name} quantization"
                            " represents")
            return None
        return real
    if dtype.kind == "f" and kind in "iuf":
        return arr.astype(dtype)
    if dtype.kind in "iu" and kind in "iuf":
        if kind == "f" and not np.all(np.mod(arr, 1) == 0):
            problems.append(f"input '{name}' holds fractions, expected whole numbers ({dtype.name})")
            return None
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            problems.append(f"input '{name}' holds values outside the range of {dtype.name}")
            return None
        return arr.astype(dtype)
    if dtype.kind == "b" and kind in "iu" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    problems.append(f"input '{name}' has dtype {have}, expected {dtype.name}")
    return None


def _fmt(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inputs_from_request(request: PredictRequest) -> dict[str, Any]:
    """The inputs of a decoded predict request: nested lists as they are, encoded arrays
    as arrays.

    Raises:
        ProtocolError: an encoded array does not match its dtype and shape.
    """
    feeds = request.inputs
    if not any(value.__class__ is EncodedArray for value in feeds.values()):
        return feeds
    return {name: decode_array(value, f"inputs.{name}") if isinstance(value, EncodedArray)
            else value for name, value in feeds.items()}


def inputs_from_npy(body: bytes, specs: list[TensorSpec]) -> dict[str, Any]:
    """A ``.npy`` body: the array of a single-input model.

    Raises:
        ProtocolError: not a .npy file, or the model has more than one input.
    """
    if len(specs) != 1:
        raise ProtocolError(
            f"a .npy body carries one array but the model has {len(specs)} inputs",
            hint="send an .npz with one array per input name",
        )
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ProtocolError(f"the body is not a readable .npy file ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise ProtocolError("the body is not a .npy array")
    return {specs[0].name: arr}


def inputs_from_npz(body: bytes, max_bytes: int) -> dict[str, Any]:
    """An ``.npz`` body: one array per input name (``x`` for a single input).

    Raises:
        ProtocolError: not an .npz file, or its arrays decompress past ``max_bytes``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            total = sum(info.file_size for info in zf.infolist())
        if total > max_bytes:
            raise ProtocolError(f"the .npz body unpacks to {total} bytes, over the limit of"
                                f" {max_bytes}")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ProtocolError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ProtocolError(f"the body is not a readable .npz file ({exc})") from exc

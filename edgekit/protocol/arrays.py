"""Arrays on the wire: nested JSON lists, or an :class:`EncodedArray` (base64 of the raw
little-endian bytes, C order)."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from edgekit.errors import ProtocolError

__all__ = ["MAX_ARRAY_BYTES", "EncodedArray", "decode_array", "encode_array"]

MAX_ARRAY_BYTES = 64 * 1024 * 1024
ArrayDtype = Literal["float16", "float32", "float64", "int8", "uint8", "int16", "int32",
                     "int64", "bool"]
_DTYPES = frozenset(ArrayDtype.__args__)  # type: ignore[attr-defined]
_MAX_B64 = (MAX_ARRAY_BYTES * 4) // 3 + 4


class EncodedArray(msgspec.Struct, kw_only=True):
    """An array as its dtype, shape and base64 data (no ``schema``: it is part of a document)."""

    dtype: ArrayDtype
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=32)]
    data: Annotated[str, msgspec.Meta(max_length=_MAX_B64)]


def encode_array(arr: np.ndarray) -> EncodedArray:
    """An array as dtype, shape and base64 of its little-endian bytes.

    Raises:
        ProtocolError: the dtype is not one the protocol carries.
    """
    a = np.asarray(arr)
    if a.dtype.name not in _DTYPES:
        raise ProtocolError(f"arrays of dtype {a.dtype} cannot be sent")
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return EncodedArray(dtype=a.dtype.name, shape=list(a.shape),  # type: ignore[arg-type]
                        data=base64.b64encode(a.tobytes()).decode("ascii"))


def decode_array(doc: EncodedArray | Mapping[str, Any] | Any, what: str = "array") -> np.ndarray:
    """Inverse of :func:`encode_array`; ``doc`` may also be the plain JSON object.

    Raises:
        ProtocolError: a field is missing or of the wrong type, the dtype is not allowed,
            the data is not base64, or its length does not match the shape.
    """
    if not isinstance(doc, EncodedArray):
        if not isinstance(doc, Mapping):
            raise ProtocolError(f"{what}: expected an object with dtype, shape and data")
        try:
            doc = msgspec.convert(doc, EncodedArray)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"{what}: {exc}") from None
    np_dtype = np.dtype(doc.dtype).newbyteorder("<")
    expected = math.prod(doc.shape) * np_dtype.itemsize  # exact: no int64 wrap-around
    if expected > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{what}: larger than the limit of {MAX_ARRAY_BYTES} bytes")
    try:
        raw = base64.b64decode(doc.data, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ProtocolError(f"{what}: data is not valid base64") from exc
    if len(raw) != expected:
        raise ProtocolError(f"{what}: {len(raw)} bytes of data, shape {doc.shape} of"
                            f" {doc.dtype} needs {expected}")
    return np.frombuffer(raw, dtype=np_dtype).reshape(doc.shape).astype(
        np_dtype.newbyteorder("="))

"""Where a model file keeps its tensors: byte ranges of ONNX initializers and TFLite buffers.

Read straight from the protobuf and flatbuffer wire formats (no onnx or tflite package), so
the ranges are exact offsets in the file the package holds. A file these readers do not
understand gives no ranges: the delta builder then sends it as literal bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = ["onnx_ranges", "tensor_ranges", "tflite_ranges"]

# ONNX protobuf field numbers (onnx.proto3): what leads to tensors, and a tensor's data fields.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_DATA = {4, 5, 7, 9, 10, 11}  # float, int32, int64, raw, double, uint64 data
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_MAX_DEPTH = 32


def tensor_ranges(member: str, data: bytes) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of the tensors in a model file, by its member name's
    extension (``.onnx``, ``.tflite``); empty for anything else or a file that does not
    parse."""
    try:
        if member.endswith(".onnx"):
            return onnx_ranges(data)
        if member.endswith(".tflite"):
            return tflite_ranges(data)
    except (IndexError, ValueError, struct.error):
        return []
    return []


def onnx_ranges(data: bytes) -> list[tuple[int, int]]:
    """Data ranges of every tensor in an ONNX ModelProto (initializers, Constant nodes'
    tensors, subgraphs').

    Raises:
        ValueError: the bytes are not a protobuf message.
    """
    out: list[tuple[int, int]] = []
    for field, start, end in _fields(data, 0, len(data)):
        if field == _MODEL_GRAPH:
            _graph(data, start, end, out, 0)
    return out


def _graph(data: bytes, start: int, end: int, out: list[tuple[int, int]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    for field, s, e in _fields(data, start, end):
        if field == _GRAPH_INITIALIZER:
            _tensor(data, s, e, out)
        elif field == _GRAPH_SPARSE:
            for f, s2, e2 in _fields(data, s, e):
                if f in (_SPARSE_VALUES, _SPARSE_INDICES):
                    _tensor(data, s2, e2, out)
        elif field == _GRAPH_NODE:
            for f, s2, e2 in _fields(data, s, e):
                if f == _NODE_ATTRIBUTE:
                    _attribute(data, s2, e2, out, depth)


def _attribute(data: bytes, start: int, end: int, out: list[tuple[int, int]],
               depth: int) -> None:
    for field, s, e in _fields(data, start, end):
        if field in (_ATTR_TENSOR, _ATTR_TENSORS):
            _tensor(data, s, e, out)
        elif field in (_ATTR_GRAPH, _ATTR_GRAPHS):
            _graph(data, s, e, out, depth + 1)


def _tensor(data: bytes, start: int, end: int, out: list[tuple[int, int]]) -> None:
    out.extend((s, e) for field, s, e in _fields(data, start, end) if field in _TENSOR_DATA)


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of one message."""
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("a field runs past its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not in ONNX")
    if pos != end:
        raise ValueError("a field runs past its message")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# TFLite schema: Model.buffers is field 4; Buffer.data field 0, Buffer.offset/size 1 and 2
# (models over 2 GB keep buffers after the flatbuffer).
_MODEL_BUFFERS = 4
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


def tflite_ranges(data: bytes) -> list[tuple[int, int]]:
    """Data ranges of every buffer of a TFLite flatbuffer.

    Raises:
        ValueError: not a TFLite file; struct.error, IndexError: a truncated one.
    """
    if data[4:8] != b"TFL3":
        raise ValueError("no TFL3 file identifier")
    model = _u32(data, 0)
    buffers = _field(data, model, _MODEL_BUFFERS)
    if buffers is None:
        return []
    vector = buffers + _u32(data, buffers)
    out: list[tuple[int, int]] = []
    for i in range(_u32(data, vector)):
        element = vector + 4 + 4 * i
        table = element + _u32(data, element)
        field = _field(data, table, _BUFFER_DATA)
        if field is not None:
            start = field + _u32(data, field)
            length = _u32(data, start)
            if start + 4 + length <= len(data) and length:
                out.append((start + 4, start + 4 + length))
            continue
        offset_at, size_at = _field(data, table, _BUFFER_OFFSET), _field(data, table, _BUFFER_SIZE)
        if offset_at is not None and size_at is not None:
            offset, size = _u64(data, offset_at), _u64(data, size_at)
            if offset > 1 and size and offset + size <= len(data):
                out.append((offset, offset + size))
    return out


def _field(data: bytes, table: int, index: int) -> int | None:
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vtable_size = struct.unpack_from("<H", data, vtable)[0]
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return None
    offset = struct.unpack_from("<H", data, vtable + slot)[0]
    return table + offset if offset else None


def _u32(data: bytes, pos: int) -> int:
    value: int = struct.unpack_from("<I", data, pos)[0]
    return value


def _u64(data: bytes, pos: int) -> int:
    value: int = struct.unpack_from("<Q", data, pos)[0]
    return value

"""One way to put a document on the wire and to take it off: msgspec Structs, size-capped.

Every wire document is a :class:`Document` subclass that names its schema in the class
header::

    class StatusDocument(Document, tag="edgekit.status/1"):
        max_bytes: ClassVar[int] = 64 * 1024
        device: str
        state: DeviceState

The ``schema`` field is msgspec's tag field, so the schema travels in every payload and a
payload of another schema (or another major version) fails to decode. Fields added within a
major version must have defaults; unknown fields are ignored, so an older reader accepts a
newer minor revision. Decoding is strict: a wrong type is an error, never coerced.

:func:`decode` checks the size *before* parsing and raises :class:`~edgekit.errors.ProtocolError`
for anything wrong (too large, not JSON, wrong schema, a field missing or out of range), the
one error type the protocol raises. Given ``where`` (the document's name, e.g. ``desired``),
the message starts with the dotted path of the field that is wrong
(``desired.model.size: Expected `int` >= 1``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import msgspec

from edgekit.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Document",
    "decode",
    "encode",
    "field_error",
    "prepare",
    "schema_of",
]

DEFAULT_MAX_BYTES = 64 * 1024

D = TypeVar("D", bound="Document")

_encoder = msgspec.json.Encoder()
_decoders: dict[tuple[tuple[type, ...], bool], msgspec.json.Decoder[Any]] = {}
_AT_RE = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)
_MISSING_RE = re.compile(r"^Object missing required field `(.*)`$")
_KIND_RE = re.compile(r"^Expected `([a-z |]+)`, got `([a-z]+)`$")
_KINDS = {"object": "an object", "array": "an array", "str": "a string", "int": "an integer",
          "float": "a number", "bool": "true or false", "null": "null"}


class Document(msgspec.Struct, kw_only=True, tag_field="schema", omit_defaults=True):
    """Base of every wire document; subclasses set ``tag="edgekit.<name>/<major>"``.

    ``max_bytes`` is the largest encoded payload a reader accepts for the document type;
    subclasses override it with a ``ClassVar``.
    """

    max_bytes: ClassVar[int] = DEFAULT_MAX_BYTES


def schema_of(cls: type[Document]) -> str:
    """The ``schema`` string a document class carries on the wire."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return str(info.tag)


def encode(doc: Document | Mapping[str, Any]) -> bytes:
    """The JSON bytes of ``doc`` (compact, with its ``schema`` field); NaN and infinities
    become ``null`` (JSON has no such numbers)."""
    return _encoder.encode(doc)


class _Absent(Document, tag="edgekit.absent/0"):
    """Never sent. Decoding through ``cls | _Absent`` makes msgspec require the tag field,
    which it treats as optional when a tagged Struct is decoded on its own."""


def prepare(cls: type[Document], *, require_schema: bool = True,
            variants: tuple[type[Document], ...] = ()) -> None:
    """Build now the decoder :func:`decode` uses with these arguments. msgspec reads the
    classes' annotations when a decoder is made (a few milliseconds for a large document):
    a reader that must answer its first message quickly makes its decoders when it starts."""
    _decoder((cls, *variants), require_schema)


def _decoder(classes: tuple[type, ...], require_schema: bool) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get((classes, require_schema))
    if decoder is None:
        target = _union(classes + (_Absent,) if require_schema else classes)
        decoder = _decoders[(classes, require_schema)] = msgspec.json.Decoder(target)
    return decoder


def _union(classes: tuple[type, ...]) -> Any:
    """``classes[0] | classes[1] | ...``: the type msgspec decodes a tagged union as."""
    target: Any = classes[0]
    for member in classes[1:]:
        target = target | member
    return target


def field_error(message: str, where: str) -> str:
    """A msgspec validation message with the dotted path of the field up front:
    ``Expected `int` >= 1 - at `$.model.size``` becomes ``desired.model.size: Expected
    `int` >= 1``, a missing field reads ``desired.model.size: missing`` and a wrong type
    ``desired.model.size: expected an integer or null, found a string``."""
    path = where
    match = _AT_RE.match(message)
    if match is not None:
        message, path = match.group(1), where + match.group(2)
    missing = _MISSING_RE.match(message)
    if missing is not None:
        return f"{path}.{missing.group(1)}: missing"
    kind = _KIND_RE.match(message)
    if kind is not None:
        wanted = " or ".join(_KINDS.get(k, k) for k in kind.group(1).split(" | "))
        return f"{path}: expected {wanted}, found {_KINDS.get(kind.group(2), kind.group(2))}"
    return f"{path}: {message}"


def decode(payload: bytes | bytearray | memoryview | str, cls: type[D], *,
           max_bytes: int | None = None, require_schema: bool = True,
           where: str | None = None, variants: tuple[type[D], ...] = ()) -> D:
    """Parse ``payload`` as a ``cls`` document after checking its size.

    ``max_bytes`` overrides the class's cap (for a reader configured tighter or looser).
    ``require_schema=False`` accepts a payload without a ``schema`` field (one with another
    schema is still refused): for the HTTP API, where the URL says what the body is.
    ``where`` names the document in error messages, which then start with the dotted path of
    the field (:func:`field_error`). ``variants`` are subclasses of ``cls`` with schemas of
    their own that are accepted as well (their schema picks the class).

    Raises:
        ProtocolError: the payload is larger than the cap, not JSON, of another schema, or a
            field is missing, of the wrong type or out of its declared range.
    """
    limit = cls.max_bytes if max_bytes is None else max_bytes
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > limit:
        raise ProtocolError(
            f"{schema_of(cls)} payload of {size} bytes is over the {limit}-byte limit",
            hint="the sender must split or shrink it; nothing of it was parsed",
        )
    try:
        doc = _decoder((cls, *variants), require_schema).decode(payload)
    except msgspec.ValidationError as exc:
        if where is not None:
            raise ProtocolError(field_error(str(exc), where),
                                hint=f"the payload does not fit {schema_of(cls)}") from None
        raise ProtocolError(f"payload does not fit {schema_of(cls)}: {exc}",
                            hint="see docs/protocol.md") from None
    except msgspec.DecodeError as exc:
        if where is not None:
            _name_non_json_field(payload, (cls, *variants), where)
        raise ProtocolError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(doc, cls):
        raise ProtocolError(f"payload does not fit {schema_of(cls)}: schema is {schema_of(type(doc))}")
    return doc


def _name_non_json_field(payload: bytes | bytearray | memoryview | str,
                         classes: tuple[type, ...], where: str) -> None:
    """For a payload that is not JSON only because a number is NaN or infinite (which
    Python's json module writes): raise the error that names the field. Returns when that
    is not the case, for the caller's "not valid JSON".

    Raises:
        ProtocolError: the payload parses with Python's json module and a field is wrong.
    """
    try:
        loose = json.loads(bytes(payload) if isinstance(payload, memoryview) else payload)
        msgspec.convert(loose, _union(classes), strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(field_error(str(exc), where)) from None
    except (ValueError, UnicodeDecodeError, TypeError):
        return

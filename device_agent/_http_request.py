"""An HTTP/1.1 request head read without the email package.

``BaseHTTPRequestHandler.parse_request`` reads the header fields through ``email.parser``
and every later ``headers.get`` walks them again with case folding: together about a third
of the server's work on a small /predict request. :class:`FastHeadHandler` parses the request
line as the stdlib does (same checks, same error replies) and the fields into a dict of
lower-case names, the first of a repeated field winning as with ``Message.get``. Two
differences, both RFC 9112's rules: a folded (obsolete continuation) line joins the field
before it with one space, and a line that is no field is skipped (the email parser ends the
head there and drops the fields after it).
"""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

__all__ = ["FastHeadHandler"]

_MAX_LINE = 65536  # as http.client: longer header lines are refused (431)
_MAX_FIELDS = 100  # as http.client: more header fields are refused (431)


class FastHeadHandler(BaseHTTPRequestHandler):
    """A request handler whose header fields are :attr:`fields`: lower-case name -> value.
    ``headers`` (the email Message) is not set."""

    fields: dict[str, str]
    raw_requestline: bytes  # set by handle_one_request before parse_request

    def parse_request(self) -> bool:
        """The request line, then the header fields, then ``Connection`` and ``Expect``, as
        the stdlib's ``parse_request``; False (a reply sent where one is due) on a bad
        request."""
        if not self._parse_request_line():
            return False
        fields = self._read_fields()
        if fields is None:
            return False
        self.fields = fields
        conntype = fields.get("connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        if (fields.get("expect", "").lower() == "100-continue"
                and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def _parse_request_line(self) -> bool:
        self.command = None  # type: ignore[assignment]  # as the stdlib: unset on an error
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            number = _version_number(version)
            if number is None:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                f"Invalid HTTP version ({version.split('/', 1)[1]})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        if path.startswith("//"):
            path = "/" + path.lstrip("/")  # gh-87389: no scheme-relative path
        self.command, self.path = command, path
        return True

    def _read_fields(self) -> dict[str, str] | None:
        fields: dict[str, str] = {}
        last = ""
        readline = self.rfile.readline
        for _ in range(_MAX_FIELDS + 1):
            line = readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long",
                                "header line")
                return None
            if line in (b"\r\n", b"\n", b""):
                return fields
            text = line.decode("iso-8859-1")
            if text[0] in " \t":
                if last:  # an obsolete folded line continues the field before it
                    fields[last] = f"{fields[last]} {text.strip()}".strip()
                continue
            name, sep, value = text.partition(":")
            if not sep or not name or name.strip() != name:
                last = ""
                continue  # not a field (a name is a token, no space before the colon)
            name = name.lower()
            last = name if name not in fields else ""
            if last:
                fields[name] = value.strip()
        self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers",
                        f"got more than {_MAX_FIELDS} headers")
        return None


def _version_number(version: str) -> tuple[int, int] | None:
    """(major, minor) of ``HTTP/x.y`` (RFC 2145: each part an integer), or None."""
    if not version.startswith("HTTP/"):
        return None
    parts = version[5:].split(".")
    if len(parts) != 2 or any(not p.isdigit() or len(p) > 10 for p in parts):
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:  # a digit int() does not read (superscripts)
        return None

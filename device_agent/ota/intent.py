"""The intent gate: which desired documents this device follows, and its version floor.

A desired document is followed only when (in this order, each check before anything more of
the document is read):

1. its envelope's signature verifies against a trusted intent key (``ota.intent_keys``);
   the payload is parsed only after that. Bare, unsigned documents are refused unless the
   insecure lab setting ``ota.allow_unsigned_intents`` is on;
2. it is for this fleet, and for this device (``devices`` null or naming it);
3. it is not expired, and not issued before the newest document this device acted on (the
   *high-water mark*, persisted, so a replayed old document is refused after a restart too);
4. its model is newer than the device's *floor* (the name and version it last committed,
   persisted), with the same name; a lower or equal version needs ``allow_downgrade``, a
   model of another name ``allow_rename``, both inside the signed document.

Expiry and replay only matter for a document that would change the model: a retained
document the device already carried out, or whose model it serves, is left alone quietly.

State lives in ``<state_dir>/ota/trust.json``, written atomically. Losing it lowers the
protection to what the current model implies (the floor is set again from the model in
service at the next start).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_write
from edgekit.manifest import compare_versions
from edgekit.protocol.ota import (
    DesiredDocument,
    UpdateReason,
    format_time,
    parse_desired,
    parse_time,
)
from edgekit.protocol.signed import is_sealed, open_sealed

from .errors import UpdateFailure

__all__ = ["Floor", "IntentGate", "RefusalLimiter"]

log = logging.getLogger("device_agent.ota")

TRUST_SCHEMA = "edgekit.agent-trust/1"


@dataclass(frozen=True)
class Floor:
    """The model a device committed last: the lowest it accepts without a signed downgrade."""

    name: str
    version: str


class IntentGate:
    """Checks desired documents and keeps the high-water mark and the floor; see the module
    docstring."""

    def __init__(self, path: Path, keys: Sequence[Ed25519PublicKey], *, allow_unsigned: bool,
                 fleet: str, device: str) -> None:
        self.path = path
        self.keys = list(keys)
        self.allow_unsigned = allow_unsigned
        self.fleet = fleet
        self.device = device
        self.high_water: dt.datetime | None = None
        self.floor: Floor | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        if allow_unsigned:
            log.warning("INSECURE: ota.allow_unsigned_intents is on; anyone who can publish"
                        " to this device's desired topics chooses the model it runs")

    # ---------------------------------------------------------------- checks

    def open(self, payload: bytes) -> DesiredDocument:
        """Verify, then parse, a desired document (check 1 of the module docstring).

        Raises:
            UpdateFailure: untrusted_intent (unsigned, untrusted signer, bad signature),
                invalid_desired (a verified document that is not valid).
        """
        try:
            if is_sealed(payload):
                inner = open_sealed(payload, self.keys, what="desired document").payload
            elif self.allow_unsigned:
                log.warning("INSECURE: following an unsigned desired document"
                            " (ota.allow_unsigned_intents)")
                inner = payload
            else:
                raise UpdateFailure(UpdateReason.UNTRUSTED_INTENT,
                                    "an unsigned desired document; this device follows only"
                                    " documents signed by its intent keys",
                                    hint="deploy with `edgekit deploy --key OPERATOR_KEY`")
        except EdgekitError as exc:
            if isinstance(exc, UpdateFailure):
                raise
            raise UpdateFailure(UpdateReason.UNTRUSTED_INTENT, exc.message,
                                hint=exc.hint) from exc
        try:
            return parse_desired(inner)
        except EdgekitError as exc:
            raise UpdateFailure(UpdateReason.INVALID_DESIRED, exc.message) from exc

    def check_bound(self, doc: DesiredDocument) -> None:
        """Check 2: the document is for this fleet and this device.

        Raises:
            UpdateFailure: not_for_device.
        """
        if doc.fleet != self.fleet or (doc.devices is not None
                                       and self.device not in doc.devices):
            raise UpdateFailure(UpdateReason.NOT_FOR_DEVICE,
                                f"deployment {doc.deployment} is signed for fleet"
                                f" {doc.fleet!r}, devices {_short(doc.devices)}, not"
                                f" {self.fleet}/{self.device}")

    def check_fresh(self, doc: DesiredDocument, now: dt.datetime | None = None) -> None:
        """Check 3: not expired, not older than the high-water mark.

        Raises:
            UpdateFailure: expired, replayed.
        """
        moment = now or dt.datetime.now(dt.UTC)
        if parse_time(doc.expires, "desired.expires") <= moment:
            raise UpdateFailure(UpdateReason.EXPIRED,
                                f"deployment {doc.deployment} expired at {doc.expires}",
                                hint="deploy again: a new document gets a new expiry")
        issued = parse_time(doc.issued, "desired.issued")
        if self.high_water is not None and issued < self.high_water:
            raise UpdateFailure(UpdateReason.REPLAYED,
                                f"deployment {doc.deployment} was issued at {doc.issued},"
                                " before the newest document this device acted on"
                                f" ({format_time(self.high_water)})",
                                hint="deploy again: a new document is issued now")

    def check_floor(self, doc: DesiredDocument, name: str, version: str) -> None:
        """Check 4 for the model ``name`` ``version`` (what the document or the package
        names).

        Raises:
            UpdateFailure: renamed, older_version.
        """
        floor = self.floor
        if floor is None:
            return
        if name != floor.name and not doc.allow_rename:
            raise UpdateFailure(UpdateReason.RENAMED,
                                f"{name} {version} is another model than {floor.name}"
                                f" {floor.version}, which this device committed, and the signed"
                                " document does not allow a rename",
                                hint="deploy with --allow-rename")
        if name == floor.name and compare_versions(version, floor.version) <= 0 and \
                not doc.allow_downgrade:
            raise UpdateFailure(UpdateReason.OLDER_VERSION,
                                f"{name} {version} is not newer than {floor.version}, which this"
                                " device committed, and the signed document does not allow a"
                                " downgrade",
                                hint="use `edgekit rollback --to VERSION --key OPERATOR_KEY`")

    # ---------------------------------------------------------------- state

    def acted_on(self, doc: DesiredDocument) -> None:
        """Raise the high-water mark to ``doc``'s issue time (the device acts on it)."""
        issued = parse_time(doc.issued, "desired.issued")
        if self.high_water is None or issued > self.high_water:
            self.high_water = issued
            self._save()

    def commit(self, name: str, version: str) -> None:
        """The model ``name`` ``version`` passed its probation: it is the new floor."""
        self.floor = Floor(name, version)
        self._save()

    def ensure_floor(self, name: str, version: str) -> None:
        """Set the floor from the model in service when none is recorded (first start)."""
        if self.floor is None:
            self.commit(name, version)

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("schema") != TRUST_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            mark = doc.get("high_water")
            self.high_water = parse_time(mark, "high_water") if mark else None
            floor = doc.get("floor")
            self.floor = Floor(str(floor["name"]), str(floor["version"])) if floor else None
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, EdgekitError) as exc:
            log.error("the trust state %s is unreadable (%s); the floor is set again from the"
                      " model in service", self.path, exc)

    def _save(self) -> None:
        doc = {"schema": TRUST_SCHEMA,
               "high_water": format_time(self.high_water) if self.high_water else None,
               "floor": {"name": self.floor.name, "version": self.floor.version}
               if self.floor else None}
        with atomic_write(self.path) as handle:
            handle.write(json.dumps(doc, indent=1).encode("utf-8"))


class RefusalLimiter:
    """Report each refused document once, and at most ``per_minute`` reports a minute (a
    flood of distinct forged documents must not flood the event stream)."""

    def __init__(self, per_minute: int = 6, remember: int = 1024) -> None:
        self.per_minute = per_minute
        self.remember = remember
        self.suppressed = 0
        self._seen: dict[str, None] = {}
        self._times: list[float] = []

    def allow(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.remember:
            self._seen.pop(next(iter(self._seen)))
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < 60.0]
        if len(self._times) >= self.per_minute:
            self.suppressed += 1
            return False
        self._times.append(now)
        return True


def _short(devices: list[str] | None) -> str:
    if devices is None:
        return "all"
    return ", ".join(devices[:5]) + (" ..." if len(devices) > 5 else "")

"""Which key signs what on the host, and where the operator key is found.

Two roles (docs/security.md):

- the *release* key signs packages (``edgekit sign``, ``edgekit convert --sign-key``);
  devices trust it through ``model.trusted_keys``;
- the *operator* key signs intents: desired documents (``edgekit deploy``, ``edgekit
  rollback``, the controller's ``controller.signing_key``) and rollout requests to a
  controller; devices trust it through ``ota.intent_keys``, controllers through
  ``controller.operator_keys``.

``edgekit keys generate --role ROLE`` writes ``edgekit-<role>.key`` and ``.pub`` by default.
Commands that sign intents take ``--key``; without it they use ``$EDGEKIT_OPERATOR_KEY``,
else ``edgekit-operator.key`` in the current folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import UsageError
from edgekit.signing import load_private_key

__all__ = ["DEFAULT_OPERATOR_KEY", "KEY_ROLES", "OPERATOR_KEY_ENV", "operator_key"]

KEY_ROLES = ("release", "operator")
OPERATOR_KEY_ENV = "EDGEKIT_OPERATOR_KEY"
DEFAULT_OPERATOR_KEY = "edgekit-operator.key"


def operator_key(path: str | os.PathLike[str] | None) -> Ed25519PrivateKey:
    """The operator key: ``path``, else ``$EDGEKIT_OPERATOR_KEY``, else
    ``./edgekit-operator.key``.

    Raises:
        UsageError: none of them names a readable Ed25519 private key.
    """
    chosen = path or os.environ.get(OPERATOR_KEY_ENV) or (
        DEFAULT_OPERATOR_KEY if Path(DEFAULT_OPERATOR_KEY).is_file() else None)
    if not chosen:
        raise UsageError("no operator key to sign the desired document or request with",
                         hint="pass --key KEY, set EDGEKIT_OPERATOR_KEY, or make one with"
                              " `edgekit keys generate --role operator`")
    return load_private_key(chosen)

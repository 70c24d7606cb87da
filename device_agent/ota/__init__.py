"""Over-the-air updates of the agent's model (docs/ota.md).

:class:`Updater` follows the desired documents and carries out updates through the steps
of :mod:`.steps` (fetch, verify, stage, activate, probation), journalled on disk by
:mod:`.journal` so a restart finishes or undoes them. :class:`IntentGate` decides which
signed desired documents are followed and keeps the version floor and the replay
high-water mark. :class:`ProbationGuard` wraps every
inference while a new model is on probation.
"""

from __future__ import annotations

from .errors import UpdateFailure
from .intent import Floor, IntentGate, RefusalLimiter
from .journal import JournalStep, OtaJournal, UpdateRecord
from .probation import ProbationGuard, ProbationWatch, Verdict
from .updater import OtaSettings, Updater

__all__ = [
    "Floor",
    "IntentGate",
    "JournalStep",
    "OtaJournal",
    "OtaSettings",
    "ProbationGuard",
    "ProbationWatch",
    "RefusalLimiter",
    "UpdateFailure",
    "UpdateRecord",
    "Updater",
    "Verdict",
]

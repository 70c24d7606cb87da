"""Over-the-air updates of the agent's model (docs/ota.md).

:class:`Updater` follows the desired documents and carries out updates through the steps
of :mod:`.steps` (fetch, verify, stage, activate, probation), journalled on disk by
:mod:`.journal` so a restart finishes or undoes them. :class:`IntentGate` decides which
signed desired documents are followed and keeps the version floor and the replay
high-water mark. The probation of a new model is watched by
:class:`~device_agent._probation.ProbationWatch`, which the model slot answers requests with
while it runs.
"""

from __future__ import annotations

from .errors import UpdateFailure
from .intent import Floor, IntentGate, RefusalLimiter
from .journal import JournalStep, OtaJournal, UpdateRecord
from .updater import OtaSettings, Updater

__all__ = [
    "Floor",
    "IntentGate",
    "JournalStep",
    "OtaJournal",
    "OtaSettings",
    "RefusalLimiter",
    "UpdateFailure",
    "UpdateRecord",
    "Updater",
]

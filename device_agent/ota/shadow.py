"""Shadow mode of an update: the verified, staged candidate runs beside the model in service
instead of replacing it (docs/ota.md, "Shadow evaluation").

:func:`run_shadow` hands the candidate to a :class:`~device_agent._shadow.ShadowRunner` on
the agent's request path (an observer of its predictions and labels), waits until it compared the requests asked for (or the time is up, or a newer
desired document arrives), then closes the update as ``shadowed`` with the report in the
event's ``details.shadow``, and drops the candidate. The model in service never changes. A
restart during the shadow starts it again from verification (the journal says ``staged``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edgekit.protocol.ota import ShadowSpec, UpdateReason, UpdateStep

from .._model import LoadedModel
from .._shadow import ShadowRunner, attach
from .errors import UpdateFailure

if TYPE_CHECKING:
    from .steps import UpdateRun

__all__ = ["run_shadow"]

log = logging.getLogger("device_agent.ota")


def run_shadow(run: UpdateRun, candidate: LoadedModel, spec: ShadowSpec) -> None:
    """Shadow ``candidate`` as the run's desired document asks (its ``shadow``, ``spec``),
    then report and drop it.

    Raises:
        UpdateFailure: unavailable, when no model is in service to compare with.
    """
    record, requests = run.record, run.u.requests
    serving = run.slot.current
    if serving is None or requests is None:
        raise UpdateFailure(UpdateReason.UNAVAILABLE, "no model is in service to shadow"
                            " the candidate beside", hint="deploy it without --shadow")
    runner = ShadowRunner(candidate, serving, target=spec.requests, sample=spec.sample)
    run.u.emit(UpdateStep.SHADOW, record,
               f"shadowing {candidate.name} {candidate.version} beside {serving.name}"
               f" {serving.version} on {spec.sample:.0%} of requests until"
               f" {spec.requests} are compared")
    deadline = time.monotonic() + spec.seconds
    detach = attach(requests, runner)
    try:
        ended = "requests"
        while not runner.done.wait(0.25):
            if run.u.stopping.is_set():
                ended = "stopped"
                break
            if run.cancel.is_set():
                ended = "superseded"
                break
            if time.monotonic() >= deadline:
                ended = "timeout"
                break
    finally:
        detach()
        runner.close()
    if ended == "stopped":
        log.info("shadow of %s paused for the shutdown", record.deployment)
        return  # the journal keeps 'staged': the next start shadows again
    report = runner.report(record.deployment, ended)
    run.u.discard_files(record, run.doc)
    agreement = "n/a" if report.agreement is None else f"{report.agreement:.3f}"
    run.u.finish(record, UpdateStep.SHADOWED, None,
                 f"shadowed {report.requests} of {report.target} requests ({ended});"
                 f" agreement {agreement}; {serving.name} {serving.version} kept serving",
                 details={"shadow": report.to_dict()})

"""The data plane's part of the orchestrator pass.

The steps live in modules of their own: ``staging`` (Preparing → Syncing,
and releasing staging), ``agent_tasks`` (the agent's task, credential,
progress and result: Syncing → Processing), ``sealing`` (Processing →
Cleaning → Finished/Waiting), ``retention`` (which images a job keeps) and
``receivers`` (which receiver a run sends to; handing a dead one's runs over).
"""

from __future__ import annotations

from opensmc.service import receivers, retention, sealing, staging
from opensmc.service.context import Services


def tick(svc: Services) -> int:
    """One data-plane pass of the orchestrator; returns how many jobs moved on."""
    staging.sweep_staging(svc)
    receivers.hand_over(svc)
    moved = staging.prepare(svc) + sealing.process(svc) + sealing.clean(svc)
    retention.collect_garbage(svc)
    return moved

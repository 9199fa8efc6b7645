"""Every action the API answers, assembled into one explicit registry."""

from __future__ import annotations

from opensmc.api.actions import jobs, sources, tags, tokens, workgroups
from opensmc.api.registry import Action, registry

ACTIONS: dict[str, Action] = registry(
    jobs.ACTIONS,
    sources.ACTIONS,
    tokens.ACTIONS,
    workgroups.ACTIONS,
    tags.ACTIONS,
)

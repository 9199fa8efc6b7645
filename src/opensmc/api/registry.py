"""The explicit action registry: every SMC action this server answers, and how.

An :class:`Action` names its handler and the wire parameters it reads
(``params``); ``scripts/gen_api_coverage.py`` writes docs/api-coverage.md
from this table. No action is dispatched unless it is listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opensmc.params import Params
from opensmc.service.accounts import READ_PREFIXES
from opensmc.service.context import Caller, Services

Handler = Callable[[Services, Caller, Params], dict[str, Any]]


@dataclass(frozen=True)
class Action:
    name: str
    handler: Handler
    #: wire parameters read (`Tag.N.Key` style for lists)
    params: tuple[str, ...]
    #: what is accepted but not acted on, said plainly
    notes: str = ""

    @property
    def read_only(self) -> bool:
        """Only reads (``Describe*``, ``List*``: what a read-only key may call): run on the read pool."""
        return self.name.startswith(READ_PREFIXES)


def registry(*groups: tuple[Action, ...]) -> dict[str, Action]:
    table: dict[str, Action] = {}
    for group in groups:
        for action in group:
            if action.name in table:
                raise ValueError(f"action {action.name} registered twice")
            table[action.name] = action
    return dict(sorted(table.items()))

"""Issue 7 item 9: the receiver's credential cache holds verified credentials only."""

from __future__ import annotations

import secrets

from opensmc.service import agent_tasks
from opensmc.service.context import Services


def test_junk_tokens_are_not_cached(services: Services) -> None:
    agent_tasks._auth_cache.clear()
    for _ in range(2000):
        junk = f"j-{secrets.token_hex(8)}.1.{secrets.token_hex(4096)}"
        assert agent_tasks.authorize(services, junk, "ti-x-0") is False
    assert len(agent_tasks._auth_cache) == 0


def test_hostile_token_shapes_are_refused_not_errors(services: Services) -> None:
    for token in ("a.²³.b", "a." + "9" * 5000 + ".b", "x" * 100_000, "", "...", "j-1.1"):
        assert agent_tasks.authorize(services, token, "ti-x-0") is False
    assert len(agent_tasks._auth_cache) == 0

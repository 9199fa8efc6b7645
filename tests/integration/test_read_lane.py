"""Where signed calls run: reads in their nonce transaction's batch on the read lane, writes on the write pool.

Every handler runs only after the transaction that recorded its nonce has
committed, wherever it runs; a handler's error is its own request's answer;
a slow call on the lane does not hold up the calls that come after it.
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qsl

import pytest

from opensmc import API_VERSION
from opensmc.api import threads
from opensmc.api.auth import authenticate, authenticate_then
from opensmc.api.nonces import NonceBatcher
from opensmc.api.signing import SignedRequest
from opensmc.domain.errors import InvalidParameter, SmcError
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Caller, Services
from opensmc.signer import sign_v1
from opensmc.store import accounts as q


def _signed(key: KeyPair, nonce: str) -> SignedRequest:
    qs = sign_v1("GET", "DescribeSourceServers", API_VERSION, {}, key.access_key_id, key.access_key_secret, nonce=nonce)
    return SignedRequest("GET", "/", parse_qsl(qs, keep_blank_values=True), [], {}, b"")


def _key(services: Services) -> KeyPair:
    key = create_account(services, "lane")
    authenticate(services, _signed(key, "warm"))  # the key is cached from here on: the batched path
    return key


def _observer(services: Services, key: KeyPair, nonce: str, seen: dict[str, tuple[str, bool]]):  # type: ignore[no-untyped-def]
    def then(_caller: Caller) -> str:
        with services.db.connect() as conn:  # what any other process would see now
            committed = q.nonce_used(conn, key.access_key_id, nonce)
        seen[nonce] = (threading.current_thread().name, committed)
        return nonce

    return then


def test_batched_reads_run_on_the_lane_and_writes_on_the_write_pool_each_after_its_commit(
    services: Services,
) -> None:
    key = _key(services)
    batcher = NonceBatcher(services)
    seen: dict[str, tuple[str, bool]] = {}

    async def many() -> list[object]:
        calls = [
            authenticate_then(
                services, _signed(key, f"n{i}"), batcher, _observer(services, key, f"n{i}", seen), read_only=i % 4 != 3
            )
            for i in range(40)
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(many())
    assert [r for _c, r in results] == [f"n{i}" for i in range(40)]  # type: ignore[misc]
    for i in range(40):
        name, committed = seen[f"n{i}"]
        assert committed, f"n{i} ran before its nonce was committed"
        if i % 4 == 3:
            assert name.startswith("opensmc-api_"), (i, name)  # a write: the write pool
        else:
            assert name.startswith("opensmc-api-read"), (i, name)  # a read: the lane


def test_a_handler_error_answers_its_own_request_only(services: Services) -> None:
    key = _key(services)
    batcher = NonceBatcher(services)

    def then_for(i: int):  # type: ignore[no-untyped-def]
        def then(_caller: Caller) -> int:
            if i == 5:
                raise InvalidParameter("PageSize", "bad on purpose")
            if i == 7:
                raise RuntimeError("a bug")
            return i

        return then

    async def many() -> list[object]:
        calls = [
            authenticate_then(services, _signed(key, f"e{i}"), batcher, then_for(i), read_only=True) for i in range(12)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(many())
    for i, r in enumerate(results):
        if i == 5:
            assert isinstance(r, SmcError) and r.code == "InvalidParameter"
        elif i == 7:
            assert isinstance(r, RuntimeError)
        else:
            assert not isinstance(r, BaseException) and r[1] == i  # type: ignore[index]


def test_a_stuck_lane_sends_later_work_to_the_write_pool(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "STUCK_SECONDS", 0.01)
    key = _key(services)
    batcher = NonceBatcher(services)
    release = threading.Event()
    names: dict[str, str] = {}

    def slow(_caller: Caller) -> str:
        names["slow"] = threading.current_thread().name
        assert release.wait(30)
        return "slow"

    def quick(_caller: Caller) -> str:
        names["quick"] = threading.current_thread().name
        return "quick"

    async def both() -> tuple[object, object]:
        first = asyncio.ensure_future(authenticate_then(services, _signed(key, "s1"), batcher, slow, read_only=True))
        while not threads._lane.stuck():
            await asyncio.sleep(0.01)
        try:
            second = await asyncio.wait_for(
                authenticate_then(services, _signed(key, "s2"), batcher, quick, read_only=True), 30
            )
        finally:
            release.set()
        return await first, second

    (_, a), (_, b) = asyncio.run(both())  # type: ignore[misc]
    assert (a, b) == ("slow", "quick")
    assert names["slow"].startswith("opensmc-api-read")
    assert names["quick"].startswith("opensmc-api_")

"""The agent's file-level pieces without the network: excludes in a partition's terms, the margin, the tunnel's
decoder and its throttle (on a simulated clock)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.agent.files import DEFAULT_EXCLUDES, exclude_patterns, journal_bytes, needed_bytes
from opensmc.agent.tunnel import Throttle, TunnelError, _Chunked, write_limit

MiB = 1024 * 1024


def test_patterns_of_the_root_partition_stay_as_written_but_other_partitions_are_left_to_them() -> None:
    lines = ["# comment", "", "/var/cache/*", "*.tmp", "/data/scratch/", "; also a comment"]
    assert exclude_patterns("/", lines, ["/data"]) == ["/var/cache/*", "*.tmp"]


def test_patterns_under_a_partitions_mount_point_become_relative_to_it() -> None:
    lines = ["/data/scratch/", "/var/log/*", "*.tmp", "/data"]
    assert exclude_patterns("/data", lines, ["/data"]) == ["/scratch/", "*.tmp", "/"]


def test_the_defaults_leave_pseudo_filesystems_and_swap_out() -> None:
    for path in ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/swapfile"):
        assert path in DEFAULT_EXCLUDES


def test_the_margin_covers_metadata_and_the_journal() -> None:
    assert journal_bytes(64 * MiB) == 1024 * 4096  # 16,384 blocks: a 1,024-block journal
    assert journal_bytes(100 * 1024**3) == 131072 * 4096  # under 128 GiB: 512 MiB
    assert needed_bytes(0, 64 * MiB) > 8 * MiB  # journal 4 MiB, 2 % metadata, 4 MiB
    assert needed_bytes(10 * 1024**3, 20 * 1024**3) < 20 * 1024**3


def _encode(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces if p) + b"0\r\n\r\n"


@settings(deadline=None, max_examples=300)
@given(
    pieces=st.lists(st.binary(min_size=0, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_the_chunked_decoder_gives_the_body_however_it_arrives(pieces: list[bytes], cuts: list[int]) -> None:
    raw = _encode(pieces)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    dec = _Chunked()
    out = b""
    prev = 0
    for p in [*points, len(raw)]:
        out += dec.feed(raw[prev:p])
        prev = p
    assert out == b"".join(pieces) and dec.done


def test_the_chunked_decoder_refuses_garbage() -> None:
    dec = _Chunked()
    try:
        dec.feed(b"zz\r\n")
    except TunnelError as e:
        assert "bad chunk size" in str(e)
    else:
        raise AssertionError("garbage accepted")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _drain(throttle: Throttle, clock: _Clock, seconds: float) -> int:
    """What a sender that reads whenever the throttle lets it sends in ``seconds`` (simulated time)."""
    sent, end = 0, clock.now + seconds
    while clock.now < end:
        wait = throttle.delay()
        if wait:
            clock.now += wait
            continue
        n = throttle.read_size(256 * 1024)
        throttle.spend(n)
        sent += n
        clock.now += 0.0001  # reading and sending take a little time
    return sent


def test_the_tunnels_throttle_holds_the_rate_in_its_file_and_follows_a_change(tmp_path: Path) -> None:
    clock = _Clock()
    path = str(tmp_path / "limit")
    write_limit(path, 1_000_000)
    throttle = Throttle(path, clock)
    sent = _drain(throttle, clock, 10.0)
    assert 9_500_000 <= sent <= 10_000_000 + 1_000_000 * Throttle.BURST + 256 * 1024
    write_limit(path, 4_000_000)  # the server raised the limit
    _drain(throttle, clock, Throttle.CHECK * 2)  # looked at again within CHECK
    assert throttle.rate == 4_000_000
    assert _drain(throttle, clock, 10.0) >= 39_000_000
    write_limit(path, 0)  # no limit: it never waits
    _drain(throttle, clock, Throttle.CHECK * 2)
    assert throttle.rate == 0 and throttle.delay() == 0 and throttle.read_size(256 * 1024) == 256 * 1024


def test_a_throttle_without_a_file_or_with_a_bad_one_does_not_limit(tmp_path: Path) -> None:
    assert Throttle(None).delay() == 0
    bad = tmp_path / "limit"
    bad.write_text("fast\n")
    assert Throttle(str(bad)).delay() == 0
    assert Throttle(str(tmp_path / "missing")).delay() == 0

"""The agent's replication pipeline: read, detect changes, encode, send.

Three stages on threads, joined by bounded queues so memory stays at a few
tens of MiB whatever the disk size::

    reader ──(read buffers, recycled)──> encoders ──(frames)──> sender ──> Sender.send_batch

- The reader fills ``read_size`` buffers taken from a fixed pool.
- An encoder computes the zero map of the buffer, hashes every non-zero
  chunk (xxh3-128) and compares it with ``previous`` (what the receiver holds).
  Adjacent changed chunks are coalesced into one data frame of at most
  ``max_frame`` bytes; chunks that are zero now but held as data by the
  receiver become zero frames; everything else is skipped. The buffer goes
  back to the pool once its frames are encoded (frames own their bytes).
- The sender groups frames into batches of about ``batch_bytes`` and hands
  them to the :class:`Sender` (frames waiting or in flight are bounded to
  ``2 * batch_bytes``): the transport seam (HTTP in
  ``opensmc.agent.uploader``, anything in tests). Wrappers such as
  :class:`RateLimitedSender` stack on it.

Frames are independent (each carries its offset), so encoders may finish out
of order. A run killed midway leaves the receiver with every batch that
``send_batch`` acknowledged; the next run re-sends only the rest.
"""

import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, TypeVar

from opensmc.agent.reader import BlockSource, nonzero_chunks
from opensmc.wire.frames import (
    DEFAULT_CODEC,
    DEFAULT_HASH,
    HASH_XXH3,
    encode_frame,
    encode_zero_frame,
    hash_function,
)

if TYPE_CHECKING:
    from typing import Protocol  # novermin
else:  # Python 3.6 and 3.7 have no typing.Protocol; at run time it is only a base class
    Protocol = object

__all__ = ["Progress", "RateLimitedSender", "ReplicationResult", "Sender", "replicate"]

MiB = 1024 * 1024
_T = TypeVar("_T")


class Sender(Protocol):
    """Delivers frames to a receiver.

    ``send_batch`` returns only once the receiver has accepted every frame of
    the batch (written, not necessarily fsync'ed); it raises otherwise. It may
    be retried with the same frames: receivers treat replays as no-ops.
    """

    def send_batch(self, frames: "Sequence[bytes]") -> None: ...


class Progress(NamedTuple):
    """A snapshot passed to the progress callback (called from pipeline threads)."""

    scanned: int  #: bytes of the source read and classified so far
    total: int  #: bytes of the source range
    to_move: int  #: plain bytes of changed chunks found so far
    sent: int  #: bytes on the wire acknowledged by the sender
    #: bytes of the source range, from its start, whose frames the sender acknowledged; zero and
    #: unchanged regions count once the acknowledged position moves past them. What progress shows.
    acked: int = 0


class ReplicationResult:
    """What a run did. ``hashes`` is the source's chunk map: every non-zero chunk's digest.

    The digests are of the family ``hash_id`` (``opensmc.wire.frames``: xxh3-128
    where xxhash is importable, BLAKE2b-128 otherwise).
    """

    __slots__ = (
        "bytes_plain",
        "bytes_wire",
        "chunk_size",
        "chunks_sent",
        "chunks_zeroed",
        "frames",
        "hash_id",
        "hashes",
        "seconds",
        "total",
    )

    def __init__(self, total: int, chunk_size: int, hash_id: int = HASH_XXH3) -> None:
        self.total = total
        self.chunk_size = chunk_size
        self.hash_id = hash_id
        self.chunks_sent = 0
        self.chunks_zeroed = 0
        self.frames = 0
        self.bytes_plain = 0
        self.bytes_wire = 0
        self.seconds = 0.0
        self.hashes: "Dict[int, bytes]" = {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "hashes")
        return f"ReplicationResult({fields}, hashes=<{len(self.hashes)}>)"


class _Stop(Exception):
    """Another stage failed; this one unwinds quietly."""


class _Run:
    """The shared state of one run: queues, counters, the first error."""

    def __init__(
        self, total: int, chunk_size: int, progress: "Callable[[Progress], None] | None", hash_id: int
    ) -> None:
        self.stop = threading.Event()
        self.error: "BaseException | None" = None
        self.lock = threading.Lock()
        self.result = ReplicationResult(total=total, chunk_size=chunk_size, hash_id=hash_id)
        self.hash = hash_function(hash_id)
        #: ``previous`` holds digests of this run's family: unchanged chunks can be recognised
        self.compare = True
        self.on_hash: "Optional[Callable[[int, bytes], None]]" = None
        self.scanned = 0
        self.to_move = 0
        self.acked = 0
        self._spans: "dict[int, int]" = {}  # acknowledged (start -> end) beyond `acked` (encoders finish out of order)
        self.progress = progress
        self.keep_hashes = True

    def acknowledge(self, spans: "Sequence[tuple[int, int]]") -> None:
        """The frames of these source spans are acknowledged: move `acked` over every contiguous one."""
        with self.lock:
            for start, end in spans:
                self._spans[start] = end
            while self.acked in self._spans:
                self.acked = self._spans.pop(self.acked)

    def fail(self, e: "BaseException") -> None:
        with self.lock:
            if self.error is None:
                self.error = e
        self.stop.set()

    def put(self, q: "queue.Queue[_T]", item: "_T") -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: "queue.Queue[_T]") -> "_T":
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def report(self) -> None:
        if self.progress is not None:
            r = self.result
            self.progress(Progress(self.scanned, r.total, self.to_move, r.bytes_wire, self.acked))


def replicate(
    path: str,
    sender: "Sender",
    *,
    offset: int = 0,
    length: "int | None" = None,
    previous: "Mapping[int, bytes] | None" = None,
    chunk_size: int = 64 * 1024,
    level: int = 0,
    max_frame: int = 4 * MiB,
    read_size: int = 4 * MiB,
    batch_bytes: int = 8 * MiB,
    encoders: int = 1,
    progress: "Callable[[Progress], None] | None" = None,
    target_offset: int = 0,
    keep_hashes: bool = True,
    hash_id: "Optional[int]" = None,
    codec: int = DEFAULT_CODEC,
    on_hash: "Optional[Callable[[int, bytes], None]]" = None,
) -> "ReplicationResult":
    """Send the chunks of ``path[offset:offset+length]`` that differ from ``previous``.

    ``previous`` maps chunk index to digest for the non-zero chunks the
    receiver holds (absent = zeros); its family is its ``hash_id`` attribute
    (a :class:`HashArray`'s), xxh3-128 for a plain mapping. ``hash_id`` is the
    family this run hashes with (default: ``DEFAULT_HASH``, xxh3-128 where
    xxhash is importable). When the two differ (an agent without xxhash against
    a receiver's xxh3-128 map) no chunk can be proved unchanged: every non-zero
    chunk is sent, and ``previous`` only says which ranges need a zero frame.
    ``level`` is a zstd level (see ``opensmc.wire.frames.zstd_level``), 0 for
    none, compressed with ``codec`` (zstd, or zlib where zstandard is missing).
    ``on_hash(index, digest)`` is called (from an encoder thread) for every
    non-zero chunk read: how an agent without xxhash remembers its digests
    (agent/owncache.py).
    Raises the first error of any stage after stopping the others.
    ``target_offset`` places the range in the volume: frames (and the
    chunk indexes of ``previous`` and of the result's map) count from there, so
    several ranges of one disk (the partitions a job selects) can go to one
    volume at their own places. ``keep_hashes=False`` leaves the result's map
    empty: an agent does not need it, and it costs ~120 bytes a chunk.
    """
    if chunk_size & (chunk_size - 1) or chunk_size < 4096:
        raise ValueError(f"chunk_size must be a power of two >= 4096, got {chunk_size}")
    if target_offset % chunk_size:
        raise ValueError(f"target_offset must be a multiple of chunk_size, got {target_offset}")
    if read_size % chunk_size or max_frame % chunk_size or max_frame > read_size:
        raise ValueError("read_size and max_frame must be chunk multiples, max_frame <= read_size")
    prev: "Mapping[int, bytes]" = previous if previous is not None else {}
    started = time.monotonic()
    with BlockSource(path, offset, length) as src:
        family = DEFAULT_HASH if hash_id is None else hash_id
        run = _Run(src.length, chunk_size, progress, family)
        run.keep_hashes = keep_hashes
        run.compare = getattr(previous, "hash_id", HASH_XXH3) == family
        run.on_hash = on_hash
        pool: "queue.Queue[bytearray]" = queue.Queue()
        for _ in range(encoders + 2):  # one being read, one per encoder, one queued
            pool.put(bytearray(read_size))
        work: "queue.Queue[tuple[int, int, bytearray] | None]" = queue.Queue(maxsize=1)
        # Each item is the frames of one read buffer, so thousands of small incremental frames
        # cost few hops. The queue is bounded in bytes, frames queued or in the batch being
        # sent: a bound in items let an incremental run (a few hundred KiB of frames per
        # buffer) queue only ~1 MiB, so it sent hundreds of tiny batches, each a round trip.
        # Each item also names the span of the source it covers, so that the sender can move the
        # acknowledged position over it once its frames (if any) are acknowledged.
        out: "queue.Queue[tuple[list[bytes], int, int] | None]" = queue.Queue()
        budget = _ByteBudget(run, 2 * batch_bytes)

        def read_stage() -> None:
            pos = 0
            while pos < src.length:
                buf = run.get(pool)
                n = src.read_into(buf, pos)
                run.put(work, (pos, n, buf))
                pos += n
            for _ in range(encoders):
                run.put(work, None)

        def encode_stage() -> None:
            while True:
                item = run.get(work)
                if item is None:
                    break
                pos, n, buf = item
                _encode_buffer(
                    run,
                    memoryview(buf)[:n],
                    target_offset + pos,
                    prev,
                    (level, codec),
                    max_frame,
                    out,
                    budget,
                    (pos, pos + n),
                )
                pool.put(buf)
            run.put(out, None)

        def send_stage() -> None:
            open_encoders = encoders
            batch: "list[bytes]" = []
            spans: "list[tuple[int, int]]" = []  # source spans whose frames are in `batch` (or none)
            size = 0
            while open_encoders:
                item = run.get(out)
                if item is None:
                    open_encoders -= 1
                else:
                    frames, start, end = item
                    batch.extend(frames)
                    spans.append((start, end))
                    size += sum(len(f) for f in frames)
                # Send when the batch is full, or when nothing more is ready, to keep the link busy.
                if batch and (size >= batch_bytes or out.empty() or not open_encoders):
                    sender.send_batch(batch)
                    budget.release(size)
                    with run.lock:
                        run.result.bytes_wire += size
                    run.acknowledge(spans)
                    run.report()
                    batch, spans, size = [], [], 0
                elif spans and not batch:  # zero or unchanged buffers only: nothing to wait for
                    run.acknowledge(spans)
                    run.report()
                    spans = []

        stages = [read_stage] + [encode_stage] * encoders + [send_stage]
        threads = [threading.Thread(target=_guard, args=(run, s), daemon=True) for s in stages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if run.error is not None:
        raise run.error
    run.result.seconds = time.monotonic() - started
    return run.result


class _ByteBudget:
    """Bytes of frames between the encoders and the receiver's acknowledgement, held to ``limit``.

    One item may exceed the limit alone, so any frame can pass.
    """

    def __init__(self, run: "_Run", limit: int) -> None:
        self._run = run
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit:
                if self._run.stop.is_set():
                    raise _Stop
                self._cond.wait(0.1)
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


def _guard(run: "_Run", stage: "Callable[[], None]") -> None:
    try:
        stage()
    except _Stop:
        pass
    except BaseException as e:
        run.fail(e)


def _encode_buffer(
    run: "_Run",
    view: "memoryview",
    pos: int,
    prev: "Mapping[int, bytes]",
    compression: "Tuple[int, int]",
    max_frame: int,
    out: "queue.Queue[tuple[list[bytes], int, int] | None]",
    budget: "_ByteBudget",
    span: "tuple[int, int]",
) -> None:
    cs = run.result.chunk_size
    base = pos // cs
    nonzero = nonzero_chunks(view, cs)
    window = getattr(prev, "window", None)  # HashArray, HashFile, OwnHashes: one lookup per buffer
    if window is not None:
        prev = window(base, base + len(nonzero))
    hashes: "dict[int, bytes] | None" = run.result.hashes if run.keep_hashes else None
    # Classify every chunk: "d" send data, "z" send a zero frame, "" leave alone.
    kinds: "list[str]" = []
    one_hash: "dict[int, bytes]" = {}
    # Without a map of our own hash family, or where the receiver holds nothing of this buffer
    # (a full run), there is nothing to compare a chunk's digest with: skip the per-chunk pass
    # (the frames are hashed whole anyway).
    per_chunk = (run.compare and len(prev) > 0) or hashes is not None or run.on_hash is not None
    digest = run.hash
    for i, nz in enumerate(nonzero):
        idx = base + i
        if nz and not per_chunk:
            kinds.append("d")
            continue
        if nz:
            h = digest(view[i * cs : (i + 1) * cs])
            if hashes is not None:
                hashes[idx] = h
            if run.on_hash is not None:
                run.on_hash(idx, h)
            if not run.compare or prev.get(idx) != h:
                kinds.append("d")
                one_hash[i] = h
                continue
        elif idx in prev:
            kinds.append("z")
            continue
        kinds.append("")
    encoded: "list[bytes]" = []
    sent = zeroed = moved = 0
    per_frame = max_frame // cs
    i = 0
    while i < len(kinds):
        kind = kinds[i]
        j = i + 1
        while j < len(kinds) and kinds[j] == kind and (kind != "d" or j - i < per_frame):
            j += 1
        if kind:
            start, end = i * cs, min(j * cs, len(view))
            if kind == "d":
                known = one_hash.get(i) if j == i + 1 else None  # a one-chunk frame is already hashed
                level, codec = compression
                frame = encode_frame(
                    pos + start, view[start:end], level, hash_=known, hash_id=run.result.hash_id, codec=codec
                )
                encoded.append(frame)
                sent += j - i
                moved += end - start
            else:
                encoded.append(encode_zero_frame(pos + start, end - start))
                zeroed += j - i
        i = j
    if encoded:
        budget.acquire(sum(len(f) for f in encoded))
    run.put(out, (encoded, *span))  # also when empty: the acknowledged position must pass it
    with run.lock:
        r = run.result
        r.frames += len(encoded)
        r.chunks_sent += sent
        r.chunks_zeroed += zeroed
        r.bytes_plain += moved
        run.scanned += len(view)
        run.to_move += moved
    run.report()


class RateLimitedSender:
    """A :class:`Sender` wrapper that holds the wire rate to ``mbit_per_s`` (0 = no limit).

    A token bucket in debt form: a batch may go when the bucket is not in
    debt, and its size is then charged, so the long-run rate is exact and a
    batch larger than the burst still goes. :meth:`set_limit` may be called
    from any thread while a run is going; a waiting batch sees it within 0.1 s.
    """

    def __init__(
        self,
        inner: "Sender",
        mbit_per_s: float = 0.0,
        *,
        burst_seconds: float = 0.1,
        clock: "Callable[[], float]" = time.monotonic,
        sleep: "Callable[[float], None]" = time.sleep,
    ) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._rate = 0.0  # bytes per second
        self._burst_seconds = burst_seconds
        self._tokens = 0.0
        # Injectable so that tests can check the rate on a simulated clock, not a busy machine's.
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self.set_limit(mbit_per_s)

    @property
    def limit(self) -> float:
        """The current limit in Mbit/s (0 = none)."""
        return self._rate * 8 / 1e6

    def set_limit(self, mbit_per_s: float) -> None:
        if mbit_per_s < 0:
            raise ValueError(f"bandwidth limit must be >= 0 Mbit/s, got {mbit_per_s}")
        with self._lock:
            self._refill()
            self._rate = mbit_per_s * 1e6 / 8
            self._tokens = min(self._tokens, self._rate * self._burst_seconds)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            cap = self._rate * self._burst_seconds
            self._tokens = min(cap, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def send_batch(self, frames: "Sequence[bytes]") -> None:
        n = sum(len(f) for f in frames)
        while True:
            with self._lock:
                self._refill()
                # Within a byte of zero counts as paid: float rounding must not leave a
                # waiter sleeping for ever-smaller, clock-absorbed intervals.
                if not self._rate or self._tokens > -1.0:
                    if self._rate:
                        self._tokens -= n
                    break
                wait = -self._tokens / self._rate
            self._sleep(min(wait, 0.1))
        self.inner.send_batch(frames)

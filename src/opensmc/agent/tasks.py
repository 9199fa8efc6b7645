"""Running the data plane's tasks on the agent.

The server hands tasks to the agent on its task channel, a long-poll of
``GET /agent/v1/tasks`` (agent/runner.py; docs/agent-api.md): a job run, the
receiver to send to, a credential scoped to that run, and the disks with the
staging volume each goes to. :class:`TaskRunner` runs each task once, on a
thread of its own: for every disk it asks the receiver which chunks it
already holds, sends only the chunks that differ (the pipeline in
``agent/pipeline.py``), and makes them durable; then it reports the result.

Every answer of the channel is the whole task view (:meth:`TaskRunner.apply`):
a running task that is no longer in it stops before its next batch goes out
(StopReplicationJob, a failure, a deletion), and one whose ``bandwidth_limit``
changed is re-limited at once. About once a second a task also reports
progress (bytes read *and* acknowledged by the receiver); that reply says the
same (go on? which limit?), for a server without the channel.

Losing contact with the server or the receiver (a restart, a network cut)
does not fail the job: the attempt ends without a result and starts again
after a backoff while the channel still wants it (or when the channel's
reconnection or a heartbeat hands it out again), resuming from the
receiver's hash map. Only :data:`MAX_LOST_CONTACT` attempts in a row
that lose contact without moving any data end in a failure report.
"""

import functools
import http.client
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional, Sequence

from opensmc.agent import files as file_level
from opensmc.agent import writewatch
from opensmc.agent.client import AgentClient, ServerUnavailable
from opensmc.agent.owncache import Recorder
from opensmc.agent.pipeline import Progress, RateLimitedSender, Sender, replicate
from opensmc.agent.reader import source_size
from opensmc.agent.uploader import HttpSender, ReceiverError
from opensmc.wire.frames import DEFAULT_HASH, zstd_level

log = logging.getLogger("opensmc.agent.tasks")

PROGRESS_EVERY = 1.0  # seconds between progress reports
MAX_LOST_CONTACT = 10  # attempts in a row that lose contact without sending anything
RETRY_MAX = 15.0  # seconds: the longest wait before an attempt that lost contact starts again

#: errors that mean "cannot reach the server or the receiver right now", not "the disk is bad"
# (socket.timeout is TimeoutError only from Python 3.10; socket.gaierror: the name does not resolve now)
_LOST_CONTACT = (
    ServerUnavailable,
    ConnectionError,
    TimeoutError,
    socket.timeout,
    socket.gaierror,
    http.client.HTTPException,
)


class TaskStopped(Exception):
    """The server said the job is no longer syncing (stopped, failed, deleted)."""


class DiskChanged(Exception):
    """The source disk's size is not the size of the staging volume it goes to."""


class LostContact(Exception):
    """The server or the receiver could not be reached; ``sent`` bytes went through before."""

    def __init__(self, cause: "BaseException", sent: int) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sent = sent


class _StoppableSender:
    """Refuses further batches once the task is told to stop, which unwinds the pipeline."""

    def __init__(self, inner: "Sender", stopped: "threading.Event") -> None:
        self.inner = inner
        self.stopped = stopped

    def send_batch(self, frames: "Sequence[bytes]") -> None:
        if self.stopped.is_set():
            raise TaskStopped("the server asked this task to stop")
        self.inner.send_batch(frames)


class TaskControl:
    """What the server can change about a running task: whether it goes on, and its bandwidth limit.

    Set from the channel thread (and from the task's own progress replies);
    read by the task's pipeline threads.
    """

    def __init__(self, limit: float = 0.0) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._limit = limit
        self._limiter: "RateLimitedSender | None" = None
        #: the task channel is up and speaks for this task: its answers, not the progress
        #: replies, set the limit (two sources a second apart would flip it back and forth)
        self.follows_channel = False

    @property
    def limit(self) -> float:
        with self._lock:
            return self._limit

    def attach(self, limiter: "RateLimitedSender") -> None:
        """The limiter of the disk being sent now: limit changes go to it."""
        with self._lock:
            self._limiter = limiter
            limiter.set_limit(self._limit)

    def set_limit(self, limit: float, origin: str = "task channel") -> None:
        with self._lock:
            changed = limit != self._limit
            self._limit = limit
            limiter = self._limiter
            if limiter is not None:
                limiter.set_limit(limit)
        if changed:
            log.info("bandwidth limit now %s (%s)", f"{limit:g} Mbit/s" if limit > 0 else "off", origin)

    def stop(self) -> None:
        self.stopped.set()


def _limit_of(task: "dict[str, Any]") -> float:
    params = task.get("replication_parameters") or {}
    try:
        limit = float(params.get("bandwidth_limit") or 0)
    except (TypeError, ValueError):
        return 0.0
    return limit if limit > 0 else 0.0


class TaskRunner:
    """Starts each task once and keeps track of the ones running."""

    def __init__(
        self,
        client: "AgentClient",
        token: "Callable[[], str]",
        tls: "ssl.SSLContext | None" = None,
        cache_dir: "Optional[str]" = None,
        file_options: "Optional[file_level.FileOptions]" = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.file_options = file_options or file_level.FileOptions()
        self.client = client
        self.tls = tls
        self.token = token
        self._running: "dict[str, tuple[threading.Thread, TaskControl]]" = {}
        self._lost: "dict[str, int]" = {}  # task id -> attempts in a row that lost contact
        self._lock = threading.Lock()
        #: the channel's last view (task id -> task), None before its first answer
        self._view: "dict[str, dict[str, Any]] | None" = None
        self._channel_up = False

    def handle(self, tasks: "Sequence[dict[str, Any]]") -> None:
        """Start the tasks not running yet (a heartbeat's list: it never stops one)."""
        self._update(tasks, authoritative=False, origin="heartbeat")

    def apply(self, tasks: "Sequence[dict[str, Any]]") -> None:
        """The whole task view from the channel: start new tasks, stop the ones gone, re-limit the rest."""
        with self._lock:
            self._view = {str(t.get("task_id", "")): dict(t) for t in tasks}
            self._channel_up = True
        self._update(tasks, authoritative=True, origin="task channel")

    def channel_lost(self) -> None:
        """The channel is down: running tasks follow their progress replies again."""
        with self._lock:
            self._channel_up = False
            for _th, control in self._running.values():
                control.follows_channel = False

    def _retry_later(self, tid: str, control: "TaskControl", delay: float) -> None:
        """Start an attempt that lost contact again after `delay` s, if the server still wants it.

        The channel answers only when the view changes, and a lost receiver does not
        change it: without this the task would wait for the long-poll's next answer.
        The retry starts the channel's latest version of the task (its limit may have changed).
        """

        def again() -> None:
            if control.stopped.wait(delay):
                return
            with self._lock:
                view, up = self._view, self._channel_up
            # Only while the channel is up: when it is down (the server is), its reconnection or a
            # heartbeat hands the task out again, and attempts that cannot reach a server that is
            # down must not use up the MAX_LOST_CONTACT that fails the job.
            if not up or view is None or tid not in view:
                return
            self._update([view[tid]], authoritative=False, origin="retry", follows_channel=True)

        threading.Thread(target=again, name=f"retry-{tid}", daemon=True).start()

    def _update(
        self,
        tasks: "Sequence[dict[str, Any]]",
        *,
        authoritative: bool,
        origin: str,
        follows_channel: "bool | None" = None,
    ) -> None:
        with self._lock:
            for tid in [t for t, (th, _c) in self._running.items() if not th.is_alive()]:
                del self._running[tid]
            wanted: "set[str]" = set()
            for task in tasks:
                tid = str(task.get("task_id", ""))
                if not tid:
                    continue
                wanted.add(tid)
                running = self._running.get(tid)
                if running is not None:
                    if authoritative:
                        running[1].follows_channel = True
                        running[1].set_limit(_limit_of(task))
                    continue
                control = TaskControl(_limit_of(task))
                control.follows_channel = authoritative if follows_channel is None else follows_channel
                log.info("task %s: starting (from the %s)", tid, origin)
                thread = threading.Thread(target=self._run, args=(task, control), name=f"task-{tid}", daemon=True)
                self._running[tid] = (thread, control)
                thread.start()
            if authoritative:
                for tid, (_th, control) in self._running.items():
                    if tid not in wanted and not control.stopped.is_set():
                        log.info("task %s: no longer wanted by the server; stopping", tid)
                        control.stop()

    def busy(self) -> bool:
        with self._lock:
            return any(th.is_alive() for th, _c in self._running.values())

    def join(self, timeout: "float | None" = None) -> None:
        with self._lock:
            threads = [th for th, _c in self._running.values()]
        for th in threads:
            th.join(timeout)

    def _run(self, task: "dict[str, Any]", control: "TaskControl") -> None:
        job_id, run_id = task["job_id"], task["run_id"]
        log.info("task %s: sending %d disk(s) of job %s", task["task_id"], len(task["disks"]), job_id)
        tid = str(task["task_id"])
        report = self._reporter(task)
        try:
            stats = run_task(task, report, self.tls, control, self.cache_dir, self.file_options)
        except TaskStopped:
            log.info("task %s: stopped by the server", task["task_id"])
            return
        except LostContact as exc:
            # A server restart or a network cut must not fail the job: end this attempt
            # quietly; it starts again after a backoff, or when the server hands it out again.
            lost = 1 if exc.sent else self._lost.get(tid, 0) + 1
            self._lost[tid] = lost
            if lost < MAX_LOST_CONTACT:
                delay = min(2.0 ** (lost - 1), RETRY_MAX)
                log.warning(
                    "task %s: lost contact with the server or receiver (%s); it resumes in %.0f s or "
                    "when the server hands it out again",
                    tid,
                    exc,
                    delay,
                )
                self._retry_later(tid, control, delay)
                return
            self._post_result(
                {
                    "job_id": job_id,
                    "run_id": run_id,
                    "ok": False,
                    "error_code": "Agent.ReceiverUnreachable",
                    "message": f"{lost} attempts in a row could not reach the receiver at "
                    f"{task.get('receiver')}: {exc}",
                }
            )
            return
        except Exception as exc:
            if control.stopped.is_set() or not self._still_wanted(report):
                # The job moved on meanwhile (a StopReplicationJob makes the receiver refuse the
                # run's credential before the next progress reply says stop): not a failure.
                log.info("task %s: stopped by the server (%s)", task["task_id"], exc)
                return
            code, message = _describe(exc)
            log.error("task %s failed: %s: %s", task["task_id"], code, message)
            self._post_result({"job_id": job_id, "run_id": run_id, "ok": False, "error_code": code, "message": message})
            return
        log.info(
            "task %s: done, %d of %d bytes sent in %.1f s",
            task["task_id"],
            stats["bytes_plain"],
            stats["bytes_total"],
            stats["seconds"],
        )
        self._post_result(
            {
                "job_id": job_id,
                "run_id": run_id,
                "ok": True,
                "bytes_total": stats["bytes_total"],
                "stats": stats,
            }
        )

    @staticmethod
    def _still_wanted(report: "Callable[[int, int], tuple[bool, float]]") -> bool:
        """Does the server still want this task? (True when it cannot tell.)"""
        try:
            go_on, _limit = report(-1, -1)  # negative counts record nothing on the server
        except Exception:
            return True
        return go_on

    def _reporter(self, task: "dict[str, Any]") -> "Callable[..., tuple[bool, float]]":
        def report(done: int, total: int, files: "Optional[tuple[int, int]]" = None) -> "tuple[bool, float]":
            body = {"job_id": task["job_id"], "run_id": task["run_id"], "bytes_done": done, "bytes_total": total}
            if files is not None:  # a file-level partition is being copied: files checked, of those rsync knows
                body["files_done"], body["files_total"] = files
            reply = self.client.task_progress(self.token(), body)
            return bool(reply.get("continue", False)), float(reply.get("bandwidth_limit") or 0)

        return report

    def _post_result(self, body: "dict[str, Any]") -> None:
        for attempt in range(5):
            try:
                self.client.task_result(self.token(), body)
                return
            except Exception as exc:  # the server may be restarting: try a few times
                log.warning("cannot report the task result (%s); retrying", exc)
                time.sleep(min(2**attempt, 10))
        log.error("gave up reporting the result of job %s run %s", body["job_id"], body["run_id"])


def run_task(
    task: "dict[str, Any]",
    report: "Callable[..., tuple[bool, float]]",
    tls: "ssl.SSLContext | None" = None,
    control: "TaskControl | None" = None,
    cache_dir: "Optional[str]" = None,
    file_options: "Optional[file_level.FileOptions]" = None,
) -> "dict[str, Any]":
    """Send every disk of a task; returns totals. Raises TaskStopped when told to stop.

    `control` is how the channel stops or re-limits the task while it runs; the
    progress replies (`report`) do the same about once a second. `cache_dir`
    is where an agent whose hash is not the receiver's keeps, per volume, what
    its incremental runs compare with (agent/owncache.py); without it they send
    every non-zero chunk.
    """
    params = task.get("replication_parameters") or {}
    level = zstd_level(int(params.get("compress_level") or 0))
    disks = task["disks"]
    # A disk's "ranges" are the parts of it the job copies block by block; its "files" the
    # partitions it copies file by file (Block=false: agent/files.py). Without either the whole disk moves.
    options = file_options or file_level.FileOptions()
    # Every file-level partition is checked (mounted? fits?) before any data moves; one this agent
    # already sent whole has its fit checked while rsync runs (agent/files.py prepare).
    all_mounts = [str(f.get("mount_point")) for d in disks for f in d.get("files") or [] if f.get("mount_point")]
    prepared = {int(d["index"]): file_level.prepare(d, options, cache_dir, all_mounts) for d in disks}
    total = sum(sum(int(n) for _o, n in _ranges(d)) for d in disks) + sum(
        p.used for ps in prepared.values() for p in ps
    )
    ctl = control or TaskControl(_limit_of(task))
    stopped = ctl.stopped
    state: "dict[str, float]" = {"base": 0, "last": 0.0, "done": 0}
    totals: "dict[str, Any]" = {
        "bytes_total": total,
        "bytes_plain": 0,
        "bytes_wire": 0,
        "chunks_sent": 0,
        "chunks_zeroed": 0,
    }
    if any(prepared.values()):
        totals["files_bytes"] = 0
    started = time.monotonic()
    written: "dict[str, int]" = {}  # disk path -> passes during which it was written (agent/writewatch.py)
    files_seen: "Optional[tuple[int, int]]" = None  # (checked, known) files of the partitions copied so far
    files_base = [0, 0]  # of the partitions already done

    def on_files(checked: int, known: int) -> None:
        nonlocal files_seen
        files_seen = (files_base[0] + checked, files_base[1] + known)

    def tell(done: int, force: bool = False) -> None:
        # Reported progress never goes back within an attempt (one more guard: the server keeps it monotonic too).
        done = max(done, int(state["done"]))
        state["done"] = done
        now = time.monotonic()
        if not force and now - state["last"] < PROGRESS_EVERY:
            return
        state["last"] = now
        go_on, limit = report(done, total) if files_seen is None else report(done, total, files_seen)
        if not go_on:
            stopped.set()
        if not ctl.follows_channel:
            ctl.set_limit(limit, "progress reply")

    def on_progress(p: "Progress") -> None:
        # Only what the receiver acknowledged counts (p.acked), not what was read: with a
        # low bandwidth_limit the reader runs far ahead of the wire.
        tell(int(state["base"]) + p.acked)

    def on_batch(sent: int) -> None:
        state["sent"] = sent

    try:
        tell(0, force=True)
        if stopped.is_set():
            raise TaskStopped("the server asked this task to stop")
        for disk in disks:
            with HttpSender(task["receiver"], disk["volume_id"], task["token"], ssl_context=tls) as http:
                # The task's size comes from the latest discovery report, the volume's from the
                # report when the run was prepared: a disk replaced or resized in between would
                # otherwise be sent short (or cut) into the volume and "finish" as a wrong image.
                volume_size = http.info().size
                actual = source_size(disk["path"])
                if actual != volume_size:
                    raise DiskChanged(
                        f"The source disk {disk['path']} is now {actual} bytes, but this run was "
                        f"prepared for {volume_size} bytes: the disk changed since the job started. "
                        "Start the job again to migrate the disk as it is now."
                    )
                chunk_size, current = http.fetch_hashes()
                recorder = _recorder(cache_dir, disk["volume_id"], chunk_size, current.hash_id)
                previous = current if recorder is None else recorder.previous(current)
                # The stop check sits under the rate limiter, right before each POST: a batch
                # that waited out the limiter while the task was stopped does not go.
                limiter = RateLimitedSender(_StoppableSender(_Counting(http, on_batch), stopped), ctl.limit)
                ctl.attach(limiter)
                base = state["base"]

                def again(http: HttpSender = http, base: float = base) -> None:
                    nonlocal previous  # the disk was written during the pass: the next sends what changed
                    log.info("%s was written during the pass; reading it again", http.volume_id)
                    state["base"] = base  # progress stays at its high-water mark (tell)
                    _size, previous = http.fetch_hashes()

                for offset, length in writewatch.passes(disk["path"], _ranges(disk, volume_size), again, written):
                    read, frame, batch = _batch_sizes(ctl.limit, chunk_size)
                    result = replicate(
                        disk["path"],
                        limiter,
                        offset=offset,
                        length=length,
                        target_offset=offset,
                        previous=previous,
                        chunk_size=chunk_size,
                        level=level,
                        progress=on_progress,
                        read_size=read,
                        max_frame=frame,
                        batch_bytes=batch,
                        keep_hashes=False,  # the receiver holds the map; the agent's memory stays flat
                        on_hash=None if recorder is None else recorder.record,
                    )
                    state["base"] = int(state["base"]) + length
                    totals["bytes_plain"] += result.bytes_plain
                    totals["bytes_wire"] += result.bytes_wire
                    totals["chunks_sent"] += result.chunks_sent
                    totals["chunks_zeroed"] += result.chunks_zeroed
                if stopped.is_set():
                    raise TaskStopped("the server asked this task to stop")
                http.flush()
                if recorder is not None:
                    _keep(recorder, http)
                    recorder = None
            for prep in prepared[int(disk["index"])]:
                base = state["base"]
                built = file_level.send(
                    prep,
                    task["receiver"],
                    task["token"],
                    options,
                    all_mounts=all_mounts,
                    limit_mbit=lambda: ctl.limit,
                    stopped=stopped,
                    progress=functools.partial(_advance, tell, int(base)),
                    build=functools.partial(_build, task, tls=tls),
                    memory_dir=cache_dir,
                    on_files=on_files,
                )
                if stopped.is_set() or built.get("stopped"):
                    raise TaskStopped("the server asked this task to stop")
                state["base"] = int(base) + prep.used
                totals["files_bytes"] += int(built.get("bytes", 0))
                for key in ("files", "files_sent", "files_deleted"):
                    totals[key] = int(totals.get(key, 0)) + int(built.get(key, 0))
                files_base[0] = files_base[1] = int(totals["files"])
                files_seen = (files_base[0], files_base[1])
        if written:
            totals["source_writes"] = writewatch.note(written)
        # Every disk flushed: the server sets Progress to 100 on the result, not on this report.
        tell(total, force=True)
    except _LOST_CONTACT as exc:
        raise LostContact(exc, int(totals["bytes_wire"]) + int(state.get("sent", 0))) from exc
    if stopped.is_set():
        raise TaskStopped("the server asked this task to stop")
    totals["seconds"] = round(time.monotonic() - started, 3)
    return totals


def _advance(tell: "Callable[[int], None]", base: int, n: int) -> None:
    tell(base + n)


def _build(
    task: "dict[str, Any]", vid: str, spec: "dict[str, Any]", *, tls: "ssl.SSLContext | None"
) -> "dict[str, Any]":
    with HttpSender(task["receiver"], vid, task["token"], ssl_context=tls) as http:
        return http.build(spec)


#: under a bandwidth limit, a batch is about this many seconds of the wire
LIMITED_BATCH_SECONDS = 0.5
MiB = 1 << 20


def _batch_sizes(limit_mbit: float, chunk_size: int) -> "tuple[int, int, int]":
    """(read size, max frame, batch bytes) for a send at `limit_mbit` (0 = none).

    Progress counts a batch once the receiver acknowledged it, and the limiter
    lets a whole batch go, then waits its time out: at 10 Mbit/s the default
    8 MiB batch would be one step of progress every 7 s. Under a limit a batch
    is about half a second of the wire (read buffers and frames at most that:
    the sender batches whole buffers), so progress and a stop move in steps
    that small; without one the defaults keep the link full.
    """
    if limit_mbit <= 0:
        return 4 * MiB, 4 * MiB, 8 * MiB
    per_second = limit_mbit * 1e6 / 8
    batch = int(min(8 * MiB, max(4 * chunk_size, per_second * LIMITED_BATCH_SECONDS)))
    frame = max(chunk_size, min(4 * MiB, batch) // chunk_size * chunk_size)
    return frame, frame, max(batch, frame)


def _recorder(cache_dir: "Optional[str]", volume_id: str, chunk_size: int, theirs: int) -> "Optional[Recorder]":
    """A :class:`Recorder` when this agent's hash is not the receiver map's and there is a cache dir."""
    if cache_dir is None or theirs == DEFAULT_HASH:
        return None
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        return Recorder(cache_dir, volume_id, chunk_size, DEFAULT_HASH)
    except OSError as e:
        log.warning("cannot keep chunk hashes in %s (%s): incremental runs send every non-zero chunk", cache_dir, e)
        return None


def _keep(recorder: "Recorder", http: "HttpSender") -> None:
    """After the flush: remember this run's digests with the receiver's map as it is now."""
    try:
        _cs, after = http.fetch_hashes()
        try:
            recorder.keep(after)
        finally:
            after.close()
    except OSError as e:  # the state dir is full, say: the next run sends more, nothing worse
        log.warning("cannot keep this run's chunk hashes (%s): the next run sends every non-zero chunk", e)
        recorder.discard()


def _ranges(disk: "dict[str, Any]", size: "int | None" = None) -> "list[tuple[int, int]]":
    """(offset, length) pieces of a task's disk to copy, within `size` when known."""
    limit = int(disk["size_bytes"]) if size is None else size
    raw = disk.get("ranges")
    if not raw:
        return [(0, limit)]
    out: "list[tuple[int, int]]" = []
    for offset, length in raw:
        offset, length = int(offset), int(length)
        end = min(offset + length, limit)
        if end > offset >= 0:
            out.append((offset, end - offset))
    return out


class _Counting:
    """Counts the wire bytes the receiver acknowledged in this attempt (for :class:`LostContact`)."""

    def __init__(self, inner: "Sender", on_batch: "Callable[[int], None]") -> None:
        self.inner = inner
        self.on_batch = on_batch
        self.sent = 0

    def send_batch(self, frames: "Sequence[bytes]") -> None:
        self.inner.send_batch(frames)
        self.sent += sum(len(f) for f in frames)
        self.on_batch(self.sent)


def _describe(exc: "BaseException") -> "tuple[str, str]":
    if isinstance(exc, DiskChanged):
        return "Agent.DiskChanged", str(exc)
    if isinstance(exc, file_level.FileLevelError):
        return "Agent.FileLevelFailed", str(exc)
    if isinstance(exc, ReceiverError) and exc.code.startswith(("Build.", "Rsync.")):
        return exc.code, exc.message
        return "Receiver.Refused", str(exc)
    if isinstance(exc, FileNotFoundError):
        return "Agent.DiskNotFound", f"The source disk cannot be found: {exc}"
    if isinstance(exc, PermissionError):
        return "Agent.DiskNotReadable", f"The agent may not read the source disk: {exc}"
    if isinstance(exc, OSError):
        return "Agent.IOError", f"Reading the disk or sending its data failed: {exc}"
    return "Agent.SyncFailed", f"{type(exc).__name__}: {exc}"

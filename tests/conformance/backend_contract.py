"""The contract every chunk store :class:`~opensmc.chunkstore.backend.Backend` must keep.

Reuse it by subclassing :class:`BackendContract` in a ``test_*.py`` module and
defining two things:

* a ``backend`` fixture: a fresh, empty backend for each test;
* :meth:`BackendContract.child_source`: Python source that, run in another
  process, binds ``backend`` to the *same* store (for the tests that kill a
  process: a lock must die with it, a write interrupted by ``kill -9`` must
  leave the old object or the new one, never a part).

Nothing here knows about files: an object store backend runs the same tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from opensmc.chunkstore.backend import Backend, LockBusy, ObjectExists, ObjectNotFound, locked

__all__ = ["BackendContract"]

BAD_NAMES = ["", "..", "a/../b", "../a", ".hidden", "a/.hidden", "a//b", "/abs", "a/", ".", "a/./b", "a\0b"]


class BackendContract:
    """Mix into a ``Test...`` class that provides the ``backend`` fixture and :meth:`child_source`."""

    def child_source(self, backend: Any) -> str:
        """Python statements that bind ``backend`` to the same store in a new interpreter."""
        raise NotImplementedError

    def _child(self, backend: Any, body: str) -> subprocess.Popen[str]:
        src = self.child_source(backend) + "\n" + textwrap.dedent(body)
        return subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    # -- whole objects --------------------------------------------------------------------------

    def test_write_read(self, backend: Backend) -> None:
        backend.write("a", b"hello")
        assert backend.read("a") == b"hello"
        assert backend.size("a") == 5
        assert backend.exists("a")

    def test_accepts_bytes_like(self, backend: Backend) -> None:
        backend.write("ba", bytearray(b"xyz"))
        backend.write("mv", memoryview(b"0123456789")[2:5])
        assert backend.read("ba") == b"xyz"
        assert backend.read("mv") == b"234"

    def test_accepts_parts(self, backend: Backend) -> None:
        """A sequence of buffers is one object, its parts in order (how packs are written)."""
        parts: list[bytes | bytearray | memoryview] = [b"head", memoryview(b"--body--")[2:6], bytearray(b"!"), b""]
        backend.write("parts", parts)
        assert backend.read("parts") == b"headbody!"
        many = [bytes([i % 251]) * (i % 7 + 1) for i in range(3000)]  # more than one writev takes
        backend.write("many", many)
        assert backend.read("many") == b"".join(many)
        backend.write("none", [])
        assert backend.read("none") == b""

    def test_empty_object(self, backend: Backend) -> None:
        backend.write("empty", b"")
        assert backend.exists("empty")
        assert backend.read("empty") == b""
        assert backend.size("empty") == 0
        assert backend.list("") == ["empty"]

    def test_read_range(self, backend: Backend) -> None:
        data = bytes(range(256)) * 40
        backend.write("x/r", data)
        assert backend.read("x/r", 0, 10) == data[:10]
        assert backend.read("x/r", 100, 1000) == data[100:1100]
        assert backend.read("x/r", 5000) == data[5000:]
        assert backend.read("x/r", len(data) - 3, 3) == data[-3:]
        assert backend.read("x/r", 7, 0) == b""

    def test_overwrite_replaces(self, backend: Backend) -> None:
        backend.write("o", b"first version, longer")
        backend.write("o", b"second")
        assert backend.read("o") == b"second"
        assert backend.size("o") == 6

    def test_missing(self, backend: Backend) -> None:
        assert not backend.exists("nope")
        with pytest.raises(ObjectNotFound):
            backend.read("nope")
        with pytest.raises(ObjectNotFound):
            backend.read("dir/nope", 0, 1)
        with pytest.raises(ObjectNotFound):
            backend.size("nope")
        assert isinstance(ObjectNotFound("x"), KeyError)

    def test_a_folder_is_not_an_object(self, backend: Backend) -> None:
        backend.write("dir/child", b"1")
        assert not backend.exists("dir")
        with pytest.raises(ObjectNotFound):
            backend.read("dir")

    def test_exclusive_never_replaces(self, backend: Backend) -> None:
        backend.write("e", b"one", exclusive=True)
        with pytest.raises(ObjectExists):
            backend.write("e", b"two", exclusive=True)
        assert backend.read("e") == b"one"
        assert backend.list("") == ["e"]  # and the refused write left nothing behind
        backend.write("e", b"three")  # a plain write still may
        assert backend.read("e") == b"three"

    def test_exclusive_in_a_folder(self, backend: Backend) -> None:
        backend.write("snapshots/img-1", b"a", exclusive=True)
        with pytest.raises(ObjectExists):
            backend.write("snapshots/img-1", b"b", exclusive=True)
        assert backend.read("snapshots/img-1") == b"a"

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_bad_names_refused(self, backend: Backend, name: str) -> None:
        with pytest.raises(ValueError):
            backend.write(name, b"x")
        with pytest.raises(ValueError):
            backend.write(name, b"x", exclusive=True)
        with pytest.raises(ValueError):
            backend.read(name)
        with pytest.raises(ValueError):
            backend.delete(name)
        with pytest.raises(ValueError):
            backend.exists(name)
        with pytest.raises(ValueError):
            backend.size(name)
        assert backend.list("") == []

    @pytest.mark.parametrize("name", ["", "..", ".x", "a/../b", "a\0"])
    def test_bad_lock_names_refused(self, backend: Backend, name: str) -> None:
        with pytest.raises(ValueError):
            backend.lock(name, exclusive=False)

    # -- listing ------------------------------------------------------------------------------------

    def test_list_prefixes(self, backend: Backend) -> None:
        names = ["config", "data/ab/abc1", "data/ab/abc2", "data/cd/cd00", "index/abc1", "index/cd00", "indexes"]
        for n in reversed(names):
            backend.write(n, n.encode())
        assert backend.list("") == sorted(names)
        assert backend.list("data/") == ["data/ab/abc1", "data/ab/abc2", "data/cd/cd00"]
        assert backend.list("data/ab/") == ["data/ab/abc1", "data/ab/abc2"]
        assert backend.list("data/ab/abc2") == ["data/ab/abc2"]
        assert backend.list("index/") == ["index/abc1", "index/cd00"]  # not "indexes"
        assert backend.list("index") == ["index/abc1", "index/cd00", "indexes"]
        assert backend.list("data/c") == ["data/cd/cd00"]  # a prefix of the name, across a "/"
        assert backend.list("data/ab/abc") == ["data/ab/abc1", "data/ab/abc2"]
        assert backend.list("data/cd/c") == ["data/cd/cd00"]
        assert backend.list("nothing/") == []
        assert backend.list("conf") == ["config"]

    def test_list_is_sorted(self, backend: Backend) -> None:
        names = [f"s/{i:04x}" for i in (7, 3, 255, 0, 4096, 16)] + ["s/B", "s/a", "s/A"]
        for n in names:
            backend.write(n, b"")
        assert backend.list("s/") == sorted(names)

    def test_list_deeply_nested_and_odd_part_names(self, backend: Backend) -> None:
        # Any part name that is allowed is an ordinary name: nothing is reserved.
        names = ["a/b/c/d/e", "a/locks/x", "a/tmp/y", "a/b/c.tmp", "z/locks", "a/x..y"]
        for n in names:
            backend.write(n, b"1")
        assert backend.list("a/") == sorted(n for n in names if n.startswith("a/"))
        assert backend.list("z/") == ["z/locks"]
        for n in names:
            assert backend.read(n) == b"1"

    def test_list_after_delete(self, backend: Backend) -> None:
        backend.write("d/1", b"1")
        backend.write("d/2", b"2")
        backend.delete("d/1")
        assert backend.list("d/") == ["d/2"]
        backend.delete("d/2")
        assert backend.list("d/") == []
        assert backend.list("") == []

    def test_locks_are_not_objects(self, backend: Backend) -> None:
        held = backend.lock("gc", exclusive=False)
        try:
            assert backend.list("") == []
            assert not backend.exists("gc")
            assert not backend.exists("locks/gc")
            # and no object name is reserved for them: an object "locks/gc" is just an object
            backend.write("locks/gc", b"obj")
            with pytest.raises(LockBusy):
                backend.lock("gc", exclusive=True, blocking=False)
        finally:
            held.release()
        assert backend.list("") == ["locks/gc"]
        assert backend.read("locks/gc") == b"obj"
        backend.lock("gc", exclusive=True, blocking=False).release()

    # -- delete ---------------------------------------------------------------------------------------

    def test_delete(self, backend: Backend) -> None:
        backend.write("k/v", b"1")
        backend.delete("k/v")
        assert not backend.exists("k/v")
        with pytest.raises(ObjectNotFound):
            backend.read("k/v")
        backend.delete("k/v")  # gone already: not an error
        backend.delete("never/was")
        backend.write("k/v", b"again", exclusive=True)  # the name is free again
        assert backend.read("k/v") == b"again"

    # -- atomicity ----------------------------------------------------------------------------------

    def test_write_killed_midway_leaves_old_or_new(self, backend: Backend) -> None:
        """A writer killed by SIGKILL while it rewrites a big object: the object is one whole version."""
        size = 8 * 1024 * 1024
        child = self._child(
            backend,
            f"""
            import sys
            size = {size}
            backend.write("big/obj", b"A" * size)
            i = 0
            while True:
                backend.write("big/obj", bytes([66 + i % 2]) * size)  # B, C, B, C...
                print("wrote", flush=True)
                i += 1
            """,
        )
        assert child.stdout is not None
        try:
            for _ in range(2):
                assert child.stdout.readline() == "wrote\n"
            os.kill(child.pid, signal.SIGKILL)  # almost surely in the middle of a write
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
            if child.stdin is not None:
                child.stdin.close()
        assert child.returncode == -signal.SIGKILL
        assert backend.list("") == ["big/obj"]  # no partial or temporary object is listed
        data = backend.read("big/obj")
        assert len(data) == size == backend.size("big/obj")
        assert data in (b"B" * size, b"C" * size)

    # -- locks --------------------------------------------------------------------------------------

    def test_shared_locks_coexist(self, backend: Backend) -> None:
        a = backend.lock("gc", exclusive=False)
        b = backend.lock("gc", exclusive=False, blocking=False)
        with pytest.raises(LockBusy):
            backend.lock("gc", exclusive=True, blocking=False)
        a.release()
        with pytest.raises(LockBusy):
            backend.lock("gc", exclusive=True, blocking=False)
        b.release()
        backend.lock("gc", exclusive=True, blocking=False).release()

    def test_exclusive_excludes_everyone(self, backend: Backend) -> None:
        ex = backend.lock("gc", exclusive=True, blocking=False)
        with pytest.raises(LockBusy):
            backend.lock("gc", exclusive=False, blocking=False)
        with pytest.raises(LockBusy):
            backend.lock("gc", exclusive=True, blocking=False)
        backend.lock("other", exclusive=True, blocking=False).release()  # locks are independent by name
        ex.release()
        ex.release()  # releasing twice is harmless
        backend.lock("gc", exclusive=False, blocking=False).release()
        assert isinstance(LockBusy(), BlockingIOError)

    def test_locked_context_manager(self, backend: Backend) -> None:
        with locked(backend, "gc", exclusive=True):
            with pytest.raises(LockBusy):
                backend.lock("gc", exclusive=False, blocking=False)
        backend.lock("gc", exclusive=True, blocking=False).release()

    def test_lock_across_processes(self, backend: Backend) -> None:
        """Shared here + shared there is fine; exclusive there is refused while shared here."""
        mine = backend.lock("gc", exclusive=False)
        try:
            child = self._child(
                backend,
                """
                from opensmc.chunkstore.backend import LockBusy
                backend.lock("gc", exclusive=False, blocking=False).release()
                try:
                    backend.lock("gc", exclusive=True, blocking=False)
                except LockBusy:
                    print("busy")
                else:
                    print("got it")
                """,
            )
            out, _ = child.communicate()
            assert child.returncode == 0
            assert out == "busy\n"
        finally:
            mine.release()

    @pytest.mark.parametrize("exclusive", [False, True])
    def test_lock_dies_with_its_process(self, backend: Backend, exclusive: bool) -> None:
        child = self._child(
            backend,
            f"""
            import sys
            held = backend.lock("gc", exclusive={exclusive})
            print("held", flush=True)
            sys.stdin.read()  # until killed
            """,
        )
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline() == "held\n"
            with pytest.raises(LockBusy):
                backend.lock("gc", exclusive=True, blocking=False)
            if exclusive:
                with pytest.raises(LockBusy):
                    backend.lock("gc", exclusive=False, blocking=False)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
            child.stdin.close()
        backend.lock("gc", exclusive=True, blocking=False).release()

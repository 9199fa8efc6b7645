"""Incremental runs for an agent whose chunk hash is not the receiver's (no xxhash: blake2b-128).

The receiver's hash map names chunks by xxh3-128, the chunk store's hash; an
agent with only the standard library hashes with blake2b-128 and so cannot
compare. What it can do is remember, per volume, the pair of maps of its last
completed run: its own digest of every non-zero chunk it read (``own.bin``,
16 bytes at ``16 * chunk index``, a sparse file) and the receiver's map right
after that run's flush (``theirs.map``, the encoded map). In the next run a
chunk counts as held unchanged only when **both** hold: the receiver still has
the digest it had then (so it still holds the bytes the agent hashed), and
the agent's digest of the chunk now equals the one it took then. Anything
else (a receiver that lost or rewrote the chunk, a chunk changed at the
source, no remembered pair) is sent; a wrong skip would need a hash collision.

The pair is replaced only after a run's flush, as one directory renamed into
place: a crash leaves the previous pair or the new one, each consistent
(a previous pair is merely stale: the chunks the receiver got since differ
from it and are sent again). Memory stays flat: everything is read with
``os.pread``, one read buffer's window at a time. Disk: about 40 bytes per
non-zero chunk of the source in the state directory (2.5 MiB per GiB of data
at 16 KiB chunks). Python 3.6 compatible, standard library only.
"""

import json
import os
import shutil
from typing import BinaryIO, Dict, Iterator, Mapping, Optional

from opensmc.wire.frames import DIGEST_SIZE, HashFile

__all__ = ["OwnHashes", "Recorder"]

_NONE = bytes(DIGEST_SIZE)
#: what a held chunk not proven unchanged maps to: never equal to a 16-byte digest
UNKNOWN = b""


class OwnHashes(Mapping[int, bytes]):
    """The receiver's map as seen in the agent's own hash family (the pipeline's ``previous``).

    Every chunk the receiver holds is present (so zero frames go where they
    must); its value is the agent's remembered digest where the pair proves it
    unchanged, :data:`UNKNOWN` otherwise.
    """

    def __init__(self, current: HashFile, hash_id: int, then: "Optional[HashFile]", own: "Optional[BinaryIO]") -> None:
        self.hash_id = hash_id
        self.chunk_size = current.chunk_size
        self._current = current
        self._then = then
        self._own = own

    def window(self, lo: int, hi: int) -> "Dict[int, bytes]":
        now = self._current.window(lo, hi)
        if self._then is None or self._own is None or not now:
            return dict.fromkeys(now, UNKNOWN)
        then = self._then.window(lo, hi)
        own = os.pread(self._own.fileno(), (hi - lo) * DIGEST_SIZE, lo * DIGEST_SIZE)
        out: "Dict[int, bytes]" = {}
        for i, digest in now.items():
            mine = own[(i - lo) * DIGEST_SIZE : (i - lo + 1) * DIGEST_SIZE]
            ok = then.get(i) == digest and len(mine) == DIGEST_SIZE and mine != _NONE
            out[i] = mine if ok else UNKNOWN
        return out

    def __getitem__(self, idx: int) -> bytes:
        got = self.window(idx, idx + 1)
        if idx in got:
            return got[idx]
        raise KeyError(idx)

    def __iter__(self) -> "Iterator[int]":
        return iter(self._current)

    def __len__(self) -> int:
        return len(self._current)

    def close(self) -> None:
        for f in (self._then, self._own):
            if f is not None:
                f.close()


class Recorder:
    """One volume's remembered pair: read the last one, record this run's digests, keep them after a flush."""

    def __init__(self, cache_dir: str, volume_id: str, chunk_size: int, hash_id: int) -> None:
        self.dir = os.path.join(cache_dir, volume_id)
        self.hash_id = hash_id
        self.meta = {"volume_id": volume_id, "chunk_size": chunk_size, "hash_id": hash_id}
        self._new = self.dir + ".new"
        shutil.rmtree(self._new, ignore_errors=True)
        os.makedirs(self._new, mode=0o700)
        self._own = open(os.path.join(self._new, "own.bin"), "w+b")

    def previous(self, current: HashFile) -> OwnHashes:
        """``current`` (the receiver's map now) seen through the pair of the last completed run, if any."""
        then: "Optional[HashFile]" = None
        own: "Optional[BinaryIO]" = None
        try:
            with open(os.path.join(self.dir, "meta.json"), encoding="utf-8") as f:
                if json.load(f) == self.meta:
                    own = open(os.path.join(self.dir, "own.bin"), "rb")
                    then = HashFile.open(open(os.path.join(self.dir, "theirs.map"), "rb"))
        except (OSError, ValueError):  # none yet, or unreadable: nothing is proven unchanged
            for opened in (then, own):
                if opened is not None:
                    opened.close()
            then = own = None
        return OwnHashes(current, self.hash_id, then, own)

    def record(self, idx: int, digest: bytes) -> None:
        """This run's digest of non-zero chunk ``idx`` (from the pipeline's encoder)."""
        os.pwrite(self._own.fileno(), digest, idx * DIGEST_SIZE)

    def keep(self, after_flush: HashFile) -> None:
        """The run is flushed: its digests and the receiver's map now become the remembered pair."""
        self._own.flush()
        os.fsync(self._own.fileno())
        self._own.close()
        with open(os.path.join(self._new, "theirs.map"), "wb") as f:
            after_flush.write_to(f)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(self._new, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(self.meta, f)
            f.flush()
            os.fsync(f.fileno())
        old = self.dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.dir):
            os.rename(self.dir, old)
        os.rename(self._new, self.dir)
        shutil.rmtree(old, ignore_errors=True)
        fd = os.open(os.path.dirname(self.dir) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """The run did not complete: forget what it recorded (the last pair stays)."""
        self._own.close()
        shutil.rmtree(self._new, ignore_errors=True)

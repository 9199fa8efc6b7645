"""What this process's receiver has taken in: counters for ``/metrics`` (``api/ops.py``).

Plain integers under a lock rather than prometheus_client objects, so that
the receiver does not depend on the metrics library and several apps in one
process (tests) share nothing else. A receiver running as a process of its
own (``--roles receiver``) counts too, but serves no ``/metrics`` page.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class ReceiverStats:
    frames: int = 0  #: frames accepted (verified and written into the store)
    plain_bytes: int = 0  #: bytes those frames cover once decoded
    wire_bytes: int = 0  #: request body bytes read, accepted or not
    rejected: dict[str, int] = field(default_factory=dict)  #: frames refused, by protocol error code
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def accepted(self, frames: int, plain: int, wire: int) -> None:
        with self._lock:
            self.frames += frames
            self.plain_bytes += plain
            self.wire_bytes += wire

    def refused(self, code: str) -> None:
        with self._lock:
            self.rejected[code] = self.rejected.get(code, 0) + 1

    def snapshot(self) -> tuple[int, int, int, dict[str, int]]:
        with self._lock:
            return self.frames, self.plain_bytes, self.wire_bytes, dict(self.rejected)


STATS = ReceiverStats()

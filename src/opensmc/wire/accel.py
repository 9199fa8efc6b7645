"""The optional accelerators of the wire format and the agent: xxhash, zstandard, numpy.

The agent runs on Python 3.6+ with the standard library only (docs/agent.md);
where these modules happen to be importable it uses them, and otherwise falls
back to ``hashlib.blake2b``, ``zlib`` and ``bytes`` comparison. The server
always has all three (they are in its dependencies).

``OPENSMC_AGENT_PURE=1`` in the environment makes this build behave as if none
were installed: how the tests and ``bench/bench_agent_fallback.py`` run the
fallbacks on a machine that has the accelerators. Python 3.6 compatible: no
``from __future__ import annotations`` (see docs/agent.md).
"""

import os
from types import ModuleType
from typing import Optional

__all__ = ["PURE", "numpy", "xxhash", "zstandard"]

#: the accelerators are switched off by the environment
PURE = os.environ.get("OPENSMC_AGENT_PURE", "") not in ("", "0")


def _optional(name: str) -> Optional[ModuleType]:
    if PURE:
        return None
    try:
        return __import__(name)
    except ImportError:
        return None


xxhash = _optional("xxhash")
zstandard = _optional("zstandard")
numpy = _optional("numpy")

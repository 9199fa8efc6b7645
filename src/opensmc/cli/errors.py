"""One error format and one set of exit codes for every `opensmc` command.

Every user-facing failure is one line on stderr, ``opensmc COMMAND: error: MESSAGE``
(the format argparse already uses for a bad command line), and one of these
exit codes:

====  ===========================================================================
0     success
1     the server or the operation said no: an SMC error answer, a failed verify
2     usage or configuration: bad arguments, unknown action or parameter, no
      credentials, a missing file or directory
3     the server cannot be reached (connection refused, TLS, timeout)
70    an internal error (a bug): the message names it; ``OPENSMC_DEBUG=1`` shows the traceback
130   interrupted (Ctrl-C)
141   the output pipe closed early (``opensmc image list --json | head``)
====  ===========================================================================
"""

from __future__ import annotations

from typing import Any

OK = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3
INTERNAL = 70
INTERRUPTED = 130
BROKEN_PIPE = 141


class CliError(Exception):
    """A failure to report in one line; ``exit_code`` says which kind it is."""

    exit_code = FAILED


class UsageError(CliError):
    exit_code = USAGE


class UnreachableError(CliError):
    exit_code = UNREACHABLE


class ApiError(CliError):
    """The server answered with an SMC error body."""

    exit_code = FAILED

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.code = str(body.get("Code", ""))
        self.message = str(body.get("Message", ""))
        self.request_id = str(body.get("RequestId", "") or "-")
        super().__init__(f"{self.code}: {self.message} (HTTP {status}, RequestId {self.request_id})")

"""Errors that carry an SMC error code.

Every error a user can see is an :class:`SmcError`: it knows its SMC error
``code``, its HTTP status and a message that says what to fix. The API layer
renders it as ``{RequestId, HostId, Code, Message, Recommend}``; the CLI prints
it. Nothing else reaches a user.

    SmcError
    ├── MissingParameter          400 MissingParameter / MissingXxx
    ├── InvalidParameter          400 InvalidParameter / InvalidXxx
    ├── NotFound                  404 InvalidXxxId.NotFound
    ├── InvalidJobStatus          400 ReplicationJob.InvalidStatus
    ├── InvalidSourceState        400 SourceServerState.Invalid
    ├── Conflict                  400 (duplicate names, quotas, relations)
    ├── AuthError                 400/403/404 signature and key errors
    ├── ServerDiskFull            503 Server.DiskFull
    └── InternalError             500 InternalError
"""

from __future__ import annotations

from collections.abc import Iterable


class SmcError(Exception):
    """An error with an SMC code, an HTTP status and a user-facing message."""

    code: str = "InternalError"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code!r}, http_status={self.http_status}, message={self.message!r})"


class MissingParameter(SmcError):
    """A required parameter is absent."""

    code = "MissingParameter"
    http_status = 400

    def __init__(self, name: str, *, code: str | None = None) -> None:
        super().__init__(
            f'The input parameter "{name}" that is mandatory for processing this request is not supplied.',
            code=code,
        )
        self.parameter = name


class InvalidParameter(SmcError):
    """A parameter has the wrong type, range or format."""

    code = "InvalidParameter"
    http_status = 400

    def __init__(self, name: str, why: str = "", *, code: str | None = None) -> None:
        msg = f'The specified parameter "{name}" is not valid.'
        if why:
            msg += f" {why}"
        super().__init__(msg, code=code)
        self.parameter = name


class NotFound(SmcError):
    """An ID names nothing this account owns."""

    http_status = 404

    def __init__(self, param: str, value: str, *, code: str) -> None:
        super().__init__(f'The specified {param} "{value}" does not exist.', code=code)


class InvalidJobStatus(SmcError):
    """The replication job is not in a status that allows the operation."""

    code = "ReplicationJob.InvalidStatus"
    http_status = 400

    def __init__(self, current: str, allowed: Iterable[str]) -> None:
        super().__init__(
            f"The specified replication job status: {current} is invalid. "
            f"This operation can only be performed in the following status: {','.join(allowed)}."
        )
        self.current = current


class InvalidSourceState(SmcError):
    """The migration source is not in a state that allows the operation."""

    code = "SourceServerState.Invalid"
    http_status = 400

    def __init__(self, current: str, allowed: Iterable[str]) -> None:
        super().__init__(
            f"The specified source server status: {current} is invalid. "
            f"This operation can only be performed in the following status: {','.join(allowed)}."
        )
        self.current = current


class Conflict(SmcError):
    """The request clashes with existing state (duplicate name, quota, relation)."""

    http_status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class AuthError(SmcError):
    """The request is not signed, or not signed by a known key."""

    http_status = 400

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message, code=code, http_status=http_status)


class ServerDiskFull(SmcError):
    """The server's disk has no room for what the call must write (the database, the image store)."""

    code = "Server.DiskFull"
    http_status = 503


class InternalError(SmcError):
    """Something went wrong on our side; the RequestId is in the server log."""

    code = "InternalError"
    http_status = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "An error occurred while processing your request. Please try again. "
            "If the problem still exists, please submit a ticket."
        )

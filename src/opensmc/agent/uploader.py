"""The agent's HTTP client for the receiver protocol (docs/protocol.md), on ``http.client``.

``http.client`` is the fastest Python client for big POSTs (PERF_FLOORS.md:
2.8 GB/s on loopback against httpx's 1.9), and a batch of frames is sent as
an iterable body with a Content-Length, so the frames are never joined into
one more copy. One keep-alive connection per :class:`HttpSender`; a batch that
fails on a dropped connection is retried once on a fresh one, which is safe
because replayed frames are no-ops on the receiver.
"""

import http.client
import json
import os
import ssl
import tempfile
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit

from opensmc.wire.frames import HashFile

__all__ = ["HttpSender", "ReceiverError", "VolumeInfo"]

PROTOCOL_VERSION = "1"
_VAR_TMP = "/var/tmp"


class ReceiverError(Exception):
    """The receiver answered with an error: ``status``, protocol ``code`` and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class VolumeInfo(NamedTuple):
    volume_id: str
    size: int
    chunk_size: int


class HttpSender:
    """A :class:`opensmc.agent.pipeline.Sender` that POSTs frames to one staging volume."""

    def __init__(
        self,
        base_url: str,
        volume_id: str,
        token: str,
        *,
        timeout: float = 300.0,
        ssl_context: "ssl.SSLContext | None" = None,
        spool_dir: "Optional[str]" = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"receiver URL must be http(s)://host[:port], got {base_url!r}")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port
        self._prefix = url.path.rstrip("/") + f"/v1/volumes/{quote(volume_id, safe='')}"
        self._headers = {"Authorization": f"Bearer {token}", "X-OpenSMC-Protocol": PROTOCOL_VERSION}
        self._timeout = timeout
        self._ssl = ssl_context
        self._conn: "http.client.HTTPConnection | None" = None
        # the receiver's hash map is spooled here: a disk-backed directory (not /tmp, often tmpfs: memory)
        self._spool_dir = spool_dir or (_VAR_TMP if os.access(_VAR_TMP, os.W_OK) else None)
        self.volume_id = volume_id

    def _connect(self) -> "http.client.HTTPConnection":
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "HttpSender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        body: "Sequence[bytes] | None" = None,
        accept: "str | None" = None,
        read: "Optional[Callable[[http.client.HTTPResponse], object]]" = None,
    ) -> "tuple[int, str, bytes]":
        headers = dict(self._headers)
        if accept:
            headers["Accept"] = accept
        length = sum(len(b) for b in body) if body is not None else 0
        headers["Content-Length"] = str(length)
        if body is not None:
            headers["Content-Type"] = "application/vnd.opensmc.frames.v1"
        for attempt in (0, 1):
            conn = self._connect()
            try:
                conn.putrequest(method, self._prefix + path, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                try:
                    for part in body or ():
                        conn.send(part)
                except (BrokenPipeError, ConnectionResetError):
                    # The receiver may refuse a bad frame before the body ends and close; its
                    # answer is still waiting in our socket buffer.
                    pass
                resp = conn.getresponse()
                if read is not None and resp.status == 200:
                    read(resp)  # streamed by the caller (it reads the whole body)
                    data = b""
                else:
                    data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, resp.getheader("Content-Type", ""), data
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
            except BaseException:
                self.close()  # a body read halfway leaves the connection unusable
                raise
        raise AssertionError("unreachable")

    def _check(self, status: int, data: bytes) -> None:
        if status < 300:
            return
        try:
            err: "dict[str, Any]" = json.loads(data)
            raise ReceiverError(status, str(err.get("code")), str(err.get("message")))
        except ValueError:
            raise ReceiverError(status, "Http.Error", data[:200].decode("utf-8", "replace")) from None

    def info(self) -> "VolumeInfo":
        status, _, data = self._request("GET", "")
        self._check(status, data)
        doc = json.loads(data)
        return VolumeInfo(str(doc["volume_id"]), int(doc["size"]), int(doc["chunk_size"]))

    def fetch_hashes(self) -> "Tuple[int, HashFile]":
        """The receiver's chunk map: ``(chunk_size, {index: digest})``; the pipeline's ``previous``.

        Spooled to a temporary file (in ``spool_dir``) as it arrives and searched there, so the
        agent's memory stays the same whatever the disk's size (``HashFile``). Close it when done.
        """
        got: "List[HashFile]" = []

        def receive(resp: "http.client.HTTPResponse") -> None:
            spool = tempfile.TemporaryFile(prefix="opensmc-hashes-", dir=self._spool_dir)
            try:
                got.append(HashFile.receive(resp, spool))
            except BaseException:
                spool.close()
                raise

        status, _, data = self._request("GET", "/hashes", accept="application/vnd.opensmc.hashmap.v1", read=receive)
        self._check(status, data)
        if not got:
            raise ReceiverError(status, "Http.Error", "the receiver answered its hash map with no body")
        return got[0].chunk_size, got[0]

    def send_batch(self, frames: "Sequence[bytes]") -> None:
        status, _, data = self._request("POST", "/frames", body=frames)
        self._check(status, data)

    def build(self, spec: "dict[str, Any]") -> "dict[str, Any]":
        """A partition copied file by file: have the receiver build its filesystem (receiver/filesystems.py).

        It takes about as long as writing the partition's data once: the answer may take minutes.
        """
        conn = self._connect()
        old = self._timeout
        body = json.dumps(spec).encode()
        headers = dict(self._headers, **{"Content-Type": "application/json", "Content-Length": str(len(body))})
        try:
            if conn.sock is not None:
                conn.sock.settimeout(None)
            conn.timeout = None
            conn.request("POST", self._prefix + "/build", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.timeout = old
            self.close()
        self._check(resp.status, data)
        return dict(json.loads(data))

    def flush(self) -> int:
        """Make everything sent durable on the receiver; returns the chunks it holds."""
        status, _, data = self._request("POST", "/flush")
        self._check(status, data)
        return int(json.loads(data)["chunks"])

"""rsync's remote shell for file-level replication: a byte pipe to the receiver over one HTTP request.

``agent/files.py`` runs ``rsync -e "<python> -m opensmc.agent.tunnel" SRC/
opensmc:tree``; rsync then starts this program as ``tunnel opensmc rsync
--server ARGS . tree`` and speaks its protocol on our stdin and stdout. We
send the remote command to the receiver in ``POST /v1/volumes/<volume>/rsync``
(``X-OpenSMC-Rsync-Args``, base64 of a JSON list), authenticated with the
run's data credential like every other receiver request, then stream stdin as
the chunked request body while the chunked response body goes to stdout: the
receiver pipes both to its own ``rsync --server`` (``receiver/rsync.py``),
which it starts with arguments it checks itself, writing into the
partition's tree and nowhere else.

Over plain TCP (an ``http://`` receiver) the request asks to upgrade the
connection (``Upgrade: opensmc-rsync``, no body): the receiver answers ``101
Switching Protocols`` and hands the socket to its ``rsync --server``, and
from then on the bytes are rsync's own, copied as they are by two threads
(:func:`raw`), one a direction, each blocking on its side. No chunk framing,
and no process of the receiver's in the way: the relay through the
receiver's event loop cost about a core while rsync ran. A receiver that
answers the upgrade with 200 predates it: the tunnel asks again, chunked.

Over TLS (``https://``) the stream is chunked HTTP both ways (:func:`pipe`):
one thread, one ``select`` loop, non-blocking everywhere: rsync's protocol
sends both ways at once, so a blocking write in either direction could wait
on the other forever. TLS goes through the same loop (a non-blocking
``SSLSocket``; ``pending()`` says what it decrypted already).

The connection's details come in the environment (``OPENSMC_TUNNEL_URL``,
``OPENSMC_TUNNEL_TOKEN``, ``OPENSMC_TUNNEL_CA``), not on the command line,
where every user of the machine could read the credential.

The run's bandwidth limit is applied here, to what goes up (:class:`Throttle`),
not by rsync's ``--bwlimit``, which is fixed when rsync starts: the agent
rewrites the file named by ``OPENSMC_TUNNEL_LIMIT`` (bytes per second, 0 for
none) when the server changes the limit, and the tunnel reads it again within
:attr:`Throttle.CHECK` seconds, so a change applies while rsync runs.
Python 3.6, standard library only (it runs from the agent's zipapp).
"""

import base64
import json
import os
import select
import socket
import ssl
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

__all__ = ["ENV_CA", "ENV_LIMIT", "ENV_TOKEN", "ENV_URL", "ENV_VOLUME", "Throttle", "main", "write_limit"]

ENV_URL = "OPENSMC_TUNNEL_URL"
ENV_TOKEN = "OPENSMC_TUNNEL_TOKEN"
ENV_CA = "OPENSMC_TUNNEL_CA"
ENV_VOLUME = "OPENSMC_TUNNEL_VOLUME"
ENV_LIMIT = "OPENSMC_TUNNEL_LIMIT"
_READ = 256 * 1024
_HIGH = 4 * 1024 * 1024  # stop reading a side while this much waits to be written to the other
_IDLE = 600.0  # seconds without a byte either way: the receiver is gone
UPGRADE = "opensmc-rsync"  # the Upgrade token of the raw stream (receiver/rsync.py)


class TunnelError(Exception):
    pass


def write_limit(path: str, bytes_per_second: float) -> None:
    """Set the limit a tunnel reading ``path`` holds what goes up to (0: none); atomic, so a tunnel never
    reads half a number."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{max(0.0, bytes_per_second):.0f}\n")
    os.replace(tmp, path)


class Throttle:
    """What goes up, held to the bytes per second that the file at ``path`` says (a token bucket).

    :meth:`delay` says how long to wait before the next read of rsync's output, :meth:`spend`
    counts what was read. The file is read again every :attr:`CHECK` seconds at most. No file, or
    0 in it: no limit."""

    CHECK = 0.2  #: seconds between looks at the file: how late a new limit applies
    BURST = 0.25  #: seconds of the rate that may go at once after a quiet spell

    def __init__(self, path: "Optional[str]", clock: "Any" = time.monotonic) -> None:
        self.path = path
        self.rate = 0.0  # bytes per second; 0: none
        self._clock = clock
        self._next_look = 0.0
        self._credit = 0.0
        self._last = clock()

    def _look(self, now: float) -> None:
        if self.path is None or now < self._next_look:
            return
        self._next_look = now + self.CHECK
        try:  # read every time: a file replaced within a clock tick can have the old one's inode and mtime
            with open(self.path) as f:
                rate = max(0.0, float(f.read().strip() or 0))
        except (OSError, ValueError):
            return  # the agent is replacing it: the next look reads the new one
        if rate != self.rate:
            self.rate = rate
            self._credit = min(self._credit, rate * self.BURST)

    def delay(self) -> float:
        """Seconds to wait before reading more to send: 0 now."""
        now = self._clock()
        self._look(now)
        elapsed, self._last = now - self._last, now
        if self.rate <= 0:
            return 0.0
        self._credit = min(self._credit + elapsed * self.rate, self.rate * self.BURST)
        if self._credit > 0:
            return 0.0
        # at least a millisecond (no busy loop on a debt of a few bytes), at most CHECK (to look at the file)
        return max(0.001, min(-self._credit / self.rate, self.CHECK))

    def read_size(self, most: int) -> int:
        """How much to read at once: at a low rate, small reads keep the flow even."""
        return most if self.rate <= 0 else max(4096, min(most, int(self.rate * 0.05)))

    def spend(self, n: int) -> None:
        if self.rate > 0:
            self._credit -= n


class _Chunked:
    """Decodes an HTTP/1.1 chunked body as it arrives."""

    SIZE, DATA, CRLF, DONE = range(4)

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = self.SIZE
        self.left = 0  # bytes of the current chunk still to come

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while True:
            if self.state == self.SIZE:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > 1024:
                        raise TunnelError("bad chunk size line from the receiver")
                    break
                line = bytes(self.buf[:end]).split(b";")[0].strip()
                del self.buf[: end + 2]
                try:
                    self.left = int(line, 16)
                except ValueError:
                    raise TunnelError(f"bad chunk size from the receiver: {line[:40]!r}") from None
                self.state = self.DATA if self.left else self.DONE  # trailers, if any, are not needed
            elif self.state == self.DATA:
                if not self.buf:
                    break
                take = min(self.left, len(self.buf))
                out += self.buf[:take]
                del self.buf[:take]
                self.left -= take
                if not self.left:
                    self.state = self.CRLF
            elif self.state == self.CRLF:
                if len(self.buf) < 2:
                    break
                del self.buf[:2]
                self.state = self.SIZE
            else:
                break
        return bytes(out)


def _connect(url: str, ca: "Optional[str]") -> "socket.socket":
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    sock = socket.create_connection((u.hostname, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        sock = ctx.wrap_socket(sock, server_hostname=u.hostname)
    return sock


def _request(url: str, token: str, command: "List[str]", upgrade: bool = False) -> bytes:
    u = urlsplit(url)
    volume = os.environ.get(ENV_VOLUME, "")
    path = u.path.rstrip("/") + "/v1/volumes/{}/rsync".format(quote(volume, safe=""))
    args = base64.b64encode(json.dumps(command).encode()).decode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {u.netloc}",
        f"Authorization: Bearer {token}",
        "X-OpenSMC-Protocol: 1",
        f"X-OpenSMC-Rsync-Args: {args}",
        "Content-Type: application/octet-stream",
    ]
    if upgrade:
        head += ["Connection: Upgrade", "Upgrade: " + UPGRADE, "Content-Length: 0"]
    else:
        head += ["Transfer-Encoding: chunked"]
    head += ["", ""]
    return "\r\n".join(head).encode("latin-1")


def _headers(raw: bytes) -> "Tuple[int, Dict[str, str]]":
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise TunnelError(f"not an HTTP answer from the receiver: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


def pipe(
    sock: "socket.socket", request: bytes, fd_in: int = 0, fd_out: int = 1, throttle: "Optional[Throttle]" = None
) -> None:
    """Send ``request``, then stdin as its chunked body; the answer's chunked body goes to stdout.

    ``throttle`` holds what is read from stdin to its rate (the run's bandwidth limit)."""
    throttle = throttle or Throttle(None)
    sock.setblocking(False)
    for fd in (fd_in, fd_out):
        os.set_blocking(fd, False)
    up = bytearray(request)  # bytes for the socket
    down = bytearray()  # bytes for stdout
    head = bytearray()
    status = None  # type: Optional[int]
    error_body = bytearray()
    body = _Chunked()
    in_open = True
    while True:
        if status is not None and status != 200 and body.done:
            break
        if body.done and not down:
            return
        rlist: "List[Any]" = []
        wait = throttle.delay() if in_open and len(up) < _HIGH else 0.0
        if in_open and len(up) < _HIGH and not wait:
            rlist.append(fd_in)
        if len(down) < _HIGH:
            rlist.append(sock)
        wlist: "List[Any]" = []
        if up:
            wlist.append(sock)
        if down:
            wlist.append(fd_out)
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        r, w, _x = select.select(rlist, wlist, [], 0 if pending else (wait or _IDLE))
        if not (r or w or pending or wait):
            raise TunnelError(f"no data from the receiver for {_IDLE:.0f} s")
        if fd_in in r:
            piece = os.read(fd_in, throttle.read_size(_READ))
            throttle.spend(len(piece))
            if piece:
                up += b"%x\r\n" % len(piece) + piece + b"\r\n"
            else:
                up += b"0\r\n\r\n"
                in_open = False
        if sock in r or (pending and sock in rlist):
            data = None  # type: Optional[bytes]
            try:
                data = sock.recv(_READ)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
            if data == b"":
                if body.done:
                    if status == 200:  # what came with the end is rsync's too: written before we go
                        os.set_blocking(fd_out, True)
                        _write_all(fd_out, down)
                    return
                raise TunnelError("the receiver closed the connection")
            if data:
                if status is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end >= 0:
                        status, headers = _headers(bytes(head[:end]))
                        if "chunked" not in headers.get("transfer-encoding", "").lower() and status == 200:
                            raise TunnelError("the receiver did not answer with a stream")
                        rest = bytes(head[end + 4 :])
                        if status != 200 and "chunked" not in headers.get("transfer-encoding", "").lower():
                            error_body += _whole_body(sock, rest, headers)
                            break
                        data = rest
                    else:
                        data = b""
                if status is not None and data:
                    plain = body.feed(data)
                    if status == 200:
                        down += plain
                    else:
                        error_body += plain
        if sock in w and up:
            try:
                n = sock.send(up[:_READ])
                del up[:n]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
        if fd_out in w and down:
            try:
                n = os.write(fd_out, down[:_READ])
                del down[:n]
            except BlockingIOError:
                pass
    raise _refused(status or 0, bytes(error_body))


class _OldReceiver(Exception):
    """The receiver answered the upgrade with 200: it predates the raw stream."""


def _answer_head(sock: "socket.socket") -> "Tuple[int, Dict[str, str], bytes]":
    """(status, headers, bytes after the head) of the receiver's answer, read blocking."""
    head = bytearray()
    while True:
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            status, headers = _headers(bytes(head[:end]))
            return status, headers, bytes(head[end + 4 :])
        if len(head) > 64 * 1024:
            raise TunnelError("the receiver's answer has no end of its headers")
        more = sock.recv(_READ)
        if not more:
            raise TunnelError("the receiver closed the connection before it answered")
        head += more


def _whole_body(sock: "socket.socket", rest: bytes, headers: "Dict[str, str]") -> bytes:
    """An answer's ``Content-Length`` body (an error's JSON), of which ``rest`` came with the head."""
    body = bytearray(rest)
    length = int(headers.get("content-length", "0") or 0)
    sock.setblocking(True)
    while len(body) < length:
        more = sock.recv(_READ)
        if not more:
            break
        body += more
    return bytes(body)


def _refused(status: int, message: bytes) -> TunnelError:
    try:
        doc = json.loads(message.decode("utf-8", "replace"))
        message = ("{}: {}".format(doc.get("code"), doc.get("message"))).encode()
    except ValueError:
        pass
    return TunnelError(
        "the receiver refused the rsync stream ({}): {}".format(status, message.decode("utf-8", "replace"))
    )


def _write_all(fd: int, data: "Any") -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def raw(
    sock: "socket.socket", request: bytes, fd_in: int = 0, fd_out: int = 1, throttle: "Optional[Throttle]" = None
) -> None:
    """Send the upgrade ``request``; after the receiver's 101, stdin to the socket and the socket to stdout.

    Two threads, each blocking on one direction: what rsync writes goes up as it is (held to
    ``throttle``'s rate), what the receiver's rsync writes comes down as it is. The end of the
    receiver's side ends the tunnel; rsync itself tells a finished exchange from a cut one."""
    throttle = throttle or Throttle(None)
    sock.settimeout(None)
    sock.sendall(request)
    status, headers, rest = _answer_head(sock)
    if status == 200:
        raise _OldReceiver()
    if status != 101:
        raise _refused(status, _whole_body(sock, rest, headers))
    for fd in (fd_in, fd_out):
        os.set_blocking(fd, True)
    if rest:
        _write_all(fd_out, rest)
    last = [time.monotonic()]  # of the last byte either way

    def up() -> None:
        try:
            while True:
                wait = throttle.delay()
                if wait:
                    time.sleep(wait)
                    continue
                piece = os.read(fd_in, throttle.read_size(_READ))
                if not piece:
                    sock.shutdown(socket.SHUT_WR)
                    return
                throttle.spend(len(piece))
                sock.sendall(piece)
                last[0] = time.monotonic()
        except OSError:
            return  # the receiver went away: the other direction sees it too

    threading.Thread(target=up, name="tunnel-up", daemon=True).start()
    buf = bytearray(_READ)
    while True:
        ready, _w, _x = select.select([sock], [], [], 30.0)
        if not ready:
            if time.monotonic() - last[0] > _IDLE:
                raise TunnelError(f"no data either way for {_IDLE:.0f} s")
            continue
        n = sock.recv_into(buf)
        if not n:
            return
        last[0] = time.monotonic()
        _write_all(fd_out, memoryview(buf)[:n])


def main(argv: "Optional[List[str]]" = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # rsync gives: [options the rsh understands...] host command...; we take none of the options
    while args and args[0].startswith("-"):
        args.pop(0)
    if len(args) < 2:
        sys.stderr.write("opensmc tunnel: expected HOST COMMAND... (it is rsync's remote shell)\n")
        return 2
    command = args[1:]
    if len(command) == 1 and " " in command[0]:
        command = command[0].split()  # rsync may hand the remote command as one string
    try:
        url, token = os.environ[ENV_URL], os.environ[ENV_TOKEN]
    except KeyError as missing:
        sys.stderr.write(f"opensmc tunnel: {missing} is not set (the agent sets it)\n")
        return 2
    ca = os.environ.get(ENV_CA) or None
    throttle = Throttle(os.environ.get(ENV_LIMIT) or None)
    try:
        if urlsplit(url).scheme == "http":
            sock = _connect(url, ca)
            try:
                raw(sock, _request(url, token, command, upgrade=True), throttle=throttle)
                return 0
            except _OldReceiver:
                pass  # it ran its rsync on an empty stream, which ended at once: ask again, chunked
            finally:
                sock.close()
        sock = _connect(url, ca)
        try:
            pipe(sock, _request(url, token, command), throttle=throttle)
        finally:
            sock.close()
    except (TunnelError, OSError, ssl.SSLError) as exc:
        sys.stderr.write(f"opensmc tunnel: {exc}\n")
        return 12  # rsync's "error in rsync protocol data stream"
    return 0


if __name__ == "__main__":
    sys.exit(main())

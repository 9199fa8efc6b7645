"""The backend contract on an S3-compatible object store (Ceph RGW, MinIO, AWS S3, ...).

Object ``name`` is the key ``<prefix>/<name>`` in one bucket. Keys with a part
that starts with a dot are the backend's own (no object name may have one,
``check_name``): ``.locks/`` for locks and ``.probe/`` for the one-time check
that the server honours conditional writes. ``list`` never shows them.

* **Atomic writes**: an S3 PUT, and a completed multipart upload, make the
  whole object visible at once; a reader never sees a part. Objects above
  :data:`MULTIPART_THRESHOLD` (packs are 16 MiB) go up as a multipart upload
  of :data:`PART_SIZE` parts, aborted on any failure. A process killed in
  the middle of one leaves an unfinished upload (never an object): it costs
  space until :meth:`S3Backend.abort_stale_uploads` (or a bucket lifecycle
  rule ``AbortIncompleteMultipartUpload``) removes it.
* **Exclusive writes** are a single PUT with ``If-None-Match: *``: the server
  refuses it with 412 if the key exists, atomically. Conditional completion
  of multipart uploads is not offered by every server (Ceph Pacific ignores
  it), so exclusive objects are never multipart; a single PUT takes up to
  5 GiB, and exclusive objects are config and snapshots (16 bytes per 16 KiB
  of disk: 5 GiB is a 5 PiB image). A server that *ignores* the header (old
  MinIO, some gateways) is found by a probe at the first exclusive write;
  the backend then falls back to HEAD-then-PUT and logs a warning, because
  that fallback has a race: two writers that both HEAD before either PUTs
  both succeed and the later one replaces the first. The store's exclusive
  objects tolerate it only in part (two ``config`` racers write the same
  document; two snapshots of one image id are not made by OpenSMC, which
  names images uniquely), so use a server with conditional writes.
* **Locks** are lock objects, restic-style (``docs/store-format.md`` §8):
  ``.locks/<name>/<ex|sh>-<holder id>``, refreshed by a background thread,
  stale after :data:`STALE_AFTER` seconds. A lock of a process on this host
  that is dead is gone at once (its pid and start time are in the object),
  so a lock dies with its holder as the contract asks; a holder on another
  host that dies is seen only once its lock is stale.
* **Retries**: botocore's "standard" mode retries throttling, 5xx and
  connection errors with exponential backoff and jitter, :data:`MAX_ATTEMPTS`
  times in all.

Over plain HTTP botocore signs the payload's SHA-256 (SigV4), so the server
refuses a body damaged in transit; the store re-hashes every blob it reads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from opensmc.chunkstore.backend import Data, LockBusy, ObjectExists, ObjectNotFound, check_name, joined

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["MULTIPART_THRESHOLD", "PART_SIZE", "STALE_AFTER", "S3Backend", "S3Options", "parse_s3_url"]

log = logging.getLogger("opensmc.chunkstore.s3")

MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024  # S3's minimum part is 5 MiB (but the last)
MAX_ATTEMPTS = 8
#: a lock object not refreshed for this long belongs to a dead (or cut off) holder
STALE_AFTER = 30.0
#: how often a holder rewrites its lock objects; well under STALE_AFTER so a slow request or two
#: never lets a live lock look stale
REFRESH_EVERY = 5.0
_LOCKS = ".locks/"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class S3Options:
    """Where the S3 service is. Empty fields fall back to boto3's usual sources.

    Credentials are never options: boto3 finds them in ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` and the
    shared credentials file, so a secret never shows on a command line.
    """

    endpoint: str = ""  #: e.g. http://127.0.0.1:7480; else AWS_ENDPOINT_URL(_S3), else AWS
    region: str = ""  #: else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    #: path-style (http://host/bucket/key) works with every self-hosted store without DNS set-up
    virtual_hosted: bool = False


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"an S3 image store is s3://BUCKET[/PREFIX], got {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        check_name(prefix)
    return parts.netloc, prefix


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(err: ClientError) -> bool:
    return _status(err) == 404 or _code(err) in ("NoSuchKey", "404", "NotFound")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid: which process it is), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, counted after the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def _boot_id() -> str:
    try:
        with open(_BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


class _S3Lock:
    def __init__(self, backend: S3Backend, key: str) -> None:
        self._backend = backend
        self.key = key

    def release(self) -> None:
        if self.key:
            key, self.key = self.key, ""
            self._backend._drop_lock(key)


class S3Backend:
    """Objects in ``bucket`` under ``prefix`` on an S3-compatible server. Thread-safe."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        options: S3Options | None = None,
        *,
        stale_after: float = STALE_AFTER,
        refresh_every: float = REFRESH_EVERY,
    ) -> None:
        opts = options or S3Options()
        self.bucket = bucket
        self.prefix = f"{check_name(prefix.strip('/'))}/" if prefix.strip("/") else ""
        self.stale_after = stale_after
        self.refresh_every = refresh_every
        config = Config(
            s3={"addressing_style": "virtual" if opts.virtual_hosted else "path"},
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            # Newer botocore adds CRC trailers (aws-chunked bodies) that many self-hosted
            # servers reject; SigV4's payload hash and the store's own hashes cover integrity.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=16,
        )
        region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client: S3Client = boto3.session.Session().client(
            "s3", endpoint_url=opts.endpoint or None, region_name=region, config=config
        )
        self._conditional: bool | None = None  # does the server honour If-None-Match: * ? (probed once)
        self._held: dict[str, bytes] = {}  # lock key -> its body, refreshed by the thread below
        self._held_lock = threading.Lock()
        self._refresh_mutex = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._wake = threading.Event()
        self._holder = {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "start": _proc_start(os.getpid()),
        }

    def describe(self) -> str:
        endpoint = self.client.meta.endpoint_url
        return f"s3://{self.bucket}/{self.prefix} at {endpoint}"

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    # -- objects ------------------------------------------------------------------------------

    def write(self, name: str, data: Data, *, exclusive: bool = False) -> None:
        key = self._key(name)
        body = joined(data)  # botocore wants bytes or a file: a pack's parts are joined once
        if exclusive:
            self._write_exclusive(key, name, body)
        elif len(body) > MULTIPART_THRESHOLD:
            self._write_multipart(key, body)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def _write_exclusive(self, key: str, name: str, body: bytes) -> None:
        if self._conditional is None:
            self._conditional = self._probe_conditional()
        if not self._conditional:
            # Racy fallback (module docstring): a writer between our HEAD and PUT is replaced.
            if self._head(key) is not None:
                raise ObjectExists(f"object {name!r} exists already")
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
            return
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as e:
            # 412: it exists. 409 ConditionalRequestConflict: a racing conditional write won.
            if _status(e) in (412, 409):
                raise ObjectExists(f"object {name!r} exists already") from None
            raise

    def _probe_conditional(self) -> bool:
        key = f"{self.prefix}.probe/{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            except ClientError as e:
                if _status(e) in (412, 409):
                    return True
                if _status(e) != 501:
                    raise
        except ClientError as e:
            if _status(e) != 501:  # NotImplemented: the header is refused rather than ignored
                raise
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        log.warning(
            "%s does not honour If-None-Match: *; exclusive writes fall back to HEAD then PUT, "
            "which two racing writers can both pass",
            self.describe(),
        )
        return False

    def _write_multipart(self, key: str, body: bytes) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            view = memoryview(body)
            for number, start in enumerate(range(0, len(body), PART_SIZE), start=1):
                reply = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    Body=bytes(view[start : start + PART_SIZE]),
                )
                parts.append({"PartNumber": number, "ETag": reply["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            try:  # no garbage: the parts cost space until aborted
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception as e:  # the original error matters more
                log.warning("aborting multipart upload of %s failed: %s", key, e)
            raise

    def abort_stale_uploads(self, older_than: float = 24 * 3600) -> int:
        """Abort multipart uploads under the prefix started more than ``older_than`` s ago (killed writers')."""
        now = self._server_now()
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for up in page.get("Uploads", []):
                started = up.get("Initiated")
                if started is not None and (now - started).total_seconds() > older_than:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        return aborted

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if length == 0:
            if not self.exists(name):
                raise ObjectNotFound(name)
            return b""
        try:
            if offset == 0 and length is None:
                reply = self.client.get_object(Bucket=self.bucket, Key=key)
            else:
                end = "" if length is None else str(offset + length - 1)
                reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end}")
        except ClientError as e:
            if _missing(e):
                raise ObjectNotFound(name) from None
            if _status(e) == 416:  # the range starts at or past the end
                size = self.size(name)
                if length is None and offset == size:
                    return b""
                raise ValueError(f"object {name!r} is shorter than {offset}+{length} bytes") from None
            raise
        data = reply["Body"].read()
        if length is not None and len(data) != length:
            raise ValueError(f"object {name!r} is shorter than {offset}+{length} bytes")
        return data

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as e:
            if _missing(e):
                return None
            raise

    def size(self, name: str) -> int:
        head = self._head(self._key(name))
        if head is None:
            raise ObjectNotFound(name)
        return int(head["ContentLength"])

    def exists(self, name: str) -> bool:
        return self._head(self._key(name)) is not None

    def _list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from (dict(o) for o in page.get("Contents", []))

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        for obj in self._list_keys(self.prefix + prefix):
            name = str(obj["Key"])[len(self.prefix) :]
            if any(part.startswith(".") for part in name.split("/")):
                continue  # locks, probes: the backend's own
            out.append(name)
        out.sort()  # S3 lists in UTF-8 byte order, which is code point order; sorted anyway
        return out

    def stored_bytes(self) -> int:
        """Bytes the objects under the prefix hold (locks and probes included; they are tiny)."""
        return sum(int(o["Size"]) for o in self._list_keys(self.prefix))

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))  # a missing key is a 204

    # -- locks --------------------------------------------------------------------------------

    def lock(self, name: str, *, exclusive: bool, blocking: bool = True) -> _S3Lock:
        folder = f"{self.prefix}{_LOCKS}{check_name(name)}/"
        delay = 0.05
        while True:
            key = f"{folder}{'ex' if exclusive else 'sh'}-{uuid.uuid4().hex}"
            body = json.dumps({**self._holder, "exclusive": exclusive}).encode()
            # Write ours first, then look: of two racing takers at least one sees the other
            # (S3 lists are strongly consistent after a write), so never both win.
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
            conflict = self._conflicting(folder, key, exclusive)
            if conflict is None:
                with self._held_lock:
                    self._held[key] = body
                self._start_refresher()
                return _S3Lock(self, key)
            self.client.delete_object(Bucket=self.bucket, Key=key)
            if not blocking:
                raise LockBusy(f"lock {name!r} is held ({conflict})")
            # Both of two racing exclusive takers back off; jitter makes one win the next round.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    def _conflicting(self, folder: str, mine: str, exclusive: bool) -> str | None:
        """Another fresh, live lock that excludes ours, or None."""
        objects: list[dict[str, Any]] = []
        token: str | None = None
        now: datetime | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kwargs)
            # The server's clock, from the reply's Date header: lock ages never depend on ours.
            now = now or parsedate_to_datetime(page["ResponseMetadata"]["HTTPHeaders"]["date"])
            objects += (dict(o) for o in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not token:
                break
        for obj in objects:
            key = str(obj["Key"])
            if key == mine:
                continue
            theirs_exclusive = key[len(folder) :].startswith("ex-")
            if not (exclusive or theirs_exclusive):
                continue
            age = (now - obj["LastModified"]).total_seconds()
            if age > self.stale_after:
                log.warning("removing stale lock %s (not refreshed for %.0f s)", key, age)
                self.client.delete_object(Bucket=self.bucket, Key=key)
                continue
            holder = self._holder_of(key)
            if holder is not None and self._dead_here(holder):
                self.client.delete_object(Bucket=self.bucket, Key=key)
                continue
            who = f"{holder.get('host')} pid {holder.get('pid')}" if holder else key
            return f"{'exclusively' if theirs_exclusive else 'shared'} by {who}"
        return None

    def _holder_of(self, key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as e:
            if _missing(e):
                return None  # released meanwhile
            raise
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def _dead_here(self, holder: dict[str, Any]) -> bool:
        """A holder on this host (same boot) whose process is gone, or is another process now."""
        if not self._holder["boot_id"] or holder.get("boot_id") != self._holder["boot_id"]:
            return False
        if holder.get("host") != self._holder["host"]:
            return False
        pid = holder.get("pid")
        return not isinstance(pid, int) or _proc_start(pid) != holder.get("start")

    def _server_now(self) -> datetime:
        """The server's clock (from a reply's Date header), for ages judged by its LastModified."""
        reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + _LOCKS, MaxKeys=1)
        return parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])

    def _drop_lock(self, key: str) -> None:
        # Under the refresh mutex: a refresh PUT in flight must not bring a released lock back.
        with self._refresh_mutex:
            with self._held_lock:
                self._held.pop(key, None)
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def _start_refresher(self) -> None:
        with self._held_lock:
            if self._refresher is not None and self._refresher.is_alive():
                return
            self._refresher = threading.Thread(target=self._refresh_loop, name="s3-lock-refresh", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait(self.refresh_every)
            with self._held_lock:
                held = dict(self._held)
            if not held:
                with self._held_lock:
                    if not self._held:
                        self._refresher = None
                        return
                continue
            for key, body in held.items():
                try:
                    with self._refresh_mutex:
                        with self._held_lock:
                            if key not in self._held:
                                continue  # released meanwhile
                        # Rewriting it moves LastModified, which is what others judge staleness by.
                        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
                except Exception as e:  # keep refreshing the others; a lock that goes stale is logged
                    log.error("refreshing lock %s on %s failed: %s", key, self.describe(), e)

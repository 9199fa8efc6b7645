"""Where `opensmc image` reads images from: the server over HTTP, or a local image store.

:class:`RemoteImages` calls ``/opensmc/v1/images`` (:mod:`opensmc.api.image_routes`),
signing each request with ACS3-HMAC-SHA256 like ``opensmc call``;
:class:`LocalImages` opens ``<data-dir>/images`` directly. Both hand out a
disk's bytes only as they are verified, and raise :class:`ImageCliError` when
the image is found corrupt.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from opensmc import API_VERSION
from opensmc.cli.credentials import ClientCredentials, CredentialsError, tls_verify
from opensmc.cli.errors import CliError
from opensmc.signer import sign_acs3

PREFIX = "/opensmc/v1/images"
PIECE = 64 * 1024


class ImageCliError(CliError):
    """A failure to report as ``opensmc image: error: …`` with exit status 1."""


class Images:
    """The image operations the commands need, over HTTP or on the local image store."""

    def list_images(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def show(self, image_id: str, chunks: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def raw(self, image_id: str, disk: int) -> Iterator[bytes]:
        """The disk's bytes in order; raises ImageCliError if the source finds them corrupt."""
        raise NotImplementedError

    def qcow2(self, image_id: str, disk: int, out: Path, progress: Callable[[int], None] | None = None) -> None:
        """Write the disk as a qcow2 to `out`; `progress` gets the byte count of each piece written."""
        raise NotImplementedError

    def verify(self, image_id: str) -> list[str]:
        """What is wrong with the image; empty when all is well."""
        problems = []
        for disk in self.show(image_id)["Disks"]:
            sha = hashlib.sha256()
            try:
                for block in self.raw(image_id, disk["Index"]):
                    sha.update(block)
            except ImageCliError as exc:
                problems.append(f"disk {disk['Index']}: {exc}")
                continue
            if disk.get("Sha256") is not None and sha.hexdigest() != disk["Sha256"]:
                problems.append(f"disk {disk['Index']}: SHA-256 {sha.hexdigest()} != manifest {disk['Sha256']}")
        return problems


class RemoteImages(Images):
    def __init__(self, creds: ClientCredentials, timeout: float = 60.0) -> None:
        self.creds = creds
        self.timeout = timeout

    def _request(self, path: str, params: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        url = urlsplit(self.creds.endpoint)
        query, headers = sign_acs3(
            "GET", url.netloc, "DownloadImage", API_VERSION, params or {},
            self.creds.access_key_id, self.creds.access_key_secret, path=path,
        )  # fmt: skip
        return f"{url.scheme}://{url.netloc}{path}" + (f"?{query}" if query else ""), headers

    def _json(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        url, headers = self._request(path, params)
        response = httpx.get(url, headers=headers, timeout=self.timeout, verify=tls_verify())
        _raise_for(response)
        return dict(response.json())

    @contextmanager
    def _stream(self, path: str, params: dict[str, str]) -> Iterator[httpx.Response]:
        url, headers = self._request(path, params)
        # No read timeout: a qcow2 is converted on the server before its first byte.
        timeout = httpx.Timeout(self.timeout, read=None)
        with httpx.stream("GET", url, headers=headers, timeout=timeout, verify=tls_verify()) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            yield response

    def list_images(self) -> list[dict[str, Any]]:
        return list(self._json(PREFIX)["Images"]["Image"])

    def show(self, image_id: str, chunks: bool = False) -> dict[str, Any]:
        doc = self._json(f"{PREFIX}/{image_id}", {"chunks": "true" if chunks else "false"})
        doc.pop("RequestId", None)
        return doc

    def raw(self, image_id: str, disk: int) -> Iterator[bytes]:
        with self._stream(f"{PREFIX}/{image_id}/disks/{disk}", {"format": "raw"}) as response:
            try:
                yield from response.iter_bytes(PIECE)
            except httpx.HTTPError as exc:
                raise ImageCliError(
                    f"the download of image {image_id} disk {disk} broke off ({exc}); the server aborts "
                    "a download when the image fails verification, see its log"
                ) from None

    def qcow2(self, image_id: str, disk: int, out: Path, progress: Callable[[int], None] | None = None) -> None:
        with self._stream(f"{PREFIX}/{image_id}/disks/{disk}", {"format": "qcow2"}) as response:
            try:
                with out.open("wb") as f:
                    for block in response.iter_bytes(1 << 20):
                        f.write(block)
                        if progress is not None:
                            progress(len(block))
            except httpx.HTTPError as exc:
                raise ImageCliError(f"the qcow2 download broke off: {exc}") from None


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"Code": "HTTP", "Message": response.text[:300]}
    raise ImageCliError(
        f"{body.get('Code')}: {body.get('Message')} (HTTP {response.status_code}, "
        f"RequestId {body.get('RequestId', '-')})"
    )


class LocalImages(Images):
    """The image store under a server's data dir, read directly."""

    def __init__(self, data_dir: Path) -> None:
        from opensmc.images.store import ImageError, ImageStore

        root = data_dir / "store"
        if not (root / "config").is_file():
            raise CredentialsError(f"{data_dir} holds no image store (looked for {root})")
        self.data_dir = data_dir
        try:
            self.store = ImageStore(root)
        except ImageError as exc:
            raise ImageCliError(str(exc)) from None

    def _rows(self) -> dict[str, Any]:
        """The server's image records, when its database is the SQLite file in the data dir."""
        path = self.data_dir / "opensmc.db"
        if not path.exists():
            return {}
        from sqlalchemy import select

        from opensmc.store.db import Database, sqlite_url
        from opensmc.store.tables import images

        db = Database(sqlite_url(path))
        try:
            with db.connect() as conn:
                return {r.id: r for r in conn.execute(select(images))}
        except Exception:  # an older or foreign database: show what the store knows
            return {}
        finally:
            db.dispose()

    def _manifest(self, image_id: str) -> Any:
        from opensmc.images.store import ImageError

        try:
            return self.store.get(image_id)
        except ImageError as exc:
            raise ImageCliError(str(exc)) from None

    def list_images(self) -> list[dict[str, Any]]:
        from opensmc.service.images import image_doc

        rows = self._rows()
        from opensmc.images.adaptation_log import SOURCE_SUFFIX

        ids = [i for i in self.store.list_images() if not i.endswith(SOURCE_SUFFIX)]  # an adaptation's input
        docs = [self._with_boot(image_doc(self._manifest(i), rows.get(i))) for i in ids]
        return sorted(docs, key=lambda d: (d["CreationTime"], d["ImageId"]))

    def show(self, image_id: str, chunks: bool = False) -> dict[str, Any]:
        from opensmc.service.images import image_doc

        return self._with_boot(image_doc(self._manifest(image_id), self._rows().get(image_id), chunks=chunks))

    def _with_boot(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The latest boot test of each disk (``opensmc image boot-test`` keeps them beside the store)."""
        from opensmc.images.adaptation_log import adaptation_doc
        from opensmc.images.adaptation_log import results_dir as adaptation_dir
        from opensmc.images.boot import boot_doc, results_dir

        doc["BootTest"] = boot_doc(results_dir(self.data_dir), doc["ImageId"])
        doc["OsAdaptation"] = adaptation_doc(adaptation_dir(self.data_dir), doc["ImageId"])
        return doc

    def raw(self, image_id: str, disk: int) -> Iterator[bytes]:
        from opensmc.images.store import ImageError
        from opensmc.service.images import raw_blocks

        manifest = self._manifest(image_id)
        if not 0 <= disk < len(manifest.disks):
            raise ImageCliError(f"image {image_id} has no disk {disk} (it has {len(manifest.disks)})")
        try:
            for _offset, data, _zero in raw_blocks(self.store, manifest, disk):
                yield data
        except ImageError as exc:
            raise ImageCliError(str(exc)) from None

    def qcow2(self, image_id: str, disk: int, out: Path, progress: Callable[[int], None] | None = None) -> None:
        # The store converts in one step (qemu-img): no progress to tell until it is done.
        from opensmc.images.store import ImageError

        manifest = self._manifest(image_id)
        if not 0 <= disk < len(manifest.disks):
            raise ImageCliError(f"image {image_id} has no disk {disk} (it has {len(manifest.disks)})")
        try:
            self.store.export(image_id, disk, "qcow2", out)
        except (ImageError, subprocess.CalledProcessError, FileNotFoundError) as exc:
            raise ImageCliError(f"qcow2 export failed: {exc}") from None

    def verify(self, image_id: str) -> list[str]:
        from opensmc.images.store import ImageError

        try:
            report = self.store.verify(image_id)
        except ImageError as exc:
            raise ImageCliError(str(exc)) from None
        problems = (
            [f"disk {d} chunk {c}: does not match its hash" for d, c in report.bad_chunks]
            + [f"disk {d} chunk {c}: missing from the store" for d, c in report.missing_chunks]
            + [f"disk {d}: whole-disk SHA-256 mismatch" for d in report.bad_disks]
        )
        if not problems:
            self._record_verified(image_id, range(len(self._manifest(image_id).disks)))
        return problems

    def _record_verified(self, image_id: str, positions: range) -> None:
        """Note the proof in the server's SQLite database here, as a verifying download does on the server."""
        path = self.data_dir / "opensmc.db"
        if not path.exists():
            return
        from datetime import UTC, datetime

        from opensmc.store.db import Database, sqlite_url
        from opensmc.store.images import mark_disks_verified

        db = Database(sqlite_url(path))
        try:
            with db.begin() as conn:
                mark_disks_verified(conn, image_id, positions, datetime.now(UTC))
        finally:
            db.dispose()

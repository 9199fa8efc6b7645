"""Image download over HTTP, signed like the SMC API: ``/opensmc/v1/images``.

* ``GET /opensmc/v1/images``: the caller's images with their disks.
* ``GET /opensmc/v1/images/{image_id}``: one image's manifest (disk sizes,
  whole-disk SHA-256, chunk size, per-chunk hashes unless ``?chunks=false``,
  checksum result, job, creation time).
* ``GET /opensmc/v1/images/{image_id}/disks/{n}?format=raw|qcow2``: disk ``n``
  (0 = system disk). ``raw`` streams straight from the image store, checking
  every chunk and the whole-disk SHA-256 as it goes; ``qcow2`` is converted
  to a temporary file in the data dir first, streamed, then deleted.

Every request carries an ACS3-HMAC-SHA256 signature made exactly like the
API's (:func:`opensmc.signer.sign_acs3` with ``path=`` the request path and
action ``DownloadImage``); it is checked by :func:`opensmc.api.auth.authenticate`,
nonce included. Another account's image is 404. Errors are JSON
``{"Code", "Message", "RequestId"}``.

A corrupt image found mid-stream cannot become an error status (the 200 is
already sent), so the stream is aborted: the body ends short of its
Content-Length and the client sees a broken download, never a wrong disk
that looks complete. The server logs which chunk failed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from opensmc import API_VERSION
from opensmc.api.auth import authenticate
from opensmc.api.signing import SignedRequest, collect_headers
from opensmc.clock import new_request_id
from opensmc.domain.errors import AuthError, InternalError, SmcError
from opensmc.images.store import ImageCorrupt, ImageError, ImageStore, Manifest
from opensmc.service import images as image_service
from opensmc.service.accounts import check_policy
from opensmc.service.context import Caller, Services

log = logging.getLogger("opensmc.images")

PREFIX = "/opensmc/v1/images"
ACTION = "DownloadImage"
FILE_BLOCK = 1 << 20


class StreamAborted(Exception):
    """Raised into the server to cut a download short (the status line is already sent)."""


def _error(err: SmcError, request_id: str) -> JSONResponse:
    return JSONResponse(
        {"Code": err.code, "Message": err.message, "RequestId": request_id},
        status_code=err.http_status,
        headers={"x-acs-request-id": request_id},
    )


async def _caller(request: Request) -> Caller:
    services: Services = request.app.state.services
    headers, repeated = collect_headers(request.headers.items())
    if not headers.get("authorization", "").startswith("ACS3-"):
        # Only ACS3 signs the path; a V1 signature would not bind the request to one image.
        raise AuthError(
            "MissingAuthorization",
            f"Sign the request with ACS3-HMAC-SHA256 (action {ACTION}), as `opensmc image` does.",
            401,
        )
    if headers.get("x-acs-action") != ACTION:
        raise AuthError("InvalidAction.NotFound", f"Image routes are signed with action {ACTION}.", 404)
    if headers.get("x-acs-version") != API_VERSION:
        raise AuthError("InvalidVersion", f"Specified parameter Version is not valid; use {API_VERSION}.")
    signed = SignedRequest(
        method=request.method,
        path=request.url.path,
        query=parse_qsl(request.url.query, keep_blank_values=True),
        form=[],
        headers=headers,
        body=await request.body(),
        repeated=repeated,
    )
    caller = await run_in_threadpool(authenticate, services, signed)
    check_policy(caller, ACTION)  # downloading a disk is not a Describe*/List* action
    return caller


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    return value.lower() not in ("0", "false", "no", "off")


async def list_images(request: Request) -> Response:
    request_id = new_request_id()
    try:
        caller = await _caller(request)
        items = await run_in_threadpool(image_service.list_images, request.app.state.services, caller)
        return JSONResponse({"RequestId": request_id, "Images": {"Image": items}, "TotalCount": len(items)})
    except SmcError as err:
        return _error(err, request_id)
    except ClientDisconnect:
        log.info("image request: the client disconnected before sending its whole request (RequestId %s)", request_id)
        return Response(status_code=400)
    except Exception:
        log.exception("image list failed (RequestId %s)", request_id)
        return _error(InternalError(), request_id)


async def show_image(request: Request) -> Response:
    request_id = new_request_id()
    try:
        caller = await _caller(request)
        image_id = request.path_params["image_id"]
        chunks = _flag(request, "chunks", True)
        doc = await run_in_threadpool(
            lambda: image_service.describe_image(request.app.state.services, caller, image_id, chunks=chunks)
        )
        return JSONResponse({"RequestId": request_id, **doc})
    except SmcError as err:
        return _error(err, request_id)
    except ClientDisconnect:
        log.info("image request: the client disconnected before sending its whole request (RequestId %s)", request_id)
        return Response(status_code=400)
    except Exception:
        log.exception("image show failed (RequestId %s)", request_id)
        return _error(InternalError(), request_id)


async def download_disk(request: Request) -> Response:
    request_id = new_request_id()
    services: Services = request.app.state.services
    try:
        caller = await _caller(request)
        image_id: str = request.path_params["image_id"]
        position: int = request.path_params["n"]
        fmt = image_service.parse_format(request.query_params.get("format"))
        store, manifest = await run_in_threadpool(image_service.open_disk, services, caller, image_id, position)
        disk = manifest.disks[position]
        headers = {
            "x-acs-request-id": request_id,
            "x-opensmc-disk-size": str(disk.size),
            "content-disposition": f'attachment; filename="{image_id}-disk{position}.{fmt}"',
        }
        if disk.sha256 is not None:  # known when the job ran with checksum, or once verified
            headers["x-opensmc-disk-sha256"] = disk.sha256
        if fmt == "raw":
            log.info("image %s disk %d: raw download started (RequestId %s)", image_id, position, request_id)
            headers["content-length"] = str(disk.size)
            # A raw download read to its end proved the disk: `opensmc image list` shows it verified.
            proved = lambda: image_service.record_verified(services, image_id, [position])  # noqa: E731
            return StreamingResponse(
                _raw_body(store, manifest, position, request_id, proved),
                media_type="application/octet-stream",
                headers=headers,
            )
        try:
            path = await run_in_threadpool(image_service.export_qcow2_temp, services, store, image_id, position)
        except ImageCorrupt as exc:
            log.error(
                "image %s disk %d: qcow2 export refused: %s (RequestId %s)",
                image_id,
                position,
                exc,
                request_id,
            )
            raise SmcError(
                f"The image {image_id} failed verification: {exc}", code="Image.Corrupt", http_status=409
            ) from None
        headers["content-length"] = str(path.stat().st_size)
        return StreamingResponse(_file_body(path, request_id), media_type="application/octet-stream", headers=headers)
    except SmcError as err:
        return _error(err, request_id)
    except ClientDisconnect:
        log.info("image request: the client disconnected before sending its whole request (RequestId %s)", request_id)
        return Response(status_code=400)
    except Exception:
        log.exception("image download failed (RequestId %s)", request_id)
        return _error(InternalError(), request_id)


async def _raw_body(
    store: ImageStore, manifest: Manifest, position: int, request_id: str, on_verified: Callable[[], None]
) -> AsyncIterator[bytes]:
    def blocks() -> Iterator[bytes]:
        for _offset, data, _zero in image_service.raw_blocks(store, manifest, position, on_verified):
            yield data

    try:
        held: bytes | None = None
        async for block in iterate_in_threadpool(blocks()):
            if held is not None:
                yield held
            held = block
        # Every block was read and verified, and ``on_verified`` has recorded the proof: only now
        # does the last block go out, so a client that has the whole disk finds the image verified.
        if held is not None:
            yield held
    except (ImageError, OSError) as exc:
        log.error(
            "image %s disk %d: download aborted, the image failed verification: %s (RequestId %s)",
            manifest.image_id,
            position,
            exc,
            request_id,
        )
        raise StreamAborted(str(exc)) from None


async def _file_body(path: Path, request_id: str) -> AsyncIterator[bytes]:
    def blocks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(FILE_BLOCK):
                yield block

    try:
        async for block in iterate_in_threadpool(blocks()):
            yield block
    except OSError as exc:
        log.error("qcow2 download aborted: %s (RequestId %s)", exc, request_id)
        raise StreamAborted(str(exc)) from None
    finally:
        path.unlink(missing_ok=True)


routes: list[Any] = [
    Route(PREFIX, list_images, methods=["GET"]),
    Route(PREFIX + "/{image_id}", show_image, methods=["GET"]),
    Route(PREFIX + "/{image_id}/disks/{n:int}", download_disk, methods=["GET"]),
]

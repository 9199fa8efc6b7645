"""Where a chunk store is: a local directory (the default) or ``s3://BUCKET/PREFIX``.

:func:`backend_for` is the one place that turns a location into a
:class:`~.backend.Backend`, so the image store, the receiver and the CLI
agree on it. boto3 is imported only for an S3 location.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from opensmc.chunkstore.backend import Backend, LocalBackend

__all__ = ["StoreLocation", "backend_for"]


@dataclass(frozen=True)
class StoreLocation:
    """A store's URL (a directory path, or ``s3://bucket/prefix``) and, for S3, where the service is.

    Empty ``s3_endpoint`` / ``s3_region`` leave them to boto3's environment
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``...); credentials always come from there.
    """

    url: str
    s3_endpoint: str = ""
    s3_region: str = ""

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def key(self) -> str:
        """One name per store, for a per-process cache of open repositories."""
        if self.is_s3:
            return f"{self.url.rstrip('/')}@{self.s3_endpoint or os.environ.get('AWS_ENDPOINT_URL', '')}"
        return str(Path(self.url.removeprefix("file://")).resolve())


def backend_for(location: StoreLocation | str | os.PathLike[str]) -> Backend:
    if not isinstance(location, StoreLocation):
        location = StoreLocation(os.fspath(location))
    if location.is_s3:
        from opensmc.chunkstore.s3 import S3Backend, S3Options, parse_s3_url

        bucket, prefix = parse_s3_url(location.url)
        return S3Backend(bucket, prefix, S3Options(endpoint=location.s3_endpoint, region=location.s3_region))
    if "://" in location.url and not location.url.startswith("file://"):
        raise ValueError(f"an image store is a directory or s3://BUCKET/PREFIX, got {location.url!r}")
    return LocalBackend(location.url.removeprefix("file://"))

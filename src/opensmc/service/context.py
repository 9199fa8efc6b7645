"""What every use case receives: the store, the settings, the clock, the caller."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from opensmc.chunkstore.location import StoreLocation
from opensmc.clock import utcnow
from opensmc.store.db import Database
from opensmc.store.secretbox import SecretBox


@dataclass(frozen=True)
class Settings:
    """Server configuration (from the command line and the environment)."""

    data_dir: Path
    regions: tuple[str, ...] = ("local",)
    #: the address agents and CLI users reach the API on, e.g. http://127.0.0.1:8080
    public_endpoint: str = ""
    #: the address agents send disk data to (the receiver role)
    receiver_endpoint: str = ""
    #: an agent that has not heartbeated for this long is Unavailable
    heartbeat_grace: timedelta = timedelta(seconds=90)
    heartbeat_rate: int = 10  #: liveness only: work reaches agents on their task channel (GET /agent/v1/tasks)
    #: how long a processed request's signature nonce is remembered (the timestamp window)
    signature_window: timedelta = timedelta(minutes=15)
    #: accept AccessKey registrations over plain HTTP from other hosts (`--insecure-http`)
    insecure_http: bool = False
    max_jobs_per_account: int = 1000
    max_workgroups_per_account: int = 50
    #: where images are kept: "" for the local directory ``store_dir``, or ``s3://BUCKET/PREFIX``
    image_store: str = ""
    s3_endpoint: str = ""  #: for an s3:// image store; "" leaves it to AWS_ENDPOINT_URL
    s3_region: str = ""  #: for an s3:// image store; "" leaves it to AWS_REGION
    #: where staging indexes live (``--staging-dir``); None: ``<data dir>/staging``. Several
    #: receivers, and the orchestrators that seal their images, must share it.
    staging: Path | None = None
    #: bytes the receiver keeps free on the server's disk for the database (`--disk-reserve`)
    disk_reserve: int = 64 * 1024 * 1024
    #: a run whose worst case does not fit the free space is refused (`--no-space-check` turns it off)
    space_check: bool = True

    @property
    def store_dir(self) -> Path:
        """The local chunk store directory (docs/store-format.md), used when ``image_store`` is empty."""
        return self.data_dir / "store"

    @property
    def image_location(self) -> StoreLocation:
        """The chunk store that holds every image. Staging indexes stay local files (``staging_dir``)."""
        return StoreLocation(self.image_store or str(self.store_dir), self.s3_endpoint, self.s3_region)

    @property
    def staging_dir(self) -> Path:
        return self.staging or self.data_dir / "staging"


def is_loopback(host: str) -> bool:
    """A loopback address or name: traffic to it never leaves the machine."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 (not loopback to Python before 3.13)
    return ip.is_loopback


@dataclass
class Services:
    db: Database
    settings: Settings
    secrets: SecretBox
    clock: Callable[[], datetime] = field(default=utcnow)


@dataclass(frozen=True)
class Caller:
    """The account a request acts for, from its AccessKey."""

    account_id: str
    access_key_id: str
    #: how the request was signed: "ACS3-HMAC-SHA256", "HMAC-SHA1", or "" (not over the wire)
    scheme: str = ""
    #: the key's policy allows only Describe*/List* actions
    read_only: bool = False

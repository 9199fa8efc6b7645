"""`opensmc store check|gc`: prove or tidy the chunk store under a server's data dir (like `restic check/prune`).

Both work on the files directly (``--data-dir``), beside a running server:
``check`` holds the store shared, as an export does; ``gc`` takes it
exclusively and says so, without waiting, when a run is writing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opensmc.cli.errors import CliError, UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        help="read every pack, prove every blob and every image",
        description="Read every pack of the chunk store and check it against its name and its index, every blob "
        "against its hash, and every image (snapshot) for blobs it names that no pack holds. Exit 1 on any error.",
    )
    check.add_argument("--data-dir", type=Path, default=Path("opensmc-data"), help="the server's data dir")
    check.add_argument(
        "--no-read-data", action="store_true", help="check indexes and snapshots only, without reading the packs"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    gc = sub.add_parser(
        "gc",
        help="free the space of blobs no image or staging index needs",
        description="Mark every blob an image or a staging index names, delete packs with none, repack packs "
        "mostly dead. The server does this on its own after images are deleted; this runs it now.",
    )
    gc.add_argument("--data-dir", type=Path, default=Path("opensmc-data"), help="the server's data dir")
    gc.add_argument(
        "--staging-dir",
        type=Path,
        default=None,
        help="the servers' --staging-dir, if they have one (default: <data-dir>/staging): its indexes are roots",
    )
    cp = sub.add_parser(
        "copy",
        help="copy the data dir's image store to an S3 bucket (or another directory)",
        description="Copy every object of the data dir's chunk store (packs, indexes, images) to --to, then check "
        "the copy (its indexes and images, without reading the packs). Objects the destination holds already are "
        "skipped, so an interrupted copy is finished by running it again. Stop the servers first. S3 credentials "
        "come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile.",
    )
    cp.add_argument("--data-dir", type=Path, default=Path("opensmc-data"), help="the server's data dir")
    cp.add_argument("--to", required=True, help="s3://BUCKET/PREFIX (the bucket must exist), or a directory")
    cp.add_argument("--s3-endpoint", default="", help="URL of the S3 service (default: AWS_ENDPOINT_URL)")
    cp.add_argument("--s3-region", default="", help="S3 region (default: AWS_REGION, else us-east-1)")


def _store(data_dir: Path) -> object:
    from opensmc.images.store import ImageError, ImageStore

    root = data_dir / "store"
    if not (root / "config").is_file():
        raise UsageError(f"{data_dir} holds no image store (looked for {root}/config)")
    try:
        return ImageStore(root)
    except ImageError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from opensmc.chunkstore.staging import StagingIndex
    from opensmc.images.store import ImageStore

    if not args.store_command:
        raise UsageError("give a subcommand: check, gc or copy")
    store = _store(args.data_dir)
    if args.store_command == "copy":
        return _copy(store, args)
    assert isinstance(store, ImageStore)
    if args.store_command == "check":
        report = store.check(read_data=not args.no_read_data)
        if args.json:
            print(json.dumps({"ok": report.ok, "packs": report.packs, "blobs": report.blobs,
                              "snapshots": report.snapshots, "bytes_read": report.bytes_read,
                              "errors": report.errors}, indent=2))  # fmt: skip
        else:
            for line in report.errors:
                print(f"FAILED: {line}")
            print(
                f"{report.packs} pack(s), {report.blobs} blob(s), {report.snapshots} image(s), "
                f"{report.bytes_read / 2**20:.1f} MiB read: "
                + ("no errors" if report.ok else f"{len(report.errors)} error(s)")
            )
        return 0 if report.ok else 1
    staging = args.staging_dir or args.data_dir / "staging"
    roots = (StagingIndex.read_disk(p) for p in sorted(staging.glob("*.fidx")) if staging.is_dir())
    gc = store.gc(roots)
    if gc.deferred:
        raise CliError("a run is writing to the store (or an export is reading it); try again when it is done")
    for line in gc.errors:
        print(f"FAILED: {line}")
    print(
        f"{gc.packs_deleted} pack(s) deleted, {gc.packs_repacked} repacked, "
        f"{gc.blobs_freed} blob(s) and {gc.bytes_freed / 2**20:.1f} MiB freed"
    )
    return 0 if not gc.errors else 1


def _copy(store: object, args: argparse.Namespace) -> int:
    from opensmc.chunkstore.copy import CopyRefused, copy_store
    from opensmc.chunkstore.location import StoreLocation, backend_for
    from opensmc.images.store import ImageStore

    assert isinstance(store, ImageStore)
    to = StoreLocation(str(args.to), args.s3_endpoint, args.s3_region)
    try:
        dst = backend_for(to)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    source = args.data_dir / "store"
    if not to.is_s3 and Path(args.to).resolve() == source.resolve():
        raise UsageError("--to is the data dir's store itself")
    try:
        report = copy_store(store.repo.backend, dst)
        check = ImageStore(to).check(read_data=False)
    except CopyRefused as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # botocore and OS errors say in one line what failed (credentials, bucket, space)
        raise CliError(f"copy to {args.to} failed: {str(exc).splitlines()[0]}; run it again to go on") from None
    print(json.dumps({"to": str(args.to), "copied": report.copied, "skipped": report.skipped,
                      "bytes": report.bytes, "images": check.snapshots, "ok": check.ok,
                      "errors": check.errors}, indent=2))  # fmt: skip
    return 0 if check.ok else 1

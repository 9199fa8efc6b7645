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
        raise UsageError("give a subcommand: check or gc")
    store = _store(args.data_dir)
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
    staging = args.data_dir / "staging"
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

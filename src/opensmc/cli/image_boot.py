"""`opensmc image boot-test` and `opensmc image serve --nbd`: use an image where it is stored.

Both run on the machine that holds the image store and need ``--data-dir``
(the server's data dir). They do not go over the HTTP API on purpose: a
boot test is minutes of QEMU on the host's CPUs and a served disk is read
at random by a guest or a tool, and both read the chunk store directly
instead of streaming whole disks through the download route (which has no
ranges). The boot test's console log and verdict are kept in
``<data-dir>/boot-tests/<image id>/``, where ``image list/show`` find them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from opensmc.cli.errors import CliError, UsageError
from opensmc.cli.image_access import ImageCliError


def _store(data_dir: Path | None, what: str) -> tuple[Path, object]:
    if data_dir is None:
        raise UsageError(
            f"{what} runs on the machine that holds the image store: give --data-dir DIR (the server's data "
            "dir); it reads the store directly rather than streaming the disk over HTTP"
        )
    from opensmc.images.store import ImageError, ImageStore

    root = data_dir / "store"
    if not (root / "config").is_file():
        raise UsageError(f"{data_dir} holds no image store (looked for {root})")
    try:
        return root, ImageStore(root)
    except ImageError as exc:
        raise ImageCliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if args.image_command == "boot-test":
        return boot_test(args)
    return serve(args)


def boot_test(args: argparse.Namespace) -> int:
    from opensmc.images.boot import BootTestError, results_dir
    from opensmc.images.boot import boot_test as run_test
    from opensmc.images.store import ImageStore

    _root, store = _store(args.data_dir, "boot-test")
    assert isinstance(store, ImageStore)
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    show = None if args.json else (lambda line: print(f"  | {line[:160]}", file=sys.stderr, flush=True))
    try:
        verdict = run_test(
            store, args.image_id, results_dir(args.data_dir), disk=args.disk, timeout=args.timeout,
            silence=args.silence, accel=args.accel, bus=args.bus, on_line=show,
        )  # fmt: skip
    except BootTestError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2))
        return 0 if verdict.passed else 1
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    how = f"{verdict.seconds:g} s, {verdict.accel.upper()}, {verdict.bus}, disk attached by {verdict.attach}"
    if verdict.passed:
        print(f"PASSED: {args.image_id} disk {args.disk}: {verdict.reason} ({how})")
    else:
        print(f"FAILED: {args.image_id} disk {args.disk}: stage {verdict.stage}: {verdict.reason} ({how})")
        print("last console lines:")
        for line in verdict.last_lines:
            print(f"  | {line}")
    print(f"console log: {verdict.log}")
    return 0 if verdict.passed else 1


def serve(args: argparse.Namespace) -> int:
    from opensmc.images import nbd
    from opensmc.images.store import ImageError, ImageStore

    if not args.nbd:
        raise UsageError("give --nbd: NBD is how serve attaches a disk (qemu, qemu-img, nbdcopy, nbd-client)")
    root, store = _store(args.data_dir, "serve")
    assert isinstance(store, ImageStore)
    try:
        disks = store.get(args.image_id).disks
    except ImageError as exc:
        raise ImageCliError(str(exc)) from None
    if not 0 <= args.disk < len(disks):
        raise ImageCliError(f"image {args.image_id} has no disk {args.disk} (it has {len(disks)})")
    try:
        listen = nbd.Listen.parse(args.listen)
        cmd = nbd.command(root, args.image_id, args.disk, listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except nbd.NbdError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"serving {args.image_id} disk {args.disk} ({disks[args.disk].size} bytes) read-only at {listen.uri()}; "
        "Ctrl-C stops",
        flush=True,
    )
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if code != 0:
        raise CliError(f"nbdkit exited with status {code} (see its messages above)")
    return 0

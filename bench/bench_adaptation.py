"""How long OS adaptation takes on the test's Debian 12 guest, by initramfs configuration (no server, no agent).

Puts a cached guest disk (tests/guest.py: built once, minutes) into a fresh
chunk store as an image and runs :func:`opensmc.images.adaptation.adapt` on
it, as Processing does, then prints the seconds, where the appliance ran
(KVM or TCG) and the adaptation log. Recipes:

- ``legacy``: the e2e test's guest, a ``MODULES=list`` host-only initramfs;
- ``most``: the plain guest, Debian's default ``MODULES=most`` (the case
  that ran past the 420 s limit under TCG before the adaptation built its
  initramfs with ``MODULES=dep`` plus the virtio drivers).

    python bench/bench_adaptation.py [--recipe most|legacy] [--timeout 420] [--boot] [--dir /var/tmp/osmc-bench-adapt]

``--boot`` then seals the adapted disk as an image (the chunks libguestfs
changed, as Processing does) and boot-tests it on virtio.

Runs one libguestfs appliance: on a machine without usable KVM it is a TCG
guest that takes a core for minutes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.guest import LEGACY_RECIPE, RECIPE, debian_guest  # noqa: E402

from opensmc.chunkstore.snapshots import DiskIndex  # noqa: E402
from opensmc.images.adaptation import adapt, harvest  # noqa: E402
from opensmc.images.boot import KVM_NOTE, boot_test  # noqa: E402
from opensmc.images.store import ImageStore  # noqa: E402

CS = 16384


def import_disk(store: ImageStore, path: Path, image_id: str) -> None:
    size = path.stat().st_size
    chunks = -(-size // CS)
    digests = np.zeros((chunks, 16), dtype=np.uint8)
    with store.repo.session(), path.open("rb") as f:
        for i in range(chunks):
            data = f.read(CS)
            if any(data):
                h = xxhash.xxh3_128_digest(data)
                store.repo.put(h, data, compress=True)
                digests[i] = np.frombuffer(h, dtype=np.uint8)
        store.repo.flush()
        store.create_image(image_id, [DiskIndex(size, CS, digests)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("most", "legacy"), default="most")
    parser.add_argument("--timeout", type=float, default=420.0)
    parser.add_argument("--boot", action="store_true", help="boot-test the adapted image on virtio")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-bench-adapt"))
    args = parser.parse_args()
    guest = debian_guest(RECIPE if args.recipe == "most" else LEGACY_RECIPE)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    store = ImageStore(args.dir / "store")
    started = time.monotonic()
    import_disk(store, guest.disk, "m-bench")
    print(f"imported {guest.disk} in {time.monotonic() - started:.1f} s")
    result = adapt(store, "m-bench", 0, args.dir / "tmp", args.dir / KVM_NOTE, timeout=args.timeout)
    print(f"recipe {args.recipe}: adapted={result.adapted} in {result.seconds} s under {result.accel or '-'}")
    for line in [*result.changes, *(f"warning: {w}" for w in result.warnings), *(f"note: {n}" for n in result.notes)]:
        print(f"  {line}")
    passed = True
    if args.boot and result.adapted:
        with store.repo.session():
            adapted = harvest(store, store.get("m-bench").disks[0].index, result)
            store.create_image("m-bench-adapted", [adapted])
        print(f"sealed m-bench-adapted: {result.changed_chunks} chunks changed")
        verdict = boot_test(store, "m-bench-adapted", args.dir / "boot-tests", timeout=480)
        passed = verdict.verdict == "passed"
        print(f"boot test on virtio: {verdict.verdict} at stage {verdict.stage} in {verdict.seconds} s "
              f"under {verdict.accel}: {verdict.reason}")  # fmt: skip
    result.cleanup()
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0 if result.adapted and passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""File-level migration benchmark: a tree of ~100,000 files / 2 GB, end to end, against rsync -aHAX.

Drives the product through its front door, as ``bench_e2e.py`` does: real
``opensmc server`` and ``opensmc agent run`` processes and the official SDK.
The source is a GPT disk whose root partition (ext4) is copied file by file
(``SystemDiskPart.1.Block=false``, a 3 GiB target); its "mounted" tree is a
directory handed to the agent with ``--mount 0_0=DIR`` (this machine cannot
mount). With the page cache dropped before every timed run:

- **full**: ``StartReplicationJob`` until the run's image is made (the job
  Waiting with an ImageId); the peer: ``rsync -aHAX tree/ copy/`` + ``sync``;
- **1 % changed**: 1 % of the files rewritten (new bytes, new mtime), then
  ``CutOverReplicationJob SyncData=true`` until Finished; the peer: the same
  rsync again + ``sync``.

Both see the same tree in the same state. The image is checked: the
partition's new filesystem passes ``e2fsck -fn``, holds as many inodes as
the tree has entries, and 50 files picked at random read back identical.

    python bench/bench_file_level.py [--dir /var/tmp/osmc-files] [--files 100000] [--mib 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import Product, add_agent_arg  # the same server, agent and SDK driver
from bench_replication import MiB, drop_caches

GIB = 1024 * MiB


def build_tree(root: Path, files: int, total: int, seed: int = 7) -> None:
    """~``files`` files of ``total`` bytes in all (sizes exponential), half random bytes, half text."""
    rng = random.Random(seed)
    blob = rng.randbytes(8 * MiB)
    text = b"".join(b"line %d of a text file, compressible like logs and sources\n" % i for i in range(20000))
    avg = total // files
    for i in range(files):
        d = root / f"d{i % 500:03d}" / f"s{i % 7}"
        if i < 3500:
            d.mkdir(parents=True, exist_ok=True)
        size = min(int(rng.expovariate(1 / avg)), len(blob) - 1)
        if i % 2:
            off = rng.randrange(0, len(blob) - size)
            data = blob[off : off + size]
        else:
            data = (text * (size // len(text) + 1))[:size]
        (d / f"f{i:06d}").write_bytes(data)


def change_one_percent(root: Path, seed: int = 11) -> int:
    rng = random.Random(seed)
    paths = sorted(str(p) for p in root.rglob("f*") if p.is_file())
    picked = rng.sample(paths, max(1, len(paths) // 100))
    for p in picked:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.write(rng.randbytes(min(size, 4096)) or b"x")
        os.utime(p, None)
    return len(picked)


def build_disk(path: Path, size: int) -> None:
    """A GPT disk, its one partition an (empty) ext4: the agent reads its superblock (UUID, label, features)."""
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
                   input="label: gpt\nstart=2048, type=linux, name=root\n", text=True, check=True)  # fmt: skip
    fs = path.with_suffix(".fs")
    with fs.open("wb") as f:
        f.truncate(size - 2 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", str(fs)], check=True)
    with fs.open("rb") as src, path.open("r+b") as dst:
        dst.seek(MiB)
        while block := src.read(4 * MiB):
            if block.strip(b"\0"):
                dst.write(block)
            else:
                dst.seek(len(block), os.SEEK_CUR)
    fs.unlink()


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    return time.monotonic() - t0


def entries(root: Path) -> int:
    seen: set[int] = set()
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                n += 1
    return n


def verify(product: Product, image_id: str, work: Path, tree: Path) -> bool:
    out = work / "exported.img"
    product.export(image_id, out)
    fs = work / "exported-root.fs"
    subprocess.run(["dd", f"if={out}", f"of={fs}", "bs=1M", "skip=1", "count=3072", "conv=sparse", "status=none"],
                   check=True)  # fmt: skip
    out.unlink()
    ok = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True).returncode == 0
    stats = subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in stats.splitlines() if ":" in line)
    used = int(fields["Inode count"]) - int(fields["Free inodes"])
    ok = ok and used == 11 + entries(tree)  # inodes 1-10 are reserved, 11 is lost+found
    rng = random.Random(3)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("f*"))
    for rel in rng.sample(files, 50):
        dumped = work / "one"
        subprocess.run(["debugfs", "-R", f"dump /{rel} {dumped}", str(fs)], capture_output=True, check=True)
        same = hashlib.sha256(dumped.read_bytes()).digest() == hashlib.sha256((tree / rel).read_bytes()).digest()
        ok = ok and same
    fs.unlink()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-files"))
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--mib", type=int, default=2000)
    add_agent_arg(ap)
    args = ap.parse_args()
    work: Path = args.dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree, copy = work / "tree", work / "rsync-copy"
    print(f"building a tree of {args.files} files, {args.mib} MB, in {tree} ...", flush=True)
    build_tree(tree, args.files, args.mib * 1000 * 1000)
    disk = work / "source.img"
    build_disk(disk, 4 * GIB)
    rows: list[tuple[str, str, float, bool]] = []

    product = Product(work, disk, ["--mount", f"0_0={tree}", *args.agent_arg])
    try:
        req = product.models.CreateReplicationJobRequest(
            region_id="local", source_id=product.source_id, name="bench-files", run_once=False, frequency=1,
            max_number_of_image_to_keep=2,
            system_disk_part=[product.models.CreateReplicationJobRequestSystemDiskPart(
                device="0_0", size_bytes=3 * GIB, block=False)],
        )  # fmt: skip
        job_id = str(product.sdk.create_replication_job(req).body.job_id)
        drop_caches()
        cpu0 = product.cpu()
        full, image1 = product.full_run(job_id)
        cpu_full = [b - a for a, b in zip(cpu0, product.cpu(), strict=True)]
        rows.append(("full", "opensmc: StartReplicationJob → image made", full, verify(product, image1, work, tree)))
        drop_caches()
        t = timed(["rsync", "-aHAX", f"{tree}/", f"{copy}/"])
        rows.append(("full", "rsync -aHAX + sync", t, True))

        changed = change_one_percent(tree)
        drop_caches()
        cpu0 = product.cpu()
        inc, image2 = product.incremental_run(job_id, image1)
        cpu_inc = [b - a for a, b in zip(cpu0, product.cpu(), strict=True)]
        rows.append(("1% changed", "opensmc: CutOver SyncData=true → Finished", inc,
                     verify(product, image2, work, tree)))  # fmt: skip
        drop_caches()
        t = timed(["rsync", "-aHAX", f"{tree}/", f"{copy}/"])
        rows.append(("1% changed", "rsync -aHAX + sync", t, True))
        processing = product.processing_seconds(job_id)
        server_peak, agent_peak = product.peaks()
        agent_log = (work / "agent.log").read_text()
        server_log = (work / "server.log").read_text()
    finally:
        product.stop()
    load = os.getloadavg()[0]
    print(f"\n{args.files} files, {args.mib} MB; {changed} files changed for the second run; load {load:.1f}")
    print(f"{'work':<11} {'tool':<45} {'seconds':>8} {'opensmc / peer':>15}  ok")
    for kind, tool, secs, ok in rows:
        ref = next(s for k, t, s, _ in rows if k == kind and t.startswith("opensmc"))
        print(f"{kind:<11} {tool:<45} {secs:8.2f} {ref / secs:14.2f}x  {'✓' if ok else '✗'}")

    # (user, system) of the server, then of the agent. Until 2026-12-04 this line printed the
    # server's user and system seconds as "server + agent": the agent's were never shown.
    def cpu_text(c: list[float]) -> str:
        return f"{c[0] + c[1]:.2f} ({c[0]:.2f} user) + {c[2] + c[3]:.2f} ({c[2]:.2f} user)"

    print(f"CPU seconds, server + agent (rsync, mke2fs and the tunnel are their children, not counted): "
          f"full {cpu_text(cpu_full)}, incremental {cpu_text(cpu_inc)}")  # fmt: skip
    print(f"Processing per run: {', '.join(f'{p:.3f} s' for p in processing)}")
    print(f"peak memory: server {server_peak:.0f} MiB, agent {agent_peak:.0f} MiB")
    for line in re.findall(r"partition 0_0: \d+ of \d+ files sent.*", agent_log):
        print("agent:", line)
    for line in re.findall(r"volume \S+: ext4 filesystem .*", server_log):
        print("receiver:", line)
    if not all(r[3] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

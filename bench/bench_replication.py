"""Block replication benchmark: OpenSMC's agent → receiver against rsync and cp, same run.

Builds the PERF_FLOORS.md test image (2 GiB by default: 40% random data in
scattered 1 MiB regions, the rest zeros written for real), then times, with
the page cache dropped before every run (when allowed) and durability included:

- full copy: OpenSMC agent pipeline → aiohttp receiver over loopback (flush =
  fsync), ``rsync --whole-file --sparse`` through an rsync daemon on loopback
  (+ sync), ``cp --sparse=always`` (+ sync);
- incremental, after overwriting 1% of the 4 KiB blocks at random: OpenSMC
  with the receiver's hash map, ``rsync --inplace --no-whole-file`` with the
  default block size and with ``-B 4096`` (``-I`` so rsync's size+mtime quick
  check cannot skip a file whose mtime falls in the same second).

Every result is checked against the source with a hash. Agent and receiver
run as separate processes so their peak RSS can be reported.

    python bench/bench_replication.py [--dir /var/tmp/osmc-bench] [--size-mib 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

RECEIVER = """
import sys
from aiohttp import web
from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository
from opensmc.receiver.http import make_app
app = make_app(sys.argv[1], Repository(LocalBackend(sys.argv[3])), lambda token, vid: token == "bench")
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""

AGENT = """
import json, resource, sys, time
from opensmc.agent.pipeline import replicate
from opensmc.agent.uploader import HttpSender
url, vid, src = sys.argv[1:4]
t0 = time.monotonic()
with HttpSender(url, vid, "bench") as s:
    _, prev = s.fetch_hashes()
    r = replicate(src, s, previous=prev, level=int(sys.argv[4]), chunk_size=16384)
    s.flush()
print(json.dumps({"seconds": time.monotonic() - t0, "sent": r.chunks_sent, "bytes": r.bytes_plain,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(4 * MiB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def build_image(path: Path, size_mib: int, seed: int = 42) -> None:
    rng = np.random.default_rng(seed)
    regions = set(rng.choice(size_mib, size=int(size_mib * 0.4), replace=False).tolist())
    zero = b"\0" * MiB  # a real buffer: bytes(N) maps the zero page and reads at fake speed
    with open(path, "wb") as f:
        for i in range(size_mib):
            f.write(rng.bytes(MiB) if i in regions else zero)
        os.fsync(f.fileno())


def dirty_one_percent(path: Path, seed: int = 7) -> None:
    size = path.stat().st_size
    blocks = size // 4096
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for b in sorted(rnd.sample(range(blocks), blocks // 100)):
            f.seek(b * 4096)
            f.write(rnd.randbytes(4096))
        os.fsync(f.fileno())


def timed(cmd: list[str], *, sync_after: bool = True) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if sync_after:
        os.sync()
    return time.monotonic() - t0


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class OpenSmc:
    def __init__(self, work: Path, size: int) -> None:
        sys.path.insert(0, str(ROOT / "src"))
        from opensmc.chunkstore.staging import StagingIndex

        self.vols = work / "volumes"
        self.store = work / "store"
        self.work = work
        for d in (self.vols, self.store):
            shutil.rmtree(d, ignore_errors=True)
        self.vols.mkdir()
        StagingIndex.create(self.vols / "bench.fidx", size, 16384).close()
        self.port = free_port()
        cmd = [sys.executable, "-c", RECEIVER, str(self.vols), str(self.port), str(self.store)]
        self.proc = subprocess.Popen(cmd, env=ENV)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def run(self, src: Path, level: int = 0) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}"
        out = subprocess.run(
            [sys.executable, "-c", AGENT, url, "bench", str(src), str(level)],
            env=ENV,
            check=True,
            capture_output=True,
            text=True,
        )
        result: dict[str, float] = json.loads(out.stdout)
        result["receiver_rss_mib"] = vm_hwm_mib(self.proc.pid)
        return result

    @property
    def image(self) -> Path:
        """What the receiver holds, read back through the chunk store into a file (not timed)."""
        from opensmc.chunkstore.backend import LocalBackend
        from opensmc.chunkstore.repository import Repository
        from opensmc.chunkstore.staging import StagingIndex

        disk = StagingIndex.read_disk(self.vols / "bench.fidx")
        repo = Repository(LocalBackend(self.store))
        out = self.work / "opensmc-held.img"
        with out.open("wb") as f:
            f.truncate(disk.size)
            for i in disk.nonzero():
                f.seek(int(i) * disk.chunk_size)
                f.write(repo.get(bytes(disk.digests[i])))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class RsyncDaemon:
    def __init__(self, work: Path) -> None:
        self.dest = work / "rsync-dest"
        self.dest.mkdir(exist_ok=True)
        conf = work / "rsyncd.conf"
        conf.write_text(
            f"use chroot = no\n[bench]\npath = {self.dest}\nread only = no\nuid = root\ngid = root\n"
        )
        self.port = free_port()
        cmd = ["rsync", "--daemon", "--no-detach", f"--port={self.port}", f"--config={conf}"]
        self.proc = subprocess.Popen(cmd)
        time.sleep(0.5)

    def url(self, name: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/bench/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-bench"))
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--level", type=int, default=0, help="zstd level for OpenSMC frames (0 = none)")
    args = ap.parse_args()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source.img"
    print(f"building {args.size_mib} MiB test image in {work} ...", flush=True)
    build_image(src, args.size_mib)
    size = src.stat().st_size
    cold = drop_caches()
    rows: list[tuple[str, str, float, bool, str]] = []

    def check(path: Path) -> bool:
        return file_hash(path) == file_hash(src)

    osmc = OpenSmc(work, size)
    rsyncd = RsyncDaemon(work)
    try:
        # -- full copy ----------------------------------------------------------------------------
        drop_caches()
        full = osmc.run(src, args.level)
        rss = f"agent {full['rss_mib']:.0f} MiB, receiver {full['receiver_rss_mib']:.0f} MiB"
        rows.append(("full", "opensmc agent → receiver (fsync)", full["seconds"], check(osmc.image), rss))
        drop_caches()
        t = timed(["rsync", "--whole-file", "--sparse", str(src), rsyncd.url("full.img")])
        rows.append(
            ("full", "rsync --whole-file --sparse (daemon) + sync", t, check(rsyncd.dest / "full.img"), "")
        )
        drop_caches()
        t = timed(["cp", "--sparse=always", str(src), str(work / "cp.img")])
        rows.append(("full", "cp --sparse=always + sync", t, check(work / "cp.img"), ""))

        # -- incremental --------------------------------------------------------------------------
        shutil.copyfile(rsyncd.dest / "full.img", rsyncd.dest / "b4096.img")
        dirty_one_percent(src)
        drop_caches()
        inc = osmc.run(src, args.level)
        rss = f"agent {inc['rss_mib']:.0f} MiB, sent {inc['bytes'] / MiB:.0f} MiB"
        rows.append(("1% changed", "opensmc incremental (fsync)", inc["seconds"], check(osmc.image), rss))
        drop_caches()
        t = timed(["rsync", "--inplace", "--no-whole-file", "-I", str(src), rsyncd.url("full.img")])
        rows.append(
            ("1% changed", "rsync --inplace --no-whole-file + sync", t, check(rsyncd.dest / "full.img"), "")
        )
        drop_caches()
        t = timed(
            ["rsync", "--inplace", "--no-whole-file", "-I", "-B", "4096", str(src), rsyncd.url("b4096.img")]
        )
        rows.append(("1% changed", "rsync --inplace -B 4096 + sync", t, check(rsyncd.dest / "b4096.img"), ""))
    finally:
        osmc.stop()
        rsyncd.stop()

    print(
        f"\n{size / MiB:.0f} MiB image, page cache "
        + ("dropped before each run" if cold else "NOT dropped (no permission)")
    )
    print(f"{'work':<11} {'tool':<46} {'seconds':>8} {'vs opensmc':>10}  ok  notes")
    for work_kind, tool, secs, ok, notes in rows:
        ref = next(s for w, tl, s, _, _ in rows if w == work_kind and tl.startswith("opensmc"))
        print(f"{work_kind:<11} {tool:<46} {secs:8.2f} {secs / ref:9.2f}x  {'✓' if ok else '✗'}  {notes}")
    if not all(r[3] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

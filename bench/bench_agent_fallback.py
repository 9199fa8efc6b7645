"""The agent's data path with the standard-library fallbacks against the accelerated agent, same run.

On the PERF_FLOORS.md test image (2 GiB by default: 40% random data in
scattered 1 MiB regions, the rest zeros), one aiohttp receiver process on
loopback, and an agent process per variant sending the image to a volume of
its own, with the page cache dropped before every run (when allowed) and the
receiver's flush (fsync) included:

- ``accelerated``: this venv's Python with xxhash, zstandard and numpy;
- ``stdlib``: the same Python with ``OPENSMC_AGENT_PURE=1`` (blake2b-128, zlib,
  ``bytes`` comparison for zeros): the agent on a server without those packages;
- ``stdlib py3.6``: the server's zipapp under a real Python 3.6 with no site
  packages (``-I -S``), as on CentOS 7 (skipped when no 3.6 is found).

Each does a full copy, then (after 1% of the 4 KiB blocks are overwritten) an
incremental run against the receiver's hash map. An agent without xxhash
cannot compare its hashes with the receiver's xxh3-128 map: it compares with
its own digests of the last run, paired with the receiver's map then
(agent/owncache.py, kept in a directory beside the image here), as
agent/tasks.py does. Every variant's result is checked against the source.
Peak RSS of each agent process is reported (the memory bound of docs/agent.md).

    python bench/bench_agent_fallback.py [--dir /var/tmp/osmc-bench] [--size-mib 2048] [--level 0]
        [--python36 /root/.pyenv/versions/3.6.15/bin/python3.6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replication import ENV, ROOT, MiB, OpenSmc, build_image, dirty_one_percent, drop_caches, file_hash

# Python 3.6 compatible: it also runs under the real 3.6, from the zipapp.
AGENT = """
import json, resource, sys, time
if len(sys.argv) > 6:
    sys.path.insert(0, sys.argv[6])
from opensmc.agent.owncache import Recorder
from opensmc.agent.pipeline import replicate
from opensmc.agent.uploader import HttpSender
from opensmc.wire import frames
url, vid, src, level, cache = sys.argv[1:6]
t0 = time.monotonic()
with HttpSender(url, vid, "bench") as s:
    # as agent/tasks.py does it: an agent whose hash is not the receiver's compares with its own
    _, prev = s.fetch_hashes()
    rec = Recorder(cache, vid, 16384, frames.DEFAULT_HASH) if prev.hash_id != frames.DEFAULT_HASH else None
    r = replicate(src, s, previous=rec.previous(prev) if rec else prev, level=int(level), chunk_size=16384,
                  keep_hashes=False, on_hash=rec.record if rec else None)
    s.flush()
    if rec:
        rec.keep(s.fetch_hashes()[1])
print(json.dumps({"seconds": time.monotonic() - t0, "sent": r.chunks_sent, "bytes": r.bytes_plain,
                  "wire": r.bytes_wire, "hash": frames.HASH_NAMES[r.hash_id],
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_agent(cmd: list[str], env: dict[str, str], url: str, vid: str, src: Path, level: int, pyz: str) -> dict:
    cache = str(src.parent / "agent-hashes")
    args = [*cmd, "-c", AGENT, url, vid, str(src), str(level), cache, *([pyz] if pyz else [])]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-bench"))
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--level", type=int, default=0, help="zstd level (zlib stands in without zstandard), 0 = none")
    ap.add_argument("--python36", default="/root/.pyenv/versions/3.6.15/bin/python3.6")
    args = ap.parse_args()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from opensmc.api.agent_dist import build_pyz
    from opensmc.chunkstore.staging import StagingIndex

    shutil.rmtree(work / "agent-hashes", ignore_errors=True)  # this run's volumes are new
    pyz = work / "opensmc-agent.pyz"
    pyz.write_bytes(build_pyz())
    variants: list[tuple[str, list[str], dict[str, str], str]] = [
        ("accelerated", [sys.executable], ENV, ""),
        ("stdlib", [sys.executable], dict(ENV, OPENSMC_AGENT_PURE="1"), ""),
    ]
    if shutil.which(args.python36) or Path(args.python36).exists():
        variants.append(("stdlib py3.6", [args.python36, "-I", "-S"], {"PATH": os.environ["PATH"]}, str(pyz)))
    else:
        print(f"no Python 3.6 at {args.python36}: that variant is skipped")

    src = work / "source.img"
    print(f"building {args.size_mib} MiB test image in {work} ...", flush=True)
    build_image(src, args.size_mib)
    size = src.stat().st_size
    cold = drop_caches()
    osmc = OpenSmc(work, size)
    url = f"http://127.0.0.1:{osmc.port}"
    results: dict[str, dict[str, dict]] = {}
    ok: dict[str, bool] = {}
    try:
        for name, *_ in variants:
            StagingIndex.create(osmc.vols / f"{name.replace(' ', '-')}.fidx", size, 16384).close()
        for phase in ("full", "1% changed"):
            if phase == "1% changed":
                dirty_one_percent(src)
            for name, cmd, env, path in variants:
                drop_caches()
                vid = name.replace(" ", "-")
                results.setdefault(phase, {})[name] = run_agent(cmd, env, url, vid, src, args.level, path)
        want = file_hash(src)
        for name, *_ in variants:
            vid = name.replace(" ", "-")
            shutil.copyfile(osmc.vols / f"{vid}.fidx", osmc.vols / "bench.fidx")
            ok[name] = file_hash(osmc.image) == want
    finally:
        osmc.stop()

    print(
        f"\n{size / MiB:.0f} MiB image, level {args.level}, page cache "
        + ("dropped before each run" if cold else "NOT dropped (no permission)")
    )
    print(f"{'work':<11} {'agent':<14} {'hash':<12} {'seconds':>8} {'vs accel':>9} {'sent MiB':>9} {'RSS MiB':>8}  ok")
    for phase, by_name in results.items():
        ref = by_name["accelerated"]["seconds"]
        for name, r in by_name.items():
            print(
                f"{phase:<11} {name:<14} {r['hash']:<12} {r['seconds']:8.2f} {r['seconds'] / ref:8.2f}x "
                f"{r['bytes'] / MiB:9.0f} {r['rss_mib']:8.0f}  {'✓' if ok[name] else '✗'}"
            )
    if not all(ok.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""``check``: read every pack and prove every blob, index and snapshot (as ``restic check``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from opensmc.chunkstore.backend import ObjectNotFound
from opensmc.chunkstore.packs import PackCorrupt, decode_blob, parse_index, parse_pack
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.snapshots import list_snapshots, load_snapshot

__all__ = ["CheckReport", "check"]


@dataclass
class CheckReport:
    packs: int = 0
    blobs: int = 0
    snapshots: int = 0
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check(repo: Repository, *, read_data: bool = True) -> CheckReport:
    """Every pack parses, matches its name and its index object, every blob its hash;
    every blob a snapshot names is in some pack. ``read_data=False`` checks indexes only."""
    report = CheckReport()
    backend = repo.backend
    known: set[bytes] = set()
    with repo.session():
        index_names = {n.removeprefix("index/") for n in backend.list("index/")}
        pack_names = {n.rpartition("/")[2] for n in backend.list("data/")}
        for pack in sorted(pack_names - index_names):
            report.errors.append(f"pack {pack} has no index object (not counted as holding its blobs)")
        for pack in sorted(index_names):
            report.packs += 1
            try:
                entries = parse_index(backend.read(f"index/{pack}"))
            except (ObjectNotFound, PackCorrupt) as err:
                report.errors.append(f"index {pack}: {err}")
                continue
            if pack not in pack_names:
                report.errors.append(f"index {pack} names a pack that is missing ({len(entries)} blobs lost)")
                continue
            if read_data:
                try:
                    raw = backend.read(f"data/{pack[:2]}/{pack}")
                    report.bytes_read += len(raw)
                    in_pack = parse_pack(raw, pack)
                except (ObjectNotFound, PackCorrupt) as err:
                    report.errors.append(f"pack {pack}: {err}")
                    continue
                if in_pack != entries:
                    report.errors.append(f"pack {pack}: its index object differs from the index inside it")
                    continue
                for e in entries:
                    try:
                        decode_blob(e, raw[e.offset : e.offset + e.stored_length])
                    except PackCorrupt as err:
                        report.errors.append(f"pack {pack}: {err}")
                        continue
                    known.add(e.hash)
            else:
                known.update(e.hash for e in entries)
            report.blobs += len(entries)
        for image_id in list_snapshots(backend):
            report.snapshots += 1
            try:
                snap = load_snapshot(backend, image_id)
            except PackCorrupt as err:
                report.errors.append(f"snapshot {image_id}: {err}")
                continue
            for d_idx, disk in enumerate(snap.disks):
                missing = [int(i) for i in disk.nonzero() if bytes(disk.digests[i]) not in known]
                if missing:
                    report.errors.append(
                        f"snapshot {image_id} disk {d_idx}: {len(missing)} chunk(s) have no good blob "
                        f"(first at chunk {missing[0]})"
                    )
    return report

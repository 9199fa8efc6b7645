"""Where OS adaptation's log is kept: beside the image store, one folder per image, as boot tests are.

``<data dir>/os-adaptation/<image id>/disk<N>.log`` (one line per change,
then the warnings and notes) and ``disk<N>.json`` (the whole record). Images
are immutable, so the log of how an image was made lives next to it, never
in it. ``image show`` and the image routes show it as ``OsAdaptation``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "SOURCE_SUFFIX", "adaptation_doc", "keep", "results_dir", "source_id"]

RESULTS_DIR = "os-adaptation"
#: the snapshot of the unadapted disks while an image is being adapted (removed once it is sealed)
SOURCE_SUFFIX = ".unadapted"


def results_dir(data_dir: Path) -> Path:
    return data_dir / RESULTS_DIR


def source_id(image_id: str) -> str:
    """The id of the temporary snapshot an adaptation reads (never an image of its own)."""
    return f"{image_id}{SOURCE_SUFFIX}"


def keep(root: Path, image_id: str, disk: int, record: dict[str, Any]) -> Path:
    """Write the log and the record of disk ``disk``'s adaptation; returns the log's path."""
    folder = root / image_id
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"disk{disk}.log"
    lines = [
        f"OS adaptation of {image_id} disk {disk}: {'adapted' if record.get('adapted') else 'NOT adapted'}",
        f"guest: {record.get('guest') or 'unknown'}; initramfs tool: {record.get('family') or '-'}; "
        f"{record.get('seconds')} s under {record.get('accel') or '-'}; {record.get('changed_chunks', 0)} chunks "
        "changed",
        *record.get("changes", []),
        *(f"warning: {w}" for w in record.get("warnings", [])),
        *(f"note: {n}" for n in record.get("notes", [])),
    ]
    for path, text in ((log, "\n".join(lines) + "\n"), (folder / f"disk{disk}.json", json.dumps(record, indent=2))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return log


def adaptation_doc(root: Path, image_id: str) -> list[dict[str, object]]:
    """Each adapted (or tried) disk, as ``image show`` and the image routes show it (``OsAdaptation``)."""
    out: list[dict[str, object]] = []
    folder = root / image_id
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("disk*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out.append(
            {
                "Disk": int(path.stem.removeprefix("disk") or 0),
                "Adapted": bool(doc.get("adapted")),
                "Guest": doc.get("guest"),
                "Changes": doc.get("changes", []),
                "Warnings": doc.get("warnings", []),
                "Seconds": doc.get("seconds"),
                "Log": str(path.with_suffix(".log")),
            }
        )
    return out

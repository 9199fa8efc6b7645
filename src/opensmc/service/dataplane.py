"""The data plane's side of the job life cycle: staging, agent tasks, images.

A started job waits in Running/Preparing until :func:`prepare` allocates its
staging volumes (one sparse volume per disk to move, under
``<data-dir>/staging/<TransitionInstanceId>-d<N>``, kept between runs of an
incremental job) and moves it to Syncing. The source's agent learns of the
task from its heartbeat (:func:`tasks_for`), streams the disks to the
receiver with a credential scoped to that job run (:func:`data_token`,
checked by :func:`authorize`), reports progress (:func:`progress`, which also
tells it to stop when the job was stopped) and the result
(:func:`task_result`). :func:`process` then turns the staging volumes into
an immutable image, proves it equal to what the agent sent when
``checksum`` is on, rotates old images, releases staging when the job
finishes, and closes the run.

Long steps (allocation, image creation) hold a lease on the job row
(``lease_owner``/``lease_until``) instead of a row lock, so several server
processes never process one job twice and a dead process's lease expires.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from opensmc.clock import new_id
from opensmc.domain import strictjson
from opensmc.domain.enums import BusinessStatus, JobStatus
from opensmc.domain.errors import SmcError
from opensmc.domain.selection import copy_ranges, excluded_devices
from opensmc.images.store import ImageCorrupt, ImageError, ImageStore, compare_with_source
from opensmc.receiver.volume import StagingVolume
from opensmc.service import jobs as job_service
from opensmc.service.context import Services
from opensmc.service.jobs_params import source_disks
from opensmc.store import images as image_q
from opensmc.store import jobs as job_store
from opensmc.store.tables import job_runs, jobs, sources

log = logging.getLogger("opensmc.dataplane")

CHUNK_SIZE = 64 * 1024
LEASE = timedelta(minutes=10)
_HOST = os.uname().nodename
_OWNER = f"{_HOST}:{os.getpid()}"


# names -------------------------------------------------------------------------------------


def staging_id(job_id: str) -> str:
    """The job's TransitionInstanceId: one staging allocation per job, kept between runs."""
    return "ti-" + job_id.removeprefix("j-")


def volume_id(transition_instance_id: str, disk_index: int) -> str:
    return f"{transition_instance_id}-d{disk_index}"


def job_of_volume(vid: str) -> str | None:
    head, sep, _disk = vid.rpartition("-d")
    return "j-" + head.removeprefix("ti-") if sep and head.startswith("ti-") else None


def image_store(svc: Services) -> ImageStore:
    return ImageStore(svc.settings.images_dir)


# which disks move ---------------------------------------------------------------------------


def selected_disks(job: Any, source_disks_json: str) -> list[dict[str, Any]]:
    """The source disks a job moves: the system disk, plus the data disks it names."""
    disks = source_disks(source_disks_json)
    if 0 not in disks:
        raise SmcError(
            "The source server reported no system disk; restart the agent so that it reports its disks.",
            code="SourceServer.NoDisk",
            http_status=400,
        )
    spec = json.loads(job.disk_spec or "{}")
    chosen = {0}
    for item in spec.get("DataDisks") or []:
        chosen.add(int(item["Index"]))
    for item in (spec.get("Disks") or {}).get("Data") or []:
        disk_id = str(item.get("DiskId", ""))
        for index, disk in disks.items():
            if index and disk_id in (str(index), str(disk.get("path", "")), str(disk.get("disk_id", ""))):
                chosen.add(index)
    missing = sorted(chosen - set(disks))
    if missing:
        raise SmcError(
            f"The job selects data disk(s) {missing} that the source no longer reports.",
            code="ReplicationJobDataDiskIndex.Invalid",
            http_status=400,
        )
    out: list[dict[str, Any]] = []
    for i in sorted(chosen):
        size = int(disks[i]["size_bytes"])
        parts = list(disks[i].get("parts") or disks[i].get("partitions") or [])
        excluded = excluded_devices(spec, i, parts)
        entry: dict[str, Any] = {"index": i, "path": str(disks[i].get("path", "")), "size_bytes": size}
        if excluded:
            entry["ranges"] = [list(r) for r in copy_ranges(size, parts, excluded, CHUNK_SIZE)]
            entry["excluded"] = sorted(excluded)
        out.append(entry)
    return out


def _params(job: Any) -> dict[str, Any]:
    try:
        # strict: a row written before NaN was refused must not break every heartbeat
        value = strictjson.loads(job.replication_parameters or "{}")
    except strictjson.StrictJsonError:
        return {}
    return value if isinstance(value, dict) else {}


# leases ---------------------------------------------------------------------------------------


def _dead_local_owner(owner: str | None) -> bool:
    """A lease held by a process of this host that no longer runs (killed, crashed).

    Such a lease need not be waited out: a server restarted after a crash takes
    the job over at once. Leases of other hosts can only expire.
    """
    host, _, pid = (owner or "").rpartition(":")
    if host != _HOST or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def _claim(svc: Services, job_id: str, business: BusinessStatus, stale_owner: str | None = None) -> bool:
    """Take the job's lease if it is Running/`business` and nobody else (alive) holds it."""
    now = svc.clock()
    free = [jobs.c.lease_until.is_(None), jobs.c.lease_until < now, jobs.c.lease_owner == _OWNER]
    if stale_owner:
        free.append(jobs.c.lease_owner == stale_owner)
    with svc.db.begin() as conn:
        res = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.status == JobStatus.RUNNING.value,
                jobs.c.business_status == business.value,
                or_(*free),
            )
            .values(lease_owner=_OWNER, lease_until=now + LEASE)
        )
        return res.rowcount == 1


def _release(svc: Services, job_id: str) -> None:
    with svc.db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_owner == _OWNER)
            .values(lease_owner=None, lease_until=None)
        )


def _ids_in(svc: Services, business: BusinessStatus) -> list[tuple[str, str | None]]:
    """(job id, lease owner if that owner is a dead process of this host) of jobs in Running/`business`."""
    with svc.db.connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.lease_owner)
            .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.business_status == business.value)
            .order_by(jobs.c.id)
            .limit(100)
        )
        return [(r.id, r.lease_owner if _dead_local_owner(r.lease_owner) else None) for r in rows]


# Preparing → Syncing --------------------------------------------------------------------------


def prepare(svc: Services) -> int:
    """Allocate staging for every job waiting in Preparing; returns how many moved on."""
    done = 0
    for job_id, stale in _ids_in(svc, BusinessStatus.PREPARING):
        if not _claim(svc, job_id, BusinessStatus.PREPARING, stale):
            continue
        try:
            with svc.db.connect() as conn:
                job = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
                src = conn.execute(select(sources.c.disks).where(sources.c.id == job.source_id)).one()
            ti = job.transition_instance_id or staging_id(job_id)
            for disk in selected_disks(job, src.disks):
                allocate_volume(svc, volume_id(ti, disk["index"]), disk["size_bytes"])
            job_service.mark_prepared(svc, job_id, ti)
            done += 1
        except SmcError as err:
            _fail(svc, job_id, err.code, err.message)
        except OSError as err:
            _fail(svc, job_id, "Staging.AllocationFailed", f"Cannot allocate the staging volumes: {err}")
        finally:
            _release(svc, job_id)
    return done


def allocate_volume(svc: Services, vid: str, size: int) -> None:
    """Create the sparse staging volume, or keep the existing one (resume, incremental runs)."""
    directory = svc.settings.staging_dir / vid
    if directory.exists():
        try:
            # Only the volume's metadata: StagingVolume.open() of a volume left dirty (a run
            # stopped or interrupted before its flush) rebuilds and checkpoints it, removing
            # the dirty marker under the receiver, which still holds the volume open and
            # then fails its next flush (500) and loses its crash protection.
            meta = json.loads((directory / "volume.json").read_text())
            if int(meta["size"]) == size and meta.get("version") == 1:
                return
        except Exception:  # an unreadable leftover is replaced below
            log.warning("staging volume %s is unreadable; making a new one", vid)
        shutil.rmtree(directory)
    svc.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    StagingVolume.create(directory, size, CHUNK_SIZE).close()


def _fail(svc: Services, job_id: str, code: str, message: str) -> None:
    log.warning("job %s failed: %s: %s", job_id, code, message)
    try:
        job_service.mark_failed(svc, job_id, code, job_service.status_info(code, message))
    except SmcError:  # already moved on (stopped, deleted): nothing to fail
        pass


# the agent's side -------------------------------------------------------------------------------


def data_token(svc: Services, job_id: str, run_id: int) -> str:
    """The receiver credential of one job run: valid only while that run is Syncing."""
    return f"{job_id}.{run_id}.{svc.secrets.mac(f'data:{job_id}:{run_id}')}"


def _current_run(svc: Services, job_id: str) -> tuple[str, str, int | None]:
    with svc.db.connect() as conn:
        row = conn.execute(select(jobs.c.status, jobs.c.business_status).where(jobs.c.id == job_id)).first()
        if row is None:
            return ("", "", None)
        run = job_store.open_run(conn, job_id)
    return (row.status, row.business_status, run.id if run else None)


def _is_syncing_run(status: str, business: str, current: int | None, run_id: int) -> bool:
    """Is `run_id` the job's current run, and is it Syncing? (Only then may data move.)"""
    return status == JobStatus.RUNNING.value and business == BusinessStatus.SYNCING.value and current == run_id


_auth_cache: dict[str, tuple[float, bool]] = {}
#: A data token is `<job id>.<run>.<hex HMAC-SHA256>`, well under this.
_MAX_TOKEN = 256
_auth_lock = threading.Lock()


def authorize(svc: Services, token: str, vid: str) -> bool:
    """May `token` write to volume `vid`? Only the current Syncing run of the volume's job."""
    now = time.monotonic()
    key = f"{token}|{vid}"
    with _auth_lock:
        hit = _auth_cache.get(key)
        if hit and now - hit[0] < 2.0:
            return hit[1]
    ok = _authorize(svc, token, vid)
    if ok:
        # Only verified credentials are cached: caching refusals let anyone grow the
        # cache with junk tokens (10,000 of 8 KB = 80 MiB). A refusal costs one HMAC
        # (no database read unless the MAC is right), so it need not be cached.
        with _auth_lock:
            if len(_auth_cache) > 10_000:
                _auth_cache.clear()
            _auth_cache[key] = (now, ok)
    return ok


def _authorize(svc: Services, token: str, vid: str) -> bool:
    if len(token) > _MAX_TOKEN:
        return False
    parts = token.split(".")
    # isascii: str.isdigit() also holds for "²", which int() refuses (a 500, not a 403)
    if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        return False
    job_id, run_text, _mac = parts
    if not hmac.compare_digest(token, data_token(svc, job_id, int(run_text))):
        return False
    if job_of_volume(vid) != job_id:
        return False
    return _is_syncing_run(*_current_run(svc, job_id), int(run_text))


def tasks_for(svc: Services, source_id: str) -> list[dict[str, Any]]:
    """The work a source's agent should be doing now (at most one task: one job per source)."""
    with svc.db.connect() as conn:
        job = conn.execute(
            select(jobs).where(
                jobs.c.source_id == source_id,
                jobs.c.status == JobStatus.RUNNING.value,
                jobs.c.business_status == BusinessStatus.SYNCING.value,
            )
        ).first()
        if job is None:
            return []
        src = conn.execute(select(sources.c.disks).where(sources.c.id == source_id)).one()
    _s, _b, run_id = _current_run(svc, job.id)
    if run_id is None:
        return []
    try:
        disks = selected_disks(job, src.disks)
    except SmcError:
        return []
    params = _params(job)
    ti = job.transition_instance_id or staging_id(job.id)
    return [
        {
            "task_id": f"{job.id}:{run_id}",
            "job_id": job.id,
            "run_id": run_id,
            "receiver": svc.settings.receiver_endpoint,
            "token": data_token(svc, job.id, run_id),
            "replication_parameters": {
                "bandwidth_limit": float(params.get("bandwidth_limit") or 0),
                "compress_level": int(params.get("compress_level") or 0),
                "checksum": bool(params.get("checksum") or False),
            },
            "chunk_size": CHUNK_SIZE,
            "disks": [{**d, "volume_id": volume_id(ti, d["index"])} for d in disks],
        }
    ]


def _task_ids(body: dict[str, Any]) -> tuple[str, int]:
    job_id = body.get("job_id")
    run_id = body.get("run_id")
    if not isinstance(job_id, str) or not isinstance(run_id, int):
        raise SmcError("job_id (string) and run_id (integer) are required.", code="InvalidTask", http_status=400)
    return job_id, run_id


def _owned(svc: Services, source_id: str, job_id: str) -> None:
    with svc.db.connect() as conn:
        row = conn.execute(select(jobs.c.source_id).where(jobs.c.id == job_id)).first()
    if row is None or row.source_id != source_id:
        raise SmcError(f"Job {job_id} is not a job of this source.", code="InvalidTask", http_status=404)


def progress(svc: Services, source_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Record progress; tell the agent whether to go on and at what bandwidth."""
    job_id, run_id = _task_ids(body)
    _owned(svc, source_id, job_id)
    done = body.get("bytes_done")
    total = body.get("bytes_total")
    status, business, current = _current_run(svc, job_id)
    go_on = _is_syncing_run(status, business, current, run_id)
    if go_on and isinstance(done, int) and isinstance(total, int) and done >= 0 and total >= 0:
        try:
            job_service.report_progress(svc, job_id, run_id, min(done, total), total)
        except SmcError:
            go_on = False
    with svc.db.connect() as conn:
        row = conn.execute(select(jobs.c.replication_parameters).where(jobs.c.id == job_id)).first()
    params = _params(row) if row else {}
    return {"continue": go_on, "bandwidth_limit": float(params.get("bandwidth_limit") or 0)}


def task_result(svc: Services, source_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The agent finished (or failed) a task."""
    job_id, run_id = _task_ids(body)
    _owned(svc, source_id, job_id)
    status, business, current = _current_run(svc, job_id)
    if not _is_syncing_run(status, business, current, run_id):
        return {"accepted": False, "reason": f"the job is {status}({business}), not syncing run {run_id}"}
    if body.get("ok") is True:
        with svc.db.begin() as conn:
            total = int(body.get("bytes_total") or 0)
            conn.execute(
                update(job_runs)
                .where(job_runs.c.id == run_id)
                .values(bytes_total=total, bytes_done=total, detail=json.dumps({"agent": body.get("stats", {})}))
            )
        job_service.mark_synced(svc, job_id)
        return {"accepted": True}
    code = str(body.get("error_code") or "Agent.SyncFailed")[:64]
    message = str(body.get("message") or "The agent could not send the disk data.")[:1000]
    _fail(svc, job_id, code, message)
    return {"accepted": True}


# Processing → Cleaning → Finished/Waiting ---------------------------------------------------------


def process(svc: Services) -> int:
    """Make the image of every job in Processing; returns how many finished their run."""
    done = 0
    for job_id, stale in _ids_in(svc, BusinessStatus.PROCESSING):
        if not _claim(svc, job_id, BusinessStatus.PROCESSING, stale):
            continue
        try:
            _process_one(svc, job_id)
            done += 1
        except (ImageError, OSError) as err:
            _fail(svc, job_id, "Image.CreateFailed", f"Cannot create the image: {err}")
        except SmcError as err:
            _fail(svc, job_id, err.code, err.message)
        finally:
            _release(svc, job_id)
    return done


def _process_one(svc: Services, job_id: str) -> None:
    with svc.db.connect() as conn:
        job = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
        src = conn.execute(select(sources.c.disks).where(sources.c.id == job.source_id)).one()
    _s, _b, run_id = _current_run(svc, job_id)
    ti = job.transition_instance_id or staging_id(job_id)
    disks = selected_disks(job, src.disks)
    store = image_store(svc)
    _discard_half_made(svc, store, job_id)
    image_id = new_id("m-")
    # The row comes first (state Creating): a crash from here on leaves a record of what to clean up.
    with svc.db.begin() as conn:
        image_q.add_image(
            conn,
            image_id=image_id,
            account_id=job.account_id,
            job_id=job_id,
            run_id=run_id,
            name=_image_name(conn, job, run_id),
            manifest="{}",
            now=svc.clock(),
            state=image_q.CREATING,
        )
    volumes = [StagingVolume.open(svc.settings.staging_dir / volume_id(ti, d["index"])) for d in disks]
    try:
        try:
            manifest = store.create_image(image_id, volumes)
        except ImageCorrupt as err:
            # Staging data damaged at rest: forget the bad chunks so that the next
            # StartReplicationJob sends them again, and say so.
            bad = sum(len(v.scrub()) for v in volumes)
            raise ImageError(
                f"{err}; {bad} damaged chunk(s) were dropped from the staging volume and will be sent "
                "again: start the job again"
            ) from err
        checksum = bool(_params(job).get("checksum"))
        verified: bool | None = None
        if checksum:
            # The volume maps hold the hashes the agent computed on the source and the
            # receiver checked frame by frame; the image must match them chunk for chunk,
            # and its stored chunks must re-hash to the manifest.
            mismatched = [
                i for d, v in zip(manifest.disks, volumes, strict=True) for i in compare_with_source(d, v.hashes())
            ]
            report = store.verify(image_id)
            verified = not mismatched and report.ok
            if not verified:
                raise ImageError(f"checksum verification failed: {len(mismatched)} chunk(s) differ, report {report}")
    except BaseException:
        _discard_half_made(svc, store, job_id)
        raise
    finally:
        for v in volumes:
            v.close()
    finishing = bool(job.run_once or job.final_run)
    with svc.db.begin() as conn:
        image_q.set_image(
            conn,
            image_id,
            state="Available",
            manifest=json.dumps(
                {
                    "disks": [
                        {"index": d["index"], "size": m.size, "sha256": m.sha256, "chunk_size": m.chunk_size}
                        for d, m in zip(disks, manifest.disks, strict=True)
                    ],
                    "checksum_verified": verified,
                }
            ),
        )
        if run_id is not None:
            conn.execute(update(job_runs).where(job_runs.c.id == run_id).values(checksum_verified=verified))
    job_service.mark_processed(svc, job_id, image_id)
    _rotate(svc, job)
    if finishing:
        release_staging(svc, job_id, ti)
    job_service.mark_cleaned(svc, job_id)


def _discard_half_made(svc: Services, store: ImageStore, job_id: str) -> None:
    """Remove images of this job that a failed or killed attempt left in state Creating."""
    with svc.db.connect() as conn:
        leftovers = image_q.creating_of_job(conn, job_id)
    for image_id in leftovers:
        try:
            store.delete_image(image_id)
        except ImageError:
            pass  # the store never got as far as this image
        with svc.db.begin() as conn:
            image_q.remove_image(conn, image_id)
        log.info("removed half-made image %s of job %s", image_id, job_id)


def _image_name(conn: Any, job: Any, run_id: int | None) -> str:
    # ImageName, or "<job name>-run<N>"; if taken, `_<JobId>` is appended, as SMC does.
    base = job.image_name or f"{job.name}-run{run_id or 0}"
    if not image_q.name_taken(conn, job.account_id, base):
        return str(base)
    name = f"{base}_{job.id}"
    n = 2
    while image_q.name_taken(conn, job.account_id, name):
        name = f"{base}_{job.id}_{n}"
        n += 1
    return name


def _rotate(svc: Services, job: Any) -> None:
    """Keep at most MaxNumberOfImageToKeep images of an incremental job (oldest go first)."""
    keep = int(job.max_images or 0)
    if job.run_once or keep <= 0:
        return
    with svc.db.connect() as conn:
        existing = image_q.images_of_job(conn, job.id)
    store = image_store(svc)
    for row in existing[: max(0, len(existing) - keep)]:
        with svc.db.begin() as conn:
            image_q.remove_image(conn, row.id)
        try:
            store.delete_image(row.id)
        except ImageError:
            log.warning("image %s was already gone from the image store", row.id)


def release_staging(svc: Services, job_id: str, transition_instance_id: str | None = None) -> None:
    ti = transition_instance_id or staging_id(job_id)
    root = svc.settings.staging_dir
    if not root.exists():
        return
    for entry in root.iterdir():
        if entry.name.startswith(ti + "-d"):
            shutil.rmtree(entry, ignore_errors=True)


#: statuses in which a job may still run again and so keeps its staging
_MAY_RUN = (
    JobStatus.READY.value,
    JobStatus.RUNNING.value,
    JobStatus.STOPPED.value,
    JobStatus.IN_ERROR.value,
    JobStatus.WAITING.value,
)


def sweep_staging(svc: Services) -> int:
    """Release staging of jobs that can never run again: gone, Deleting, Finished or Expired.

    Finished matters for CutOverReplicationJob SyncData=false (and expiry) of an
    incremental job: it ends the job without a run, so nothing else releases the
    staging kept between its runs.
    """
    root = svc.settings.staging_dir
    if not root.exists():
        return 0
    removed = 0
    owners: dict[str, list[str]] = {}
    for entry in root.iterdir():
        job_id = job_of_volume(entry.name)
        if job_id:
            owners.setdefault(job_id, []).append(entry.name)
    if not owners:
        return 0
    with svc.db.connect() as conn:
        alive = {
            r.id
            for r in conn.execute(select(jobs.c.id).where(jobs.c.id.in_(list(owners)), jobs.c.status.in_(_MAY_RUN)))
        }
    for job_id, names in owners.items():
        if job_id in alive:
            continue
        for name in names:
            shutil.rmtree(root / name, ignore_errors=True)
            removed += 1
    return removed


def tick(svc: Services) -> int:
    """One data-plane pass of the orchestrator."""
    sweep_staging(svc)
    return prepare(svc) + process(svc)

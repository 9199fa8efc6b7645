"""Tea SDK (alibabacloud-smc20190601) sessions over a real socket: replication jobs.

Every test runs with both of Tea's signing schemes (ACS3-HMAC-SHA256 and,
with ``signature_algorithm='v2'``, V1 HMAC-SHA1) and on both databases.
Responses are read through the SDK's models only: a wrong wrapper shape
makes ``resp.body`` None, so every body is asserted not None first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from alibabacloud_smc20190601 import models as m

from opensmc.service import jobs as job_service
from tests.compat.conftest import SmcServer, add_source, set_source_state
from tests.compat.tea_support import REGION, body, describe_job, iso_utc, status_of, tea_error

# replication jobs ---------------------------------------------------------------------


def _full_create(source_id: str, **over: Any) -> Any:
    fields: dict[str, Any] = {
        "region_id": REGION,
        "source_id": source_id,
        "name": "job-web",
        "description": "migrate web",
        "target_type": "Image",
        "image_name": "web-image",
        "system_disk_size": 40,
        "system_disk_part": [
            m.CreateReplicationJobRequestSystemDiskPart(device="0_1", size_bytes=20 << 30, block=True)
        ],
        "data_disk": [
            m.CreateReplicationJobRequestDataDisk(
                index=1,
                size=30,
                part=[
                    m.CreateReplicationJobRequestDataDiskPart(device="1_0", size_bytes=20 << 30, block=False)
                ],
            )
        ],
        "net_mode": 0,
        "run_once": True,
        "instance_type": "ecs.c6.large",
        "license_type": "BYOL",
        "replication_parameters": '{"bandwidth_limit":0,"compress_level":1,"checksum":true}',
        "resource_group_id": "rg-1",
        "client_token": "tok-job-1",
        "tag": [m.CreateReplicationJobRequestTag(key="env", value="prod")],
    }
    fields.update(over)
    return m.CreateReplicationJobRequest(**fields)


def test_replication_job_life_cycle(tea: Any, smc_server: SmcServer) -> None:
    svc = smc_server.services
    src = add_source(smc_server, "web-1")
    job = body(tea.create_replication_job(_full_create(src))).job_id
    assert job.startswith("j-")
    assert body(tea.create_replication_job(_full_create(src))).job_id == job  # idempotent ClientToken
    e = tea_error(tea.create_replication_job, _full_create(src, description="changed"))
    assert e.code == "IdempotentParameterMismatch"

    j = describe_job(tea, job)
    assert (j.status, j.source_id, j.name, j.description, j.region_id) == (
        "Ready",
        src,
        "job-web",
        "migrate web",
        REGION,
    )
    assert j.business_status in ("", None)
    assert j.job_type == 0 and j.net_mode == 0 and j.run_once is True
    assert j.system_disk_size == 40 and j.image_name == "web-image" and j.license_type == "BYOL"
    assert j.target_type == "Image" and j.instance_type == "ecs.c6.large" and j.resource_group_id == "rg-1"
    assert j.replication_parameters == '{"bandwidth_limit":0,"compress_level":1,"checksum":true}'
    assert float(j.progress) == 0.0
    assert j.creation_time.endswith("Z") and j.valid_time.endswith("Z")
    assert [(p.device, p.size_bytes, p.block) for p in j.system_disk_parts.system_disk_part] == [
        ("0_1", 20 << 30, True)
    ]
    dd = j.data_disks.data_disk[0]
    assert (dd.index, dd.size) == (1, 30)
    assert [(p.device, p.block) for p in dd.parts.part] == [("1_0", False)]
    assert [(t.key, t.value) for t in j.tags.tag] == [("env", "prod")]
    source = body(tea.describe_source_servers(m.DescribeSourceServersRequest(source_id=[src]))).source_servers
    assert source.source_server[0].job_id == job

    e = tea_error(tea.create_replication_job, _full_create(src, client_token=None, name="job-2"))
    assert status_of(e) == 400  # one unfinished job per source

    # Ready: every attribute may change
    body(
        tea.modify_replication_job_attribute(
            m.ModifyReplicationJobAttributeRequest(
                job_id=job,
                name="job-web-2",
                description="renamed",
                system_disk_size=50,
                instance_type="ecs.g7.large",
            )
        )
    )
    j = describe_job(tea, job)
    assert (j.name, j.description, j.system_disk_size, j.instance_type) == (
        "job-web-2",
        "renamed",
        50,
        "ecs.g7.large",
    )

    e = tea_error(tea.stop_replication_job, m.StopReplicationJobRequest(job_id=job))
    assert (e.code, status_of(e)) == ("ReplicationJob.InvalidStatus", 400)

    body(tea.start_replication_job(m.StartReplicationJobRequest(job_id=job)))
    j = describe_job(tea, job)
    assert (j.status, j.business_status) == ("Running", "Preparing")
    assert [r.type for r in j.replication_job_runs.replication_job_run] == ["Manual"]
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id=job))
    assert (e.code, status_of(e)) == ("ReplicationJob.InvalidStatus", 400)
    assert "Ready" in e.message and "Stopped" in e.message and "InError" in e.message
    e = tea_error(tea.stop_replication_job, m.StopReplicationJobRequest(job_id=job))  # only while Syncing
    assert e.code == "ReplicationJob.InvalidStatus"
    e = tea_error(tea.delete_replication_job, m.DeleteReplicationJobRequest(job_id=job))
    assert e.code == "ReplicationJob.InvalidStatus"
    e = tea_error(
        tea.modify_replication_job_attribute,
        m.ModifyReplicationJobAttributeRequest(job_id=job, system_disk_size=60),
    )
    assert e.code == "ReplicationJob.InvalidStatus"
    body(
        tea.modify_replication_job_attribute(
            m.ModifyReplicationJobAttributeRequest(job_id=job, description="any time")
        )
    )
    running = body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(status="Running")))
    assert [x.job_id for x in running.replication_jobs.replication_job] == [job]
    in_use = body(tea.describe_source_servers(m.DescribeSourceServersRequest(source_id=[src])))
    assert in_use.source_servers.source_server[0].state == "InUse"

    job_service.mark_prepared(svc, job, "ti-1")
    j = describe_job(tea, job)
    assert (j.business_status, j.transition_instance_id) == ("Syncing", "ti-1")
    body(tea.stop_replication_job(m.StopReplicationJobRequest(job_id=job)))
    assert describe_job(tea, job).status == "Stopped"
    body(tea.start_replication_job(m.StartReplicationJobRequest(job_id=job)))
    assert (describe_job(tea, job).status, describe_job(tea, job).business_status) == ("Running", "Preparing")
    job_service.mark_prepared(svc, job, "ti-1")
    job_service.mark_synced(svc, job)
    assert describe_job(tea, job).business_status == "Processing"
    job_service.mark_processed(svc, job, "m-image00000000000001")
    assert describe_job(tea, job).business_status == "Cleaning"
    job_service.mark_cleaned(svc, job)
    j = describe_job(tea, job)
    assert j.status == "Finished" and float(j.progress) == 100.0 and j.image_id == "m-image00000000000001"
    runs = j.replication_job_runs.replication_job_run
    assert len(runs) == 2 and runs[-1].image_id == "m-image00000000000001" and runs[-1].end_time
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id=job))
    assert e.code == "ReplicationJob.InvalidStatus"

    body(tea.delete_replication_job(m.DeleteReplicationJobRequest(job_id=job)))
    j = describe_job(tea, job)
    assert j.status == "Deleting"
    job_service.finish_deletion(svc, job)
    assert (
        body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(job_id=[job]))).total_count == 0
    )
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id=job))
    assert (e.code, status_of(e)) == ("InvalidJobId.NotFound", 404)
    # the source is free again
    assert (
        body(tea.describe_source_servers(m.DescribeSourceServersRequest(source_id=[src])))
        .source_servers.source_server[0]
        .state
        == "Available"
    )


def test_incremental_job_cut_over_and_failures(tea: Any, smc_server: SmcServer) -> None:
    svc = smc_server.services
    src = add_source(smc_server, "db-1")
    e = tea_error(
        tea.create_replication_job,
        m.CreateReplicationJobRequest(region_id=REGION, source_id=src, run_once=False, frequency=12),
    )
    assert (e.code, status_of(e)) == ("MissingParameter", 400) and "MaxNumberOfImageToKeep" in e.message
    e = tea_error(
        tea.create_replication_job,
        m.CreateReplicationJobRequest(
            region_id=REGION, source_id=src, run_once=False, frequency=169, max_number_of_image_to_keep=2
        ),
    )
    assert e.code == "InvalidParameter" and "Frequency" in e.message
    job = body(
        tea.create_replication_job(
            m.CreateReplicationJobRequest(
                region_id=REGION,
                source_id=src,
                name="inc-db",
                run_once=False,
                frequency=12,
                max_number_of_image_to_keep=2,
            )
        )
    ).job_id
    j = describe_job(tea, job)
    assert (j.run_once, j.frequency, j.max_number_of_image_to_keep) == (False, 12, 2)
    e = tea_error(tea.cut_over_replication_job, m.CutOverReplicationJobRequest(job_id=job, sync_data=False))
    assert e.code == "ReplicationJob.InvalidStatus"

    body(tea.start_replication_job(m.StartReplicationJobRequest(job_id=job)))
    for step in (job_service.mark_prepared,):
        step(svc, job, "ti-2")
    job_service.mark_synced(svc, job)
    job_service.mark_processed(svc, job, "m-inc00000000000000001")
    job_service.mark_cleaned(svc, job)
    assert describe_job(tea, job).status == "Waiting"
    body(
        tea.modify_replication_job_attribute(m.ModifyReplicationJobAttributeRequest(job_id=job, frequency=24))
    )
    assert describe_job(tea, job).frequency == 24
    body(tea.cut_over_replication_job(m.CutOverReplicationJobRequest(job_id=job, sync_data=False)))
    assert describe_job(tea, job).status == "Finished"

    # a failed run: InError with ErrorCode, Start again, then the source goes away
    src2 = add_source(smc_server, "db-2")
    job2 = body(
        tea.create_replication_job(m.CreateReplicationJobRequest(region_id=REGION, source_id=src2))
    ).job_id
    body(tea.start_replication_job(m.StartReplicationJobRequest(job_id=job2)))
    job_service.mark_failed(svc, job2, "SourceServer.Offline", job_service.status_info("S1", "lost"))
    j = describe_job(tea, job2)
    assert (j.status, j.error_code) == ("InError", "SourceServer.Offline") and j.status_info
    set_source_state(smc_server, src2, "Unavailable")
    e = tea_error(tea.start_replication_job, m.StartReplicationJobRequest(job_id=job2))
    assert (e.code, status_of(e)) == ("SourceServerState.Invalid", 400)
    e = tea_error(tea.create_replication_job, m.CreateReplicationJobRequest(region_id=REGION, source_id=src2))
    assert e.code in ("SourceServerState.Invalid", "SourceServer.WithReplicationJob")

    # ScheduledStartTime: the job waits for its time; ValidTime must be 7-90 days ahead
    src3 = add_source(smc_server, "db-3")
    now = datetime.now(UTC)
    e = tea_error(
        tea.create_replication_job,
        m.CreateReplicationJobRequest(
            region_id=REGION, source_id=src3, valid_time=iso_utc(now + timedelta(days=2))
        ),
    )
    assert e.code == "InvalidParameter" and "ValidTime" in e.message
    e = tea_error(
        tea.create_replication_job,
        m.CreateReplicationJobRequest(
            region_id=REGION, source_id=src3, scheduled_start_time=iso_utc(now + timedelta(days=40))
        ),
    )
    assert e.code == "InvalidParameter" and "ScheduledStartTime" in e.message
    start_at = iso_utc(now + timedelta(hours=2))
    job3 = body(
        tea.create_replication_job(
            m.CreateReplicationJobRequest(region_id=REGION, source_id=src3, scheduled_start_time=start_at)
        )
    ).job_id
    j = describe_job(tea, job3)
    assert (j.status, j.scheduled_start_time) == ("Waiting", start_at)

    # DeleteSourceServer: refuses while a job exists, Force removes both
    set_source_state(smc_server, src2, "Available")
    e = tea_error(tea.delete_source_server, m.DeleteSourceServerRequest(source_id=src2))
    assert (e.code, status_of(e)) == ("ReplicationJob.Related", 400)
    body(tea.delete_source_server(m.DeleteSourceServerRequest(source_id=src2, force=True)))


def test_describe_jobs_filters_and_pagination(tea: Any, smc_server: SmcServer) -> None:
    srcs = [add_source(smc_server, f"node-{i}") for i in range(3)]
    jobs = [
        body(
            tea.create_replication_job(
                m.CreateReplicationJobRequest(
                    region_id=REGION,
                    source_id=s,
                    name=f"job-{i}",
                    tag=[m.CreateReplicationJobRequestTag(key="wave", value=str(i % 2))],
                )
            )
        ).job_id
        for i, s in enumerate(srcs)
    ]
    all_jobs = body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(page_size=2)))
    assert (all_jobs.total_count, all_jobs.page_size, len(all_jobs.replication_jobs.replication_job)) == (
        3,
        2,
        2,
    )
    last = body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(page_size=2, page_number=2)))
    assert len(last.replication_jobs.replication_job) == 1
    beyond = body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(page_size=2, page_number=5)))
    assert beyond.total_count == 3 and (
        beyond.replication_jobs is None or beyond.replication_jobs.replication_job == []
    )

    def ids(req: Any) -> set[str]:
        b = body(tea.describe_replication_jobs(req))
        return {x.job_id for x in (b.replication_jobs.replication_job if b.replication_jobs else [])}

    assert ids(m.DescribeReplicationJobsRequest(job_id=jobs[:2])) == set(jobs[:2])
    assert ids(m.DescribeReplicationJobsRequest(source_id=[srcs[2]])) == {jobs[2]}
    assert ids(m.DescribeReplicationJobsRequest(name="job-1")) == {jobs[1]}
    assert ids(m.DescribeReplicationJobsRequest(status="Ready")) == set(jobs)
    assert ids(m.DescribeReplicationJobsRequest(status="Finished")) == set()
    assert ids(m.DescribeReplicationJobsRequest(region_id=REGION)) == set(jobs)
    assert ids(m.DescribeReplicationJobsRequest(job_type=0)) == set(jobs)
    assert ids(
        m.DescribeReplicationJobsRequest(tag=[m.DescribeReplicationJobsRequestTag(key="wave", value="0")])
    ) == {
        jobs[0],
        jobs[2],
    }
    assert ids(m.DescribeReplicationJobsRequest(name="job-1", status="Ready", source_id=[srcs[0]])) == set()

    # tags on jobs through the Tag API
    body(
        tea.tag_resources(
            m.TagResourcesRequest(
                resource_type="replicationjob",
                resource_id=[jobs[1]],
                tag=[m.TagResourcesRequestTag(key="owner", value="ops")],
            )
        )
    )
    listed = body(
        tea.list_tag_resources(
            m.ListTagResourcesRequest(resource_type="replicationjob", resource_id=[jobs[1]])
        )
    )
    assert {(r.tag_key, r.tag_value, r.resource_type) for r in listed.tag_resources.tag_resource} == {
        ("wave", "1", "ALIYUN::SMC::REPLICATIONJOB"),
        ("owner", "ops", "ALIYUN::SMC::REPLICATIONJOB"),
    }

    # cross-zone jobs are recorded with JobType 2
    xz = body(
        tea.create_cross_zone_migration_job(
            m.CreateCrossZoneMigrationJobRequest(
                region_id=REGION,
                instance_id="i-abc",
                target_zone_id="zone-b",
                client_token="tok-xz",
                disk=[
                    m.CreateCrossZoneMigrationJobRequestDisk(
                        disk_id="d-1", category="cloud_essd", performance_level="PL1"
                    )
                ],
            )
        )
    ).job_id
    same = m.CreateCrossZoneMigrationJobRequest(
        region_id=REGION,
        instance_id="i-abc",
        target_zone_id="zone-b",
        client_token="tok-xz",
        disk=[
            m.CreateCrossZoneMigrationJobRequestDisk(
                disk_id="d-1", category="cloud_essd", performance_level="PL1"
            )
        ],
    )
    assert body(tea.create_cross_zone_migration_job(same)).job_id == xz  # idempotent ClientToken
    assert ids(m.DescribeReplicationJobsRequest(job_type=2)) == {xz}
    assert describe_job(tea, xz).job_type == 2
    e = tea_error(
        tea.create_cross_zone_migration_job,
        m.CreateCrossZoneMigrationJobRequest(
            region_id=REGION,
            instance_id="i-abc",
            disk=[m.CreateCrossZoneMigrationJobRequestDisk(performance_level="PL9")],
        ),
    )
    assert e.code == "InvalidParameter"
    body(tea.delete_replication_job(m.DeleteReplicationJobRequest(job_id=xz)))

    for bad in (
        m.DescribeReplicationJobsRequest(page_size=0),
        m.DescribeReplicationJobsRequest(page_size=51),
        m.DescribeReplicationJobsRequest(page_number=0),
    ):
        e = tea_error(tea.describe_replication_jobs, bad)
        assert (e.code, status_of(e)) == ("InvalidParameter", 400)

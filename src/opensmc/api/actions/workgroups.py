"""Workgroup actions (spec/API.md §3.1, 3.5, 3.10, 3.13, 3.15, 3.20): wire parsing and rendering."""

from __future__ import annotations

from typing import Any

from opensmc.api.registry import Action
from opensmc.params import Params
from opensmc.service import workgroups as svc_wg
from opensmc.service.context import Caller, Services

_TAG_PARAMS = ("Tag.N.Key", "Tag.N.Value")


def create_workgroup(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    return {"WorkgroupId": svc_wg.create(svc, caller, p)}


def describe_workgroups(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    result = svc_wg.describe(svc, caller, p)
    return {
        "TotalCount": result.total,
        "PageNumber": result.number,
        "PageSize": result.size,
        "Workgroups": {
            "Workgroup": [
                {
                    "WorkgroupId": w.workgroup_id,
                    "Name": w.name,
                    "Description": w.description,
                    "Status": w.status,
                    "Tags": {"Tag": [{"Key": k, "Value": v} for k, v in w.tags]},
                    "Warnings": {
                        "Warning": [
                            {"WarningType": kind, "SourceIds": {"SourceId": list(ids)}} for kind, ids in w.warnings
                        ]
                    },
                }
                for w in result.items
            ]
        },
    }


def modify_workgroup_attribute(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_wg.modify(svc, caller, p)
    return {}


def delete_workgroup(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_wg.delete(svc, caller, p)
    return {}


def associate_source_servers(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_wg.associate(svc, caller, p)
    return {}


def disassociate_source_servers(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    svc_wg.disassociate(svc, caller, p)
    return {}


ACTIONS: tuple[Action, ...] = (
    Action(
        "CreateWorkgroup",
        create_workgroup,
        ("Name", "Description", "ClientToken", *_TAG_PARAMS),
        notes="Name is required here (the SDK does not mark it so).",
    ),
    Action(
        "DescribeWorkgroups",
        describe_workgroups,
        ("WorkgroupId.N", "Name", "Status", *_TAG_PARAMS, "PageNumber", "PageSize"),
        notes="Status and Warnings are derived from the member sources' latest jobs; "
        "NotPassed lists the sources whose latest image failed its latest boot test (docs/images.md).",
    ),
    Action("ModifyWorkgroupAttribute", modify_workgroup_attribute, ("WorkgroupId", "Name", "Description")),
    Action("DeleteWorkgroup", delete_workgroup, ("WorkgroupId",)),
    Action("AssociateSourceServers", associate_source_servers, ("WorkgroupId", "SourceId.N")),
    Action(
        "DisassociateSourceServers",
        disassociate_source_servers,
        ("WorkgroupId", "SourceId.N"),
        notes="A source that is not a member of the workgroup is an error (SourceServer.NotInWorkgroup).",
    ),
)

"""Tag actions (spec/API.md §3.17, 3.23, 3.24): wire parsing and rendering."""

from __future__ import annotations

from typing import Any

from opensmc.api.registry import Action
from opensmc.params import Params
from opensmc.service import tagging
from opensmc.service.context import Caller, Services


def tag_resources(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    tagging.tag(svc, caller, p)
    return {}


def untag_resources(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    tagging.untag(svc, caller, p)
    return {}


def list_tag_resources(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    result = tagging.list_tags(svc, caller, p)
    return {
        "NextToken": result.next_token,
        "TagResources": {
            "TagResource": [
                {
                    "ResourceId": t.resource_id,
                    "ResourceType": t.resource_type,
                    "TagKey": t.key,
                    "TagValue": t.value,
                }
                for t in result.items
            ]
        },
    }


ACTIONS: tuple[Action, ...] = (
    Action(
        "TagResources",
        tag_resources,
        ("ResourceType", "ResourceId.N", "Tag.N.Key", "Tag.N.Value"),
        notes="ResourceType is matched without regard to case; tag keys may be up to 128 characters.",
    ),
    Action(
        "UntagResources",
        untag_resources,
        ("ResourceType", "ResourceId.N", "TagKey.N", "All"),
        notes="Either TagKey.N or All=true is required; keys that are not present are ignored.",
    ),
    Action(
        "ListTagResources",
        list_tag_resources,
        ("ResourceType", "ResourceId.N", "Tag.N.Key", "Tag.N.Value", "NextToken"),
        notes=f"Pages hold {tagging.PAGE_SIZE} pairs. With Tag.N filters, every tag of each matching "
        "resource is listed (not only the filter pairs).",
    ),
)

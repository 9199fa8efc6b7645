"""Unit tests for `opensmc.params.Params`: the typed reader of flat wire parameters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from opensmc.domain.errors import InvalidParameter, MissingParameter
from opensmc.params import Params


def _invalid(fn: object, *args: object, **kw: object) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


# strings ------------------------------------------------------------------------------


def test_str_present_absent_and_empty() -> None:
    p = Params({"Name": "web", "Empty": ""})
    assert p.str("Name") == "web"
    assert p.str("Nope") is None
    assert p.str("Empty") == ""


def test_required_str_missing_and_empty_name_the_key() -> None:
    p = Params({"Empty": ""})
    with pytest.raises(MissingParameter) as info:
        p.req_str("JobId")
    assert info.value.code == "MissingParameter"
    assert info.value.http_status == 400
    assert '"JobId"' in info.value.message
    with pytest.raises(MissingParameter):
        p.str("Empty", required=True)


def test_required_str_custom_missing_code() -> None:
    with pytest.raises(MissingParameter) as info:
        Params({}).str("ResourceType", required=True, missing_code="MissingParameter.ResourceType")
    assert info.value.code == "MissingParameter.ResourceType"


def test_str_length_and_choices() -> None:
    p = Params({"Name": "abcdef"})
    assert p.str("Name", max_len=6, min_len=6) == "abcdef"
    err = _invalid(p.str, "Name", max_len=5)
    assert err.code == "InvalidParameter" and '"Name"' in err.message and "5" in err.message
    err = _invalid(p.str, "Name", min_len=7)
    assert "7" in err.message
    assert p.str("Name", choices=("abcdef", "x")) == "abcdef"
    err = _invalid(p.str, "Name", choices=("a", "b"))
    assert "a, b" in err.message


def test_unicode_string_length_counts_characters() -> None:
    p = Params({"Name": "迁移" * 3})
    assert p.str("Name", max_len=6) == "迁移" * 3


# integers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [("0", 0), ("42", 42), ("-7", -7), ("+5", 5), (" 12 ", 12)])
def test_int_parses_decimal(raw: str, value: int) -> None:
    assert Params({"N": raw}).int("N") == value


def test_int_absent_or_empty_is_none_or_missing() -> None:
    assert Params({}).int("N") is None
    assert Params({"N": ""}).int("N") is None
    with pytest.raises(MissingParameter):
        Params({"N": ""}).int("N", required=True)


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "1.5",
        "1e3",
        "0x10",
        "--1",
        "1 2",
        "True",
        "\u0661\u0662",  # Arabic-Indic "12": only ASCII digits are integers on the wire
    ],
)
def test_int_rejects_non_integers(raw: str) -> None:
    err = _invalid(Params({"PageSize": raw}).int, "PageSize")
    assert '"PageSize"' in err.message


def test_int_ranges() -> None:
    p = Params({"PageSize": "51", "PageNumber": "0", "Ok": "50"})
    assert p.int("Ok", lo=1, hi=50) == 50
    err = _invalid(p.int, "PageSize", lo=1, hi=50)
    assert '"PageSize"' in err.message and "1" in err.message and "50" in err.message
    err = _invalid(p.int, "PageNumber", lo=1)
    assert '"PageNumber"' in err.message


def test_int32_and_int64_bounds() -> None:
    assert Params({"N": str(2**31 - 1)}).int("N") == 2**31 - 1
    assert Params({"N": str(-(2**31))}).int("N") == -(2**31)
    _invalid(Params({"N": str(2**31)}).int, "N")
    _invalid(Params({"N": str(-(2**31) - 1)}).int, "N")
    assert Params({"N": str(2**63 - 1)}).int("N", wide=True) == 2**63 - 1
    _invalid(Params({"N": str(2**63)}).int, "N", wide=True)
    # far too many digits: rejected without building a huge int
    _invalid(Params({"N": "9" * 5000}).int, "N", wide=True)


# booleans -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["True", "true", "TRUE", "tRuE", " true "])
def test_bool_true_any_case(raw: str) -> None:
    assert Params({"Force": raw}).bool("Force") is True


@pytest.mark.parametrize("raw", ["False", "false", "FALSE", "fAlSe"])
def test_bool_false_any_case(raw: str) -> None:
    assert Params({"Force": raw}).bool("Force") is False


def test_bool_default_and_invalid() -> None:
    assert Params({}).bool("Force") is None
    assert Params({}).bool("Force", default=True) is True
    assert Params({"Force": ""}).bool("Force", default=False) is False
    for raw in ("1", "yes", "t", "truee", "0"):
        err = _invalid(Params({"Force": raw}).bool, "Force")
        assert '"Force"' in err.message


def test_bool_in_group_names_full_key() -> None:
    p = Params({"DataDisk.1.Part.2.Block": "maybe"})
    ((_, disk),) = p.groups("DataDisk")
    ((_, part),) = disk.groups("Part")
    err = _invalid(part.bool, "Block")
    assert '"DataDisk.1.Part.2.Block"' in err.message


# times --------------------------------------------------------------------------------


def test_time_formats() -> None:
    p = Params({"A": "2026-01-02T03:04:05Z", "B": "2026-01-02T03:04Z", "C": "2026-01-02T03:04:05.123Z"})
    assert p.time("A") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert p.time("B") == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert p.time("C") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert p.time("None") is None


@pytest.mark.parametrize(
    "raw", ["2026-01-02", "2026-01-02 03:04:05", "2026-13-02T03:04:05Z", "2026-02-30T00:00Z", "x"]
)
def test_time_invalid(raw: str) -> None:
    err = _invalid(Params({"ValidTime": raw}).time, "ValidTime")
    assert '"ValidTime"' in err.message


# repeat lists -------------------------------------------------------------------------


def test_list_any_order_with_gaps() -> None:
    p = Params({"SourceId.10": "s-c", "SourceId.2": "s-b", "SourceId.1": "s-a", "Other": "x"})
    assert p.list("SourceId") == ["s-a", "s-b", "s-c"]


def test_list_drops_empty_values_and_absent_is_empty() -> None:
    assert Params({"SourceId.1": "", "SourceId.3": "s-3"}).list("SourceId") == ["s-3"]
    assert Params({}).list("SourceId") == []


def test_list_does_not_match_longer_names() -> None:
    # SourceIds.1 is not SourceId.N
    assert Params({"SourceIds.1": "x"}).list("SourceId") == []


@pytest.mark.parametrize(
    "key",
    [
        "SourceId.0",
        "SourceId.x",
        "SourceId.",
        "SourceId.-1",
        "SourceId.01",
        "SourceId.1.Key",
        "SourceId.1234567",
    ],
)
def test_list_bad_index_names_the_key(key: str) -> None:
    err = _invalid(Params({key: "v"}).list, "SourceId")
    assert err.code == "InvalidParameter"
    assert f'"{key}"' in err.message


def test_list_max_n_and_custom_code() -> None:
    p = Params({f"ResourceId.{i}": f"r{i}" for i in range(1, 52)})
    assert len(p.list("ResourceId", max_n=51)) == 51
    err = _invalid(p.list, "ResourceId", max_n=50, code="NumberExceed.ResourceIds")
    assert err.code == "NumberExceed.ResourceIds"


def test_groups_sorted_with_gaps_and_nested() -> None:
    p = Params(
        {
            "DataDisk.3.Index": "3",
            "DataDisk.1.Index": "1",
            "DataDisk.1.Part.5.Device": "1_1",
            "DataDisk.1.Part.2.Device": "1_0",
            "DataDisk.1.Part.2.Block": "False",
        }
    )
    groups = p.groups("DataDisk")
    assert [n for n, _ in groups] == [1, 3]
    first = groups[0][1]
    assert first.prefix == "DataDisk.1."
    assert first.int("Index") == 1
    parts = first.groups("Part")
    assert [n for n, _ in parts] == [2, 5]
    assert parts[0][1].str("Device") == "1_0"
    assert parts[0][1].bool("Block") is False
    assert parts[0][1].wire("Block") == "DataDisk.1.Part.2.Block"
    assert groups[1][1].groups("Part") == []


@pytest.mark.parametrize("key", ["Tag.0.Key", "Tag.a.Key", "Tag.1", "Tag..Key", "Tag.00.Key"])
def test_groups_bad_forms_name_the_key(key: str) -> None:
    err = _invalid(Params({key: "v"}).groups, "Tag")
    assert f'"{key}"' in err.message


def test_nested_bad_index_names_full_key() -> None:
    p = Params({"DataDisk.1.Part.x": "v"})
    ((_, disk),) = p.groups("DataDisk")
    err = _invalid(disk.groups, "Part")
    assert '"DataDisk.1.Part.x"' in err.message


def test_groups_max_n() -> None:
    p = Params({f"Tag.{i}.Key": f"k{i}" for i in range(1, 22)})
    assert len(p.groups("Tag", max_n=21)) == 21
    err = _invalid(p.groups, "Tag", max_n=20)
    assert '"Tag"' in err.message


def test_sub_struct() -> None:
    p = Params({"Disks.System.Size": "40", "Disks.System.Part.1.Path": "/boot", "Disks.Data.1.Size": "20"})
    disks = p.sub("Disks")
    system = disks.sub("System")
    assert system.int("Size") == 40
    assert system.wire("Size") == "Disks.System.Size"
    ((n, part),) = system.groups("Part")
    assert n == 1 and part.str("Path") == "/boot" and part.wire("Path") == "Disks.System.Part.1.Path"
    assert disks.sub("Nothing").is_empty()
    assert [n for n, _ in disks.groups("Data")] == [1]


def test_has_raw_keys() -> None:
    p = Params({"A": "1", "B": ""})
    assert p.has("B") and not p.has("C")
    assert p.raw("A") == "1" and p.raw("C") is None
    assert sorted(p.keys()) == ["A", "B"]

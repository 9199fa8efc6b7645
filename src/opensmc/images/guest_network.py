"""The first NIC of the new machine does DHCP: rewrites of a guest's ifupdown and netplan configs.

A migrated server's network config names the old machine's NIC (``ens3``,
``eth0``, ``eno1``) and often gives it a static address of the old network.
On the new machine the NIC has another name (virtio-net is ``ens3``,
``enp1s0`` or ``eth0``, depending on the slot and ``net.ifnames``) and the
old address is wrong, so the server comes up without network. OS adaptation
(:mod:`opensmc.images.adaptation`) reads the configs through libguestfs,
rewrites them here (pure functions over file text, tested alone) and writes
them back, after copying each original to :data:`BACKUP_DIR`:

* :func:`ifupdown_first_nic` (``/etc/network/interfaces`` and
  ``interfaces.d``): the stanzas of the source's first NIC (every family) and
  its ``auto``/``allow-`` entries are commented out, and the first Ethernet
  NIC, whatever its name, gets DHCP: ``auto type/1/1=opensmc0`` with ``iface
  opensmc0 inet dhcp`` (ifupdown's pattern matching, 0.8.20 and later: the
  first interface whose sysfs ``type`` is 1, Ethernet). An older ifupdown has
  no patterns: it gets ``allow-hotplug`` stanzas with DHCP for the names a
  KVM NIC usually has (:data:`LIKELY_NAMES`).
* :func:`netplan_first_nic` (``/etc/netplan/*.yaml``): the source's first
  ``ethernets`` entry is removed, and ``zz-opensmc-kvm`` (``match: name:
  "e*"``, ``dhcp4: true``) takes its place. netplan gives each entry its own
  systemd-networkd file named after its id, and networkd uses the first file
  that matches: the id sorts last, so every NIC with an entry of its own
  keeps it and the others do DHCP. The YAML is edited as text (the rest of
  the file, comments included, stays as it was) and the result is parsed
  again and compared with what was meant before it is used.

A NIC that is a bridge port, a bond slave or a VLAN's link, or configured
``manual``, is part of a set-up that cannot be guessed: its config is left
as it is and the log says so (``kept:``). Other NICs' stanzas are left too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

__all__ = [
    "BACKUP_DIR",
    "IFUPDOWN_LOGICAL",
    "LIKELY_NAMES",
    "NETPLAN_ID",
    "backup_path",
    "ifupdown_first_nic",
    "ifupdown_has_patterns",
    "netplan_first_nic",
]

#: where the guest keeps the originals of the files rewritten here (outside every directory a tool reads)
BACKUP_DIR = "/var/backups/opensmc-kvm"
#: ifupdown's logical interface for the new machine's first NIC
IFUPDOWN_LOGICAL = "opensmc0"
#: the netplan id of the catch-all entry (sorts after every usual id: the NICs with an entry keep it)
NETPLAN_ID = "zz-opensmc-kvm"
#: without ifupdown's patterns: names a KVM guest's first NIC usually gets (net.ifnames=0, i440fx slot 3-5, q35)
LIKELY_NAMES = ("eth0", "ens3", "ens4", "ens5", "enp1s0", "enp0s3")
#: the first ifupdown that matches interfaces by pattern (``auto type/1/1=…``)
_PATTERNS_SINCE = (0, 8, 20)

#: names that are not a physical NIC: loopback, bridges, bonds, tunnels, containers' and VMs' devices
_VIRTUAL = re.compile(r"^(lo|br|bond|team|vlan|tun|tap|wg|veth|virbr|vmbr|docker|lxc|ppp|sit|gre|ovs|vxlan|dummy)")
#: options that make a stanza part of a bridge, bond or VLAN set-up
_LINKED = re.compile(r"^(bridge[_-]ports|bond[_-](slaves|master|primary)|slaves|vlan[_-]raw[_-]device|ovs_)")
_STANZA_WORDS = ("iface", "mapping", "auto", "source", "source-directory", "rename", "no-auto-down", "no-scripts")


def backup_path(path: str) -> str:
    return f"{BACKUP_DIR}{path}"


def ifupdown_has_patterns(version: str | None) -> bool:
    """Whether this ifupdown (``dpkg-query``'s version, e.g. ``0.8.41``) matches names by pattern; unknown: yes."""
    found = re.match(r"(?:\d+:)?(\d+)\.(\d+)(?:\.(\d+))?", (version or "").strip())
    if found is None:
        return True  # not a dpkg guest, or ifupdown not installed: the config is written for today's ifupdown
    return tuple(int(g or 0) for g in found.groups()) >= _PATTERNS_SINCE


# ifupdown ----------------------------------------------------------------------------------------------


@dataclass
class _Line:
    """One logical line (a backslash joins physical lines) of an interfaces file."""

    file: int
    first: int  #: index of its first physical line
    last: int  #: index of its last physical line
    words: list[str]


@dataclass
class _Iface:
    name: str
    family: str
    method: str
    head: _Line
    options: list[_Line] = field(default_factory=list)


def _logical_lines(file: int, lines: list[str]) -> list[_Line]:
    out: list[_Line] = []
    i = 0
    while i < len(lines):
        first = i
        text = lines[i].rstrip("\n")
        while text.endswith("\\") and i + 1 < len(lines) and not text.lstrip().startswith("#"):
            i += 1
            text = text[:-1] + " " + lines[i].rstrip("\n")
        out.append(_Line(file, first, i, text.split()))
        i += 1
    return out


def _is_stanza(words: list[str]) -> bool:
    return bool(words) and (words[0] in _STANZA_WORDS or words[0].startswith("allow-"))


def _ifaces(parsed: list[list[_Line]]) -> list[_Iface]:
    out: list[_Iface] = []
    for lines in parsed:
        current: _Iface | None = None
        for line in lines:
            words = line.words
            if not words or words[0].startswith("#"):
                continue
            if _is_stanza(words):
                current = None
                if words[0] == "iface" and len(words) >= 4:
                    current = _Iface(words[1], words[2], words[3], line)
                    out.append(current)
            elif current is not None:
                current.options.append(line)
    return out


def _describe(stanzas: list[_Iface]) -> str:
    parts = []
    for s in stanzas:
        opts = {o.words[0]: " ".join(o.words[1:]) for o in s.options if o.words}
        what = f"{s.family} {s.method}"
        if "address" in opts:
            what += f" {opts['address']}" + (f" netmask {opts['netmask']}" if "netmask" in opts else "")
        if "gateway" in opts:
            what += f", gateway {opts['gateway']}"
        parts.append(what)
    return "; ".join(parts)


def ifupdown_first_nic(
    files: list[tuple[str, str]], *, patterns: bool = True, dhcp_client: bool = True
) -> tuple[dict[str, str], list[str]]:
    """The source's first NIC replaced by DHCP on the new machine's first NIC.

    ``files`` are ``(path, text)`` in the order ifupdown reads them
    (``/etc/network/interfaces``, then ``interfaces.d``). Returns the new text
    of each file that changed and the adaptation log's lines (``changed:``,
    ``kept:``). ``patterns``: the guest's ifupdown matches names by pattern
    (:func:`ifupdown_has_patterns`); ``dhcp_client``: the guest has one
    (dhclient, dhcpcd, udhcpc), else the log says DHCP needs one.
    """
    split = [text.splitlines(keepends=True) for _path, text in files]
    parsed = [_logical_lines(i, lines) for i, lines in enumerate(split)]
    ifaces = _ifaces(parsed)
    if any(s.name == IFUPDOWN_LOGICAL for s in ifaces):
        return {}, [f"kept: {files[0][0]}: the first NIC does DHCP already (iface {IFUPDOWN_LOGICAL})"]
    nics = [s for s in ifaces if s.family in ("inet", "inet6") and not _VIRTUAL.match(s.name) and
            "." not in s.name and ":" not in s.name]  # fmt: skip
    if not nics:
        return {}, []
    name = nics[0].name
    stanzas = [s for s in ifaces if s.name == name]
    where = files[stanzas[0].head.file][0]
    linked = [
        f"{s.name} ({o.words[0]} {' '.join(o.words[1:])})"
        for s in ifaces for o in s.options
        if o.words and _LINKED.match(o.words[0]) and (s.name == name or name in o.words[1:])
    ]  # fmt: skip
    linked += [s.name for s in ifaces if s.name.startswith((f"{name}.", f"{name}:"))]
    if linked or any(s.method == "manual" for s in stanzas):
        why = f"it is part of {', '.join(dict.fromkeys(linked))}" if linked else "it is configured manual"
        return {}, [f"kept: {where} configures the source's NIC {name}, but {why}: not rewritten; check its name "
                    "and addresses on the new machine"]  # fmt: skip
    others = sorted({s.name for s in nics if s.name != name})
    out_lines = [list(lines) for lines in split]
    note = f"# OpenSMC OS adaptation for KVM: the source's NIC {name}, commented out (see {IFUPDOWN_LOGICAL} below)\n"
    commented: set[tuple[int, int]] = set()

    def comment(line: _Line) -> None:
        for k in range(line.first, line.last + 1):
            if (line.file, k) not in commented:
                commented.add((line.file, k))
                out_lines[line.file][k] = "# " + out_lines[line.file][k]

    for k, s in enumerate(stanzas):
        comment(s.head)
        if k == 0:
            out_lines[s.head.file][s.head.first] = note + out_lines[s.head.file][s.head.first]
        for option in s.options:
            comment(option)
    for lines in parsed:
        for line in lines:
            words = line.words
            if words and (words[0] == "auto" or words[0].startswith("allow-")) and name in words[1:]:
                rest = [w for w in words[1:] if w != name]
                comment(line)
                if rest:
                    out_lines[line.file][line.last] += f"{words[0]} {' '.join(rest)}\n"
    if patterns:
        added = f"auto type/1/1={IFUPDOWN_LOGICAL}\niface {IFUPDOWN_LOGICAL} inet dhcp\n"
        how = f"the first Ethernet NIC, whatever its name, does DHCP (auto type/1/1={IFUPDOWN_LOGICAL})"
    else:
        names = [n for n in dict.fromkeys((name, *LIKELY_NAMES)) if n not in others]
        added = f"allow-hotplug {' '.join(names)}\n" + "".join(f"iface {n} inet dhcp\n" for n in names)
        how = f"this ifupdown has no name patterns: DHCP on whichever of {', '.join(names)} the new machine has"
    block = (
        f"\n# OpenSMC OS adaptation for KVM: {how}.\n"
        f"# It replaces the source's {name} ({_describe(stanzas)}); the original is in {backup_path(where)}.\n"
        f"{added}"
    )
    target = stanzas[0].head.file
    if out_lines[target] and not out_lines[target][-1].endswith("\n"):
        out_lines[target][-1] += "\n"
    out_lines[target].append(block)
    changed = {files[i][0]: "".join(lines) for i, lines in enumerate(out_lines) if lines != split[i]}
    log = [
        f"changed: {where}: the source's NIC {name} ({_describe(stanzas)}) commented out; {how} "
        f"(the original is in {backup_path(where)})"
    ]
    log += [f"changed: {path}: {name} removed from its auto/allow- lines" for path in changed if path != where]
    if others:
        log.append(f"kept: {where}: {', '.join(others)} left as configured (check their names on the new machine)")
    if not dhcp_client:
        log.append("kept: the guest has no DHCP client (dhclient, dhcpcd, udhcpc): install one, or the NIC stays down")
    return changed, log


# netplan -----------------------------------------------------------------------------------------------


_KEY = re.compile(r"""^(?P<indent> *)(?P<q>["']?)(?P<key>[^"'#:\s][^"':#]*?)(?P=q)\s*:(?:\s+(?P<rest>.*))?$""")


def _block_of(text: str, name: str) -> tuple[int, int, int, int] | None:
    """(first line, end line, indent, parent indent) of ``network.ethernets.<name>`` as a block mapping."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        found = _KEY.match(line.rstrip())
        indent = len(line) - len(line.lstrip(" "))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if found is None:
            continue
        stack.append((indent, found.group("key").strip()))
        if [k for _i, k in stack] == ["network", "ethernets", name]:
            end = i + 1
            while end < len(lines):
                later = lines[end]
                if (
                    later.strip()
                    and not later.lstrip().startswith("#")
                    and len(later) - len(later.lstrip(" ")) <= indent
                ):
                    break
                end += 1
            while end > i + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                end -= 1  # blank and comment lines before the next entry are not this one's
            return i, end, indent, stack[-2][0]
    return None


def _ethernets(doc: object) -> dict[str, object]:
    network = doc.get("network") if isinstance(doc, dict) else None
    eth = network.get("ethernets") if isinstance(network, dict) else None
    return eth if isinstance(eth, dict) else {}


def _netplan_describe(entry: object) -> str:
    if not isinstance(entry, dict):
        return "?"
    parts = []
    if entry.get("dhcp4") in ("true", "yes", "on"):
        parts.append("DHCP")
    addresses = entry.get("addresses")
    if isinstance(addresses, list) and addresses:
        parts.append(", ".join(str(a) for a in addresses))
    match = entry.get("match")
    if isinstance(match, dict):
        parts += [f"match {k} {v}" for k, v in match.items()]
    if "set-name" in entry:
        parts.append(f"set-name {entry['set-name']}")
    return "; ".join(parts) or "no address"


def netplan_first_nic(files: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The source's first ``ethernets`` entry replaced by DHCP on every NIC without an entry of its own.

    ``files`` are ``(path, text)`` of ``/etc/netplan/*.yaml`` in the order
    netplan reads them (by name). Returns the new text of each file that
    changed and the adaptation log's lines.
    """
    docs: list[object] = []
    for path, text in files:
        try:
            docs.append(yaml.load(text, Loader=yaml.BaseLoader))  # every scalar a string: nothing reinterpreted
        except yaml.YAMLError as exc:
            return {}, [f"kept: {path} is not valid YAML ({str(exc).splitlines()[0]}): netplan not rewritten"]
    found = next(((i, next(iter(_ethernets(d)))) for i, d in enumerate(docs) if _ethernets(d)), None)
    if found is None:
        return {}, []
    first, name = found
    if name == NETPLAN_ID:
        return {}, [f"kept: {files[first][0]}: the first NIC does DHCP already ({NETPLAN_ID})"]
    for (path, _text), doc in zip(files, docs, strict=True):
        network = doc.get("network") if isinstance(doc, dict) else None
        for kind in ("bonds", "bridges", "vlans", "vrfs"):
            devices = network.get(kind) if isinstance(network, dict) else None
            for dev, conf in (devices or {}).items() if isinstance(devices, dict) else ():
                members = conf.get("interfaces", []) if isinstance(conf, dict) else []
                if name in members or (isinstance(conf, dict) and conf.get("link") == name):
                    return {}, [f"kept: {path}: the source's NIC {name} is part of {kind[:-1]} {dev}: netplan not "
                                "rewritten; check its name and addresses on the new machine"]  # fmt: skip
    entry = _ethernets(docs[first])[name]
    changed: dict[str, str] = {}
    for i, (path, text) in enumerate(files):
        if name not in _ethernets(docs[i]):
            continue
        block = _block_of(text, name)
        if block is None:
            return {}, [f"kept: {path}: ethernets.{name} is not written as a YAML block: netplan not rewritten"]
        start, end, indent, parent = block
        lines = text.splitlines(keepends=True)
        new: list[str] = []
        if i == first:
            pad, step = " " * indent, " " * max(2, indent - parent)
            new = [
                f"{pad}# OpenSMC OS adaptation for KVM: replaces the source's {name} ({_netplan_describe(entry)}); "
                f"the original is in {backup_path(path)}\n",
                f"{pad}{NETPLAN_ID}:\n", f"{pad}{step}match:\n", f'{pad}{step}{step}name: "e*"\n',
                f"{pad}{step}dhcp4: true\n",
            ]  # fmt: skip
            if isinstance(entry, dict) and entry.get("dhcp6") in ("true", "yes", "on"):
                new.append(f"{pad}{step}dhcp6: true\n")
        if end == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        changed[path] = "".join(lines[:start] + new + lines[end:])
        if not _meant(docs[i], changed[path], name, with_ours=i == first):
            return {}, [f"kept: {path}: the rewrite of ethernets.{name} did not parse as meant: netplan not rewritten"]
    log = [
        f"changed: {files[first][0]}: the source's NIC {name} ({_netplan_describe(entry)}) replaced by {NETPLAN_ID}: "
        f"every Ethernet NIC without an entry of its own does DHCP (the original is in {backup_path(files[first][0])})"
    ]
    log += [f"changed: {path}: ethernets.{name} removed" for path in changed if path != files[first][0]]
    others = [n for d in docs for n in _ethernets(d) if n != name]
    if others:
        log.append(
            f"kept: ethernets {', '.join(dict.fromkeys(others))} left as configured (check them on the new machine)"
        )
    return changed, log


def _meant(before: object, text: str, name: str, *, with_ours: bool) -> bool:
    """The rewritten file is the old one without ``name``, with only the catch-all entry added."""
    try:
        after = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return False
    eth_after = _ethernets(after)
    ours = eth_after.pop(NETPLAN_ID, None) if with_ours else None
    if with_ours and not (isinstance(ours, dict) and ours.get("dhcp4") == "true"
                          and ours.get("match") == {"name": "e*"}):  # fmt: skip
        return False
    eth_before = {k: v for k, v in _ethernets(before).items() if k != name}
    if eth_after != eth_before:
        return False

    def rest(doc: object) -> object:
        if not isinstance(doc, dict) or not isinstance(doc.get("network"), dict):
            return doc
        return {**doc, "network": {k: v for k, v in doc["network"].items() if k != "ethernets"}}

    return rest(after) == rest(before)

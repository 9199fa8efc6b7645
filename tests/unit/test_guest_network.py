"""The first NIC of the new machine does DHCP: the ifupdown and netplan rewrites, on real-looking configs."""

from __future__ import annotations

import yaml

from opensmc.images.guest_network import (
    IFUPDOWN_LOGICAL,
    NETPLAN_ID,
    ifupdown_first_nic,
    ifupdown_has_patterns,
    netplan_first_nic,
)

# What Debian's installer writes for a static address (bookworm), with the source line at the top.
DEBIAN_STATIC = """\
# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface
allow-hotplug ens3
iface ens3 inet static
\taddress 192.168.122.10/24
\tgateway 192.168.122.1
\t# dns-* options are implemented by the resolvconf package, if installed
\tdns-nameservers 192.168.122.1
\tdns-search example.com
iface ens3 inet6 auto
"""


def _active(text: str) -> list[str]:
    """The lines ifupdown reads (comments and blank lines dropped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_a_static_ens3_becomes_dhcp_on_the_first_ethernet_nic() -> None:
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", DEBIAN_STATIC)])
    text = changed["/etc/network/interfaces"]
    assert _active(text) == [
        "source /etc/network/interfaces.d/*", "auto lo", "iface lo inet loopback",
        f"auto type/1/1={IFUPDOWN_LOGICAL}", f"iface {IFUPDOWN_LOGICAL} inet dhcp",
    ]  # fmt: skip
    # The source's stanza stays readable, commented out, and the backup is named.
    assert "# iface ens3 inet static\n" in text and "# \taddress 192.168.122.10/24\n" in text
    assert "# allow-hotplug ens3\n" in text
    (line,) = log
    assert line.startswith("changed: /etc/network/interfaces: the source's NIC ens3 (inet static 192.168.122.10/24, "
                           "gateway 192.168.122.1; inet6 auto) commented out")  # fmt: skip
    assert "/var/backups/opensmc-kvm/etc/network/interfaces" in line
    # Once rewritten, it is left alone.
    assert ifupdown_first_nic([("/etc/network/interfaces", text)])[0] == {}


def test_an_eth0_with_dhcp_and_a_mac_in_interfaces_d() -> None:
    main = "source-directory /etc/network/interfaces.d\n\nauto lo eth0\niface lo inet loopback\n"
    part = (
        "iface eth0 inet dhcp\n    hwaddress ether 00:0c:29:3a:5b:7c\n"
        "    up /usr/local/bin/route-setup \\\n      eth0\n"
    )
    files = [("/etc/network/interfaces", main), ("/etc/network/interfaces.d/eth0", part)]
    changed, log = ifupdown_first_nic(files)
    assert _active(changed["/etc/network/interfaces"]) == [
        "source-directory /etc/network/interfaces.d",
        "auto lo",
        "iface lo inet loopback",
    ]
    assert "# auto lo eth0\nauto lo\n" in changed["/etc/network/interfaces"]
    new_part = changed["/etc/network/interfaces.d/eth0"]
    assert _active(new_part) == [f"auto type/1/1={IFUPDOWN_LOGICAL}", f"iface {IFUPDOWN_LOGICAL} inet dhcp"]
    assert "#       eth0\n" in new_part  # the continued line is commented out whole
    assert log[0].startswith("changed: /etc/network/interfaces.d/eth0: the source's NIC eth0 (inet dhcp)")
    assert log[1] == "changed: /etc/network/interfaces: eth0 removed from its auto/allow- lines"


def test_a_second_nic_is_left_and_reported() -> None:
    text = DEBIAN_STATIC + "\nauto ens4\niface ens4 inet static\n    address 10.0.0.5/8\n"
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", text)])
    assert "auto ens4" in _active(changed["/etc/network/interfaces"])
    assert "iface ens4 inet static" in _active(changed["/etc/network/interfaces"])
    assert log[-1] == "kept: /etc/network/interfaces: ens4 left as configured (check their names on the new machine)"


def test_an_old_ifupdown_gets_the_likely_names_and_a_missing_dhcp_client_is_said() -> None:
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", DEBIAN_STATIC)], patterns=False, dhcp_client=False)
    active = _active(changed["/etc/network/interfaces"])
    assert "allow-hotplug ens3 eth0 ens4 ens5 enp1s0 enp0s3" in active
    assert "iface enp1s0 inet dhcp" in active and "iface ens3 inet dhcp" in active
    assert not any("type/1/1" in line for line in active)
    assert log[-1].startswith("kept: the guest has no DHCP client")


def test_ifupdown_versions() -> None:
    assert ifupdown_has_patterns("0.8.41")  # bookworm
    assert ifupdown_has_patterns("0.8.35+deb10u1")  # buster
    assert not ifupdown_has_patterns("0.8.19")  # stretch
    assert not ifupdown_has_patterns("0.8.10ubuntu1.4")  # xenial
    assert not ifupdown_has_patterns("0.7.53.1")  # jessie
    assert ifupdown_has_patterns("")  # not installed: written for today's ifupdown


def test_bridges_bonds_vlans_and_manual_nics_are_not_rewritten() -> None:
    bridge = "auto lo\niface lo inet loopback\n\niface eno1 inet manual\n\nauto br0\niface br0 inet static\n" \
             "    address 10.1.1.2/24\n    bridge_ports eno1\n"  # fmt: skip
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", bridge)])
    assert changed == {}
    assert log == ["kept: /etc/network/interfaces configures the source's NIC eno1, but it is part of br0 "
                   "(bridge_ports eno1): not rewritten; check its name and addresses on the new machine"]  # fmt: skip
    vlan = "auto eth0\niface eth0 inet dhcp\nauto eth0.100\niface eth0.100 inet static\n    address 10.2.0.2/16\n"
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", vlan)])
    assert changed == {} and "part of eth0.100" in log[0]
    bond = "auto bond0\niface bond0 inet dhcp\n    bond-slaves eth0 eth1\n"
    assert ifupdown_first_nic([("/etc/network/interfaces", bond)]) == ({}, [])  # no NIC of its own: nothing to do
    manual = "auto eth0\niface eth0 inet manual\n    up ip link set eth0 up\n"
    changed, log = ifupdown_first_nic([("/etc/network/interfaces", manual)])
    assert changed == {} and "it is configured manual" in log[0]


def test_loopback_only_changes_nothing() -> None:
    assert ifupdown_first_nic([("/etc/network/interfaces", "auto lo\niface lo inet loopback\n")]) == ({}, [])


# netplan -----------------------------------------------------------------------------------------------

# What Ubuntu's cloud-init writes (MAC-bound, set-name), and a static server config.
CLOUD_INIT = """\
# This file is generated from information provided by the datasource.  Changes
# to it will not persist across an instance reboot.  To disable cloud-init's
# network configuration capabilities, write a file
# /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg with the following:
# network: {config: disabled}
network:
    ethernets:
        ens5:
            dhcp4: true
            dhcp6: true
            match:
                macaddress: 06:1f:3a:bc:de:01
            set-name: ens5
    version: 2
"""

STATIC = """\
network:
  version: 2
  renderer: networkd
  ethernets:
    eno1:
      addresses:
        - 10.10.10.2/24
      routes:
        - to: default
          via: 10.10.10.1
      nameservers:
        search: [mydomain, otherdomain]
        addresses: [10.10.10.1, 1.1.1.1]
    # the backup link
    eno2:
      dhcp4: no
      addresses: [192.168.0.2/24]
"""


def _load(text: str) -> object:
    return yaml.load(text, Loader=yaml.BaseLoader)


def test_a_mac_bound_cloud_init_nic_becomes_the_catch_all() -> None:
    changed, log = netplan_first_nic([("/etc/netplan/50-cloud-init.yaml", CLOUD_INIT)])
    text = changed["/etc/netplan/50-cloud-init.yaml"]
    assert text.startswith(CLOUD_INIT.split("network:\n")[0])  # the comments above are kept
    assert _load(text) == {
        "network": {"ethernets": {NETPLAN_ID: {"match": {"name": "e*"}, "dhcp4": "true", "dhcp6": "true"}},
                    "version": "2"},
    }  # fmt: skip
    assert "06:1f:3a:bc:de:01" in text  # named in the comment that says what was replaced
    assert log == [
        "changed: /etc/netplan/50-cloud-init.yaml: the source's NIC ens5 (DHCP; match macaddress 06:1f:3a:bc:de:01; "
        f"set-name ens5) replaced by {NETPLAN_ID}: every Ethernet NIC without an entry of its own does DHCP "
        "(the original is in /var/backups/opensmc-kvm/etc/netplan/50-cloud-init.yaml)"
    ]
    assert netplan_first_nic([("/etc/netplan/50-cloud-init.yaml", text)])[0] == {}


def test_a_static_nic_is_replaced_and_the_rest_of_the_file_kept_as_written() -> None:
    changed, log = netplan_first_nic([("/etc/netplan/01-netcfg.yaml", STATIC)])
    text = changed["/etc/netplan/01-netcfg.yaml"]
    before, after = _load(STATIC), _load(text)
    assert after["network"]["ethernets"] == {  # type: ignore[index]
        NETPLAN_ID: {"match": {"name": "e*"}, "dhcp4": "true"},
        "eno2": before["network"]["ethernets"]["eno2"],  # type: ignore[index]
    }
    assert "    # the backup link\n    eno2:\n      dhcp4: no\n" in text  # untouched, as written
    assert "10.10.10.2/24" in log[0] and log[-1].startswith("kept: ethernets eno2 left as configured")


def test_a_nic_in_a_bond_or_bridge_or_in_flow_style_is_not_rewritten() -> None:
    bridged = (
        "network:\n  ethernets:\n    eno1: {}\n  bridges:\n    br0:\n      interfaces: [eno1]\n      dhcp4: true\n"
    )
    changed, log = netplan_first_nic([("/etc/netplan/01.yaml", bridged)])
    assert changed == {} and "part of bridge br0" in log[0]
    flow = "network: {version: 2, ethernets: {eth0: {dhcp4: true}}}\n"
    changed, log = netplan_first_nic([("/etc/netplan/01.yaml", flow)])
    assert changed == {} and "not written as a YAML block" in log[0]
    changed, log = netplan_first_nic([("/etc/netplan/01.yaml", "network:\n  ethernets: [\n")])
    assert changed == {} and "is not valid YAML" in log[0]
    assert netplan_first_nic([("/etc/netplan/01.yaml", "network:\n  version: 2\n")]) == ({}, [])


def test_the_first_file_by_name_holds_the_first_nic_and_a_later_one_loses_its_entry() -> None:
    first = "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n"
    later = "network:\n  ethernets:\n    ens3:\n      mtu: 9000\n    ens4:\n      dhcp4: true\n"
    changed, log = netplan_first_nic([("/etc/netplan/01-a.yaml", first), ("/etc/netplan/02-b.yaml", later)])
    assert _load(changed["/etc/netplan/02-b.yaml"]) == {"network": {"ethernets": {"ens4": {"dhcp4": "true"}}}}
    assert NETPLAN_ID in _load(changed["/etc/netplan/01-a.yaml"])["network"]["ethernets"]  # type: ignore[index]
    assert log[1] == "changed: /etc/netplan/02-b.yaml: ethernets.ens3 removed"

"""Container, unit, proxy and NAT-rule recognition (pure; layouts measured on this machine)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebind.model.containers import (
    ContainerRef,
    Engine,
    NatChain,
    ProxyKind,
    classify_proxy,
    container_from_cgroup,
    nat_captures,
    stop_command,
    unit_from_cgroup,
)

ID = "3f" * 32
ID2 = "ab" * 32
UID = "0f0e1d2c-3b4a-5968-7766-554433221100"

HYBRID_HOST = """12:pids:/process_api/0123456789abcdef0123456789abcdef
4:memory:/process_api/0123456789abcdef0123456789abcdef
1:name=systemd:/
0::/
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"9:name=systemd:/docker/{ID}\n1:cpu:/docker/{ID}\n0::/docker/{ID}\n",
            ContainerRef(Engine.DOCKER, ID),
        ),
        (f"0::/system.slice/docker-{ID}.scope\n", ContainerRef(Engine.DOCKER, ID)),
        (
            f"9:name=systemd:/libpod_parent/libpod-{ID}\n0::/libpod_parent/libpod-{ID}\n",
            ContainerRef(Engine.PODMAN, ID),
        ),
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", ContainerRef(Engine.PODMAN, ID)),
        (
            f"0::/system.slice/containerd.service/x/cri-containerd-{ID}.scope\n",
            ContainerRef(Engine.CONTAINERD, ID),
        ),
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{ID}.scope\n",
            ContainerRef(Engine.KUBERNETES, ID),
        ),
        (f"4:memory:/kubepods/burstable/pod{UID}/{ID}\n", ContainerRef(Engine.KUBERNETES, ID)),
        (f"4:memory:/kubepods/burstable/pod{UID}\n", ContainerRef(Engine.KUBERNETES, f"pod{UID}")),
        (HYBRID_HOST, None),  # the sandbox's /process_api/<32 hex> is not a container
        ("4:memory:/libpod_parent/conmon\n0::/\n", None),  # conmon itself
        (f"0::/user.slice/{ID}\n", None),  # a bare id under an unknown parent
        ("", None),
        ("garbage\n\n::\n", None),
    ],
)
def test_container_from_cgroup(text: str, expected: ContainerRef | None) -> None:
    assert container_from_cgroup(text) == expected


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("1:name=systemd:/system.slice/nginx.service\n0::/\n", "nginx.service"),
        ("0::/system.slice/redis-server.service\n", "redis-server.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n", "app-foo.scope"),
        ("0::/user.slice/user-1000.slice\n", None),
        (HYBRID_HOST, None),
        ("4:memory:/system.slice/x.service\n", None),  # a v1 controller line is not systemd's view
    ],
)
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert unit_from_cgroup(text) == unit


def test_docker_proxy_cmdline() -> None:
    p = classify_proxy(
        "docker-proxy",
        [
            "/usr/sbin/docker-proxy",
            "-proto",
            "tcp",
            "-host-ip",
            "127.0.0.1",
            "-host-port",
            "18081",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "80",
        ],
    )
    assert p is not None and p.kind is ProxyKind.DOCKER_PROXY and p.engine is Engine.DOCKER
    assert p.container_ip == ip_address("172.17.0.2") and p.container_port == 80 and p.host_port == 18081
    assert p.proto == "tcp" and p.forwards


def test_conmon_cmdline() -> None:
    p = classify_proxy(
        "conmon",
        [
            "/usr/bin/conmon",
            "--api-version",
            "1",
            "-c",
            ID,
            "-u",
            ID,
            "-r",
            "/usr/bin/runc",
            "-n",
            "web",
            "--exit-dir",
            "/x",
        ],
    )
    assert p is not None and p.kind is ProxyKind.CONMON and p.container_id == ID and p.container_name == "web"
    assert not p.forwards


def test_hostile_conmon_fields_are_dropped() -> None:
    p = classify_proxy("conmon", ["conmon", "-c", "../../etc", "-n", "\x1b[2Jpwn"])
    assert p is not None and p.container_id is None and p.container_name is None


@pytest.mark.parametrize(
    ("comm", "argv", "kind"),
    [
        ("dockerd", ["/usr/sbin/dockerd", "--userland-proxy=false"], ProxyKind.DOCKERD),
        ("rootlessport", ["rootlessport"], ProxyKind.ROOTLESSPORT),
        ("pasta.avx2", ["/usr/bin/pasta.avx2", "--config-net"], ProxyKind.PASTA),
        ("slirp4netns", ["slirp4netns", "--mtu", "65520"], ProxyKind.SLIRP4NETNS),
    ],
)
def test_other_proxies(comm: str, argv: list[str], kind: ProxyKind) -> None:
    p = classify_proxy(comm, argv)
    assert p is not None and p.kind is kind


@pytest.mark.parametrize(
    ("comm", "argv"), [("python3", ["python3", "-m", "http.server"]), ("nginx", []), ("", [])]
)
def test_not_a_proxy(comm: str, argv: list[str]) -> None:
    assert classify_proxy(comm, argv) is None


@given(st.text(), st.lists(st.text(), max_size=12))
def test_classify_never_raises(comm: str, argv: list[str]) -> None:
    classify_proxy(comm, argv)


def test_stop_command() -> None:
    assert stop_command(ContainerRef(Engine.DOCKER, ID, "web")) == "docker stop web"
    assert stop_command(ContainerRef(Engine.PODMAN, ID)) == f"podman stop {ID[:12]}"


# Measured with podman 4.3.1 (netavark, iptables-nft) and docker 20.10 on this kind of machine.
NETAVARK = f"""*nat
:NETAVARK-HOSTPORT-DNAT - [0:0]
:NETAVARK-DN-1D8721804F16F - [0:0]
-A OUTPUT -m addrtype --dst-type LOCAL -j NETAVARK-HOSTPORT-DNAT
-A NETAVARK-HOSTPORT-DNAT -p tcp -m tcp --dport 18080 -m comment --comment "dnat name: podman id: {ID}" -j NETAVARK-DN-1D8721804F16F
-A NETAVARK-DN-1D8721804F16F -s 10.88.0.0/16 -d 127.0.0.1/32 -p tcp -m tcp --dport 18080 -j NETAVARK-HOSTPORT-SETMARK
-A NETAVARK-DN-1D8721804F16F -d 127.0.0.1/32 -p tcp -m tcp --dport 18080 -j DNAT --to-destination 10.88.0.17:80
COMMIT
"""
DOCKER = """*nat
:DOCKER - [0:0]
-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER -d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 18081 -j DNAT --to-destination 172.17.0.2:80
COMMIT
"""
KUBE = """*nat
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-ABC
-A KUBE-EXT-ABC -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -m comment --comment "default/web:http -> 10.42.0.9:8080" -j KUBE-SEP-XYZ
-A KUBE-SEP-XYZ -p tcp -m tcp -j DNAT --to-destination 10.42.0.9:8080
COMMIT
"""


def test_netavark_capture_follows_per_container_chain() -> None:
    (c,) = nat_captures(NETAVARK, 18080)
    assert c.chain is NatChain.NETAVARK and c.engine is Engine.PODMAN
    assert c.to_addr == ip_address("10.88.0.17") and c.to_port == 80 and c.container_id == ID
    assert c.destination == "10.88.0.17:80"


def test_docker_capture_and_address_match() -> None:
    (c,) = nat_captures(DOCKER, 18081, addr=ip_address("127.0.0.1"))
    assert c.engine is Engine.DOCKER and c.to_addr == ip_address("172.17.0.2")
    assert nat_captures(DOCKER, 18081, addr=ip_address("127.0.0.2")) == ()
    assert nat_captures(DOCKER, 18082) == ()
    assert nat_captures(DOCKER, 18081, proto="udp") == ()


def test_kube_nodeport() -> None:
    (c,) = nat_captures(KUBE, 30080)
    assert c.engine is Engine.KUBERNETES and c.comment == "default/web:http"
    assert c.to_addr == ip_address("10.42.0.9") and c.to_port == 8080


def test_port_ranges_and_loops() -> None:
    text = "-A CNI-HOSTPORT-DNAT -p tcp --dports 8000:8100 -j CNI-DN-1\n-A CNI-DN-1 -j CNI-DN-1\n"
    (c,) = nat_captures(text, 8080)
    assert c.engine is Engine.PODMAN and c.to_addr is None


@given(st.text())
def test_nat_parser_never_raises(text: str) -> None:
    nat_captures(text, 80)

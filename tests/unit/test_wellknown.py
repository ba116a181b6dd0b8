"""The well-known holder catalogue (src/rebind/data/wellknown.toml) and recognition from kernel
facts (model/wellknown.py). Holders that cannot run here (systemd-resolved needs systemd as PID 1;
kube-proxy needs a cluster) are recognised from recorded facts; the others run for real in
tests/kernel/test_wellknown_kernel.py."""

from __future__ import annotations

import shlex
import stat

import pytest

from rebind.kernel.wellknown import catalogue
from rebind.model.records import Proto
from rebind.model.wellknown import (
    CatalogueError,
    Lookalike,
    ProcFacts,
    Recognised,
    parse_catalogue,
    recognise,
    recognise_nat,
    service_of_comment,
)

ROOT_EXE = stat.S_IFREG | 0o755
UIDS = {"systemd-resolve": 991, "avahi": 992, "www-data": 33, "libvirt-dnsmasq": 993, "dnsmasq": 994}
IDS = {
    "systemd-resolved",
    "avahi-daemon",
    "cupsd",
    "libvirt-dnsmasq",
    "dnsmasq",
    "docker-proxy",
    "kube-proxy-nodeport",
    "rpcbind",
    "sshd",
    "nginx-default-site",
    "apache2",
}


def facts(
    exe: str,
    uid: int = 0,
    *,
    exe_uid: int = 0,
    mode: int = ROOT_EXE,
    name: str = "",
    cmd: tuple[str, ...] = (),
) -> ProcFacts:
    return ProcFacts(
        pid=42,
        exe=exe,
        exe_uid=exe_uid,
        exe_mode=mode,
        uid=uid,
        name=name or exe.rsplit("/", 1)[-1],
        cmdline=cmd,
    )


def test_catalogue_loads_and_names_every_holder_of_the_issue() -> None:
    assert {e.id for e in catalogue()} == IDS


@pytest.mark.parametrize("entry", catalogue(), ids=lambda e: e.id)
def test_every_entry_is_complete_and_reversible(entry) -> None:  # type: ignore[no-untyped-def]
    assert entry.name and entry.explain and entry.fix_title and entry.fix
    assert entry.exe or entry.nat_chain
    # Every fix that changes the system says how to undo it (sshd's and docker's fixes change
    # nothing of the owner's configuration: another port, a restart).
    if entry.id not in ("sshd", "docker-proxy"):
        assert entry.revert, entry.id
    for line in (*entry.fix, *entry.revert):
        shlex.split(line.format(port=1, proto="tcp", namespace="ns", service="svc"))  # valid shell words


def test_systemd_resolved_recognised_from_its_packaged_exe_and_account() -> None:
    got = recognise(catalogue(), facts("/usr/lib/systemd/systemd-resolved", 991), 53, Proto.UDP, UIDS)
    assert isinstance(got, Recognised) and got.entry.id == "systemd-resolved"
    assert "DNSStubListener=no" in "\n".join(got.fix)
    assert "/etc/systemd/resolved.conf.d/rebind-nostub.conf" in got.fix[1]
    assert got.fix[-2] == "ln -sf /run/systemd/resolve/resolv.conf /etc/resolv.conf"
    assert any("rebind-nostub.conf" in r and r.startswith("rm ") for r in got.revert)
    # 53 over TCP too; never on a port it does not hold.
    assert isinstance(
        recognise(catalogue(), facts("/lib/systemd/systemd-resolved", 991), 53, Proto.TCP, UIDS), Recognised
    )
    assert recognise(catalogue(), facts("/lib/systemd/systemd-resolved", 991), 5353, Proto.UDP, UIDS) is None


def test_systemd_resolved_fix_runs_in_a_scratch_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The drop-in and resolv.conf steps, with paths moved under a scratch root (systemd is not
    PID 1 here: the restart is left out), and the revert restoring the original symlink."""
    import os
    import subprocess

    root = tmp_path
    (root / "etc").mkdir()
    (root / "run/systemd/resolve").mkdir(parents=True)
    os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")
    entry = next(e for e in catalogue() if e.id == "systemd-resolved")

    def run(lines: tuple[str, ...]) -> None:
        for line in lines:
            if line.startswith("systemctl "):
                continue
            moved = line.replace("/etc/", f"{root}/etc/").replace(" /run/", f" {root}/run/")
            subprocess.run(["sh", "-ec", moved], check=True)

    run(entry.fix)
    assert (
        root / "etc/systemd/resolved.conf.d/rebind-nostub.conf"
    ).read_text() == "[Resolve]\nDNSStubListener=no\n"
    assert os.readlink(root / "etc/resolv.conf") == f"{root}/run/systemd/resolve/resolv.conf"
    run(entry.revert)
    assert not (root / "etc/systemd/resolved.conf.d/rebind-nostub.conf").exists()
    assert os.readlink(root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"


@pytest.mark.parametrize(
    ("why", "f"),
    [
        ("a script named like the daemon", facts("/usr/bin/python3.11", 65534, name="avahi-daemon")),
        (
            "a copy owned by the user",
            facts("/usr/sbin/avahi-daemon", 65534, exe_uid=65534, name="avahi-daemon"),
        ),
        ("a group-writable binary", facts("/usr/sbin/avahi-daemon", 0, mode=stat.S_IFREG | 0o775)),
        ("the real binary run by nobody", facts("/usr/sbin/avahi-daemon", 65534)),
        ("a look-alike path", facts("/tmp/usr/sbin/avahi-daemon", 0, name="avahi-daemon")),
    ],
)
def test_hostile_lookalikes_get_no_advice(why: str, f: ProcFacts) -> None:
    got = recognise(catalogue(), f, 5353, Proto.UDP, UIDS)
    assert not isinstance(got, Recognised), why
    assert isinstance(got, Lookalike) and got.entry.id == "avahi-daemon"
    assert "no advice" in got.line()


def test_name_alone_is_not_even_a_lookalike_when_unrelated() -> None:
    assert (
        recognise(catalogue(), facts("/usr/bin/python3", 1000, name="myserver"), 5353, Proto.UDP, UIDS)
        is None
    )


def test_deleted_binary_after_an_upgrade_still_counts() -> None:
    got = recognise(catalogue(), facts("/usr/sbin/avahi-daemon (deleted)", 992), 5353, Proto.UDP, UIDS)
    assert isinstance(got, Recognised) and got.entry.id == "avahi-daemon"


def test_libvirt_dnsmasq_is_told_apart_by_its_conf_file() -> None:
    virt = facts(
        "/usr/sbin/dnsmasq",
        993,
        cmd=("/usr/sbin/dnsmasq", "--conf-file=/var/lib/libvirt/dnsmasq/default.conf"),
    )
    got = recognise(catalogue(), virt, 53, Proto.UDP, UIDS)
    assert isinstance(got, Recognised) and got.entry.id == "libvirt-dnsmasq"
    assert got.fix == ("virsh net-destroy default",) and got.revert == ("virsh net-start default",)
    plain = recognise(
        catalogue(), facts("/usr/sbin/dnsmasq", 994, cmd=("/usr/sbin/dnsmasq", "-k")), 53, Proto.UDP, UIDS
    )
    assert isinstance(plain, Recognised) and plain.entry.id == "dnsmasq"


def test_docker_proxy_fix_is_withheld_while_its_container_exists() -> None:
    live = ProcFacts(42, "/usr/sbin/docker-proxy", 0, ROOT_EXE, 0, "docker-proxy", (), None, "web")
    got = recognise(catalogue(), live, 8080, Proto.TCP, UIDS)
    assert isinstance(got, Recognised) and got.withheld and "web" in got.withheld
    stale = recognise(catalogue(), facts("/usr/sbin/docker-proxy"), 8080, Proto.TCP, UIDS)
    assert isinstance(stale, Recognised) and stale.withheld is None
    assert stale.fix == ("systemctl restart docker.service",)


@pytest.mark.parametrize(
    ("comment", "want"),
    [
        ("default/web:http", ("default", "web")),
        ("shop/cart", ("shop", "cart")),
        ("kube-system/kube-dns:dns-tcp", ("kube-system", "kube-dns")),
        ("default/web; rm -rf /:x", None),
        ("Default/Web:http", None),
        ("", None),
        (None, None),
        ("noslash", None),
    ],
)
def test_service_from_kube_proxy_rule_comment(comment: str | None, want: tuple[str, str] | None) -> None:
    assert service_of_comment(comment) == want


def test_kube_nodeport_recognised_from_the_nat_rule() -> None:
    """A KUBE-NODEPORTS rule as iptables-save prints it, through the existing NAT parser."""
    from rebind.model.containers import nat_captures

    save = "\n".join(
        [
            "*nat",
            ":KUBE-NODEPORTS - [0:0]",
            '-A KUBE-NODEPORTS -p tcp -m comment --comment "shop/cart:http" -m tcp --dport 30080 -j KUBE-EXT-ABC',
            '-A KUBE-EXT-ABC -m comment --comment "masquerade" -j KUBE-SVC-ABC',
            "-A KUBE-SVC-ABC -j KUBE-SEP-1",
            "-A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination 10.42.0.7:8080",
            "COMMIT",
        ]
    )
    (cap,) = nat_captures(save, 30080, "tcp")
    got = recognise_nat(catalogue(), cap.chain.value, cap.comment, 30080, Proto.TCP)
    assert got is not None and got.entry.id == "kube-proxy-nodeport" and got.via == "KUBE-NODEPORTS"
    assert got.fix == (
        "kubectl -n shop get service cart -o yaml > rebind-service-backup.yaml",
        "kubectl -n shop delete service cart",
    )


def test_placeholders_are_shell_quoted() -> None:
    text = """
[[holder]]
id = "x"
name = "x"
exe = ["/usr/sbin/x"]
ports = ["*/tcp"]
explain = "x"
fix_title = "x"
fix = ["echo {port} {proto}"]
"""
    (e,) = parse_catalogue(text)
    assert e.fix == ("echo {port} {proto}",)


@pytest.mark.parametrize(
    "bad",
    [
        'id = "a"\nname = "a"\nexe = ["rel/x"]\nports = ["1/tcp"]\nexplain = "a"\nfix_title = "a"\nfix = ["a"]',
        'id = "a"\nname = "a"\nexe = ["/x"]\nports = ["1/sctp"]\nexplain = "a"\nfix_title = "a"\nfix = ["a"]',
        'id = "a"\nname = "a"\nexe = ["/x"]\nports = ["1/tcp"]\nexplain = "a"\nfix_title = "a"\nfix = ["{evil}"]',
        'id = "a"\nname = "a"\nexe = []\nports = ["1/tcp"]\nexplain = "a"\nfix_title = "a"\nfix = ["a"]',
    ],
)
def test_malformed_entries_are_refused(bad: str) -> None:
    with pytest.raises(CatalogueError):
        parse_catalogue("[[holder]]\n" + bad)


def test_why_text_prints_each_fix_line_exactly_and_escapes_hostile_text() -> None:
    from rebind.model.wellknown import Findings
    from rebind.render.why import findings_lines

    f = ProcFacts(42, "/usr/sbin/avahi-daemon", 0, ROOT_EXE, 0, "avahi-daemon", (), "evil\x1b[2J.service")
    got = recognise(catalogue(), f, 5353, Proto.UDP, UIDS)
    assert isinstance(got, Recognised)
    fake = recognise(
        catalogue(),
        facts("/usr/bin/python3", 65534, name="av\x1b]0;x\x07", cmd=("avahi-daemon: running",)),
        5353,
        Proto.UDP,
        UIDS,
    )
    assert isinstance(fake, Lookalike)
    text = "\n".join(findings_lines(Findings(holders=(got,), lookalikes=(fake,))))
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text
    assert "    $ systemctl disable --now avahi-daemon.socket avahi-daemon.service" in text.splitlines()
    assert "    $ systemctl enable --now avahi-daemon.socket avahi-daemon.service" in text.splitlines()
    assert "Then verify: $ rebind why 5353 --udp --check-fix" in text


def test_holders_are_recognised_as_from_every_owners_facts(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """recognise_holders reads the stat and status of an owner only where recognise() could say
    something (its image is a catalogue executable, or its name one's): the answer equals
    recognise() over every owner's full facts."""
    from ipaddress import IPv4Address

    from rebind.kernel import wellknown as K
    from rebind.model.records import Endpoint, Family, Owner, SocketEntry, SocketRecord, State

    other = tmp_path / "bin" / "python3"
    other.parent.mkdir()
    other.write_text("")
    links = {
        100: str(other),  # an ordinary server: skipped
        101: str(other),  # named like avahi-daemon: a lookalike
        102: "/usr/sbin/avahi-daemon",  # the catalogue's image, unreadable here: weighed, refused
        103: str(tmp_path / "gone"),  # an image that cannot be read
    }
    for pid, target in links.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "exe").symlink_to(target)
        (tmp_path / str(pid) / "status").write_text("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n")
    (tmp_path / "104").mkdir()  # no exe link at all
    names = {100: "python3", 101: "avahi-daemon", 102: "avahi-daemon", 103: "x", 104: "y"}
    owners = [Owner(pid, 3, name, (f"/x/{name}",), uid=1000) for pid, name in names.items()]
    sock = SocketRecord(
        Proto.UDP, Family.INET, State.CLOSE, Endpoint(IPv4Address("0.0.0.0"), 5353),
        Endpoint(IPv4Address("0.0.0.0"), 0), 1000, 1,
    )  # fmt: skip
    entries = [SocketEntry(sock, tuple(owners))]
    uids = K.system_uids(catalogue())
    full = [recognise(catalogue(), K.exe_facts(o, str(tmp_path)), 5353, Proto.UDP, uids) for o in owners]
    want = (
        tuple(g for g in full if isinstance(g, Recognised)),
        tuple(g for g in full if isinstance(g, Lookalike)),
    )
    read: list[int] = []
    real = K.exe_facts

    def counted(o: Owner, proc: str = "/proc") -> ProcFacts:
        read.append(o.pid)
        return real(o, proc)

    monkeypatch.setattr(K, "exe_facts", counted)
    assert K.recognise_holders(entries, 5353, Proto.UDP, str(tmp_path)) == want
    assert [f.pid for f in want[1]] == [101, 102]
    assert read == [101, 102]  # 100, 103 and 104 can be neither: no stat, no status read


def test_the_catalogue_read_through_the_loader_is_the_package_resource() -> None:
    """catalogue() reads the file through the package's loader (importlib.resources costs ~7 ms
    of imports per run): the same entries as the resource read as text."""
    from importlib import resources

    text = resources.files("rebind").joinpath("data/wellknown.toml").read_text(encoding="utf-8")
    assert catalogue() == parse_catalogue(text)

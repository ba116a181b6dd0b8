"""The well-known holders that run here, each as its package ships it, started the way the
issue says (foreground, in a sandbox, not via systemd). Shared by
tests/kernel/test_wellknown_kernel.py and the corpus (tests/cases/corpus.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Daemon:
    #: The catalogue id `why` must name.
    id: str
    exe: str
    #: The systemd unit its fix names (the stand-in systemctl acts on it).
    unit: str
    port: int
    proto: str
    argv: tuple[str, ...]
    #: Shell lines run in the sandbox before the start (directories the package's unit creates).
    setup: tuple[str, ...] = ()
    #: Lines run in the test's network namespace before the start (a bridge for libvirt).
    net: tuple[str, ...] = ()
    #: After the fix the port is free (sshd's fix is another port for *your* server instead).
    frees_port: bool = True
    #: The revert brings the holder back (docker's restart re-creates only live containers' proxies).
    revert_restores: bool = True
    #: What a restart of the unit runs (docker.service: dockerd, which drops a stale proxy).
    restart_as: tuple[str, ...] | None = None


DAEMONS: dict[str, Daemon] = {
    d.id: d
    for d in (
        Daemon(
            "nginx-default-site",
            "/usr/sbin/nginx",
            "nginx.service",
            80,
            "tcp",
            ("/usr/sbin/nginx", "-g", "daemon off;"),
            setup=("mkdir -p /var/log/nginx /var/lib/nginx",),
        ),
        Daemon(
            "avahi-daemon",
            "/usr/sbin/avahi-daemon",
            "avahi-daemon.service",
            5353,
            "udp",
            (
                "/usr/sbin/avahi-daemon",
                "--no-drop-root",
                "--no-chroot",
                "--no-rlimits",
                "-f",
                "/etc/avahi/avahi-daemon.conf",
            ),
            # No D-Bus system bus in a test: the package's own file with enable-dbus=no.
            setup=(
                "sed -i 's/^#*enable-dbus=.*/enable-dbus=no/' /etc/avahi/avahi-daemon.conf",
                "grep -q '^enable-dbus=no' /etc/avahi/avahi-daemon.conf",
                "mkdir -p /run/avahi-daemon",
            ),
        ),
        Daemon(
            "cupsd",
            "/usr/sbin/cupsd",
            "cups.service",
            631,
            "tcp",
            ("/usr/sbin/cupsd", "-f", "-c", "/etc/cups/cupsd.conf"),
            setup=("mkdir -p /run/cups /var/spool/cups/tmp /var/cache/cups /var/log/cups",),
        ),
        Daemon(
            "dnsmasq",
            "/usr/sbin/dnsmasq",
            "dnsmasq.service",
            53,
            "udp",
            (
                "/usr/sbin/dnsmasq",
                "-k",
                "--conf-file=/dev/null",
                "--conf-dir=/etc/dnsmasq.d,*.conf",
                "--user=root",
                "--group=root",
                "--no-resolv",
                "--pid-file",
            ),
            setup=("mkdir -p /etc/dnsmasq.d",),
        ),
        Daemon(
            "libvirt-dnsmasq",
            "/usr/sbin/dnsmasq",
            "libvirt-network-default",
            53,
            "udp",
            ("/usr/sbin/dnsmasq", "-k", "--conf-file=/var/lib/libvirt/dnsmasq/default.conf", "--pid-file"),
            # libvirt's own shape: bind-dynamic on the bridge's address, DHCP for its guests.
            setup=(
                "mkdir -p /var/lib/libvirt/dnsmasq",
                "printf 'strict-order\\nuser=root\\ngroup=root\\nno-resolv\\nbind-dynamic\\ninterface=virbr0\\n"
                "dhcp-range=192.168.122.2,192.168.122.254,255.255.255.0\\n' > /var/lib/libvirt/dnsmasq/default.conf",
            ),
            net=(
                "ip link add virbr0 type bridge",
                "ip addr add 192.168.122.1/24 dev virbr0",
                "ip link set virbr0 up",
            ),
        ),
        Daemon(
            "rpcbind",
            "/usr/sbin/rpcbind",
            "rpcbind.service",
            111,
            "tcp",
            ("/usr/sbin/rpcbind", "-f", "-w"),
            setup=("mkdir -p /run/rpcbind",),
        ),
        Daemon(
            "sshd",
            "/usr/sbin/sshd",
            "ssh.service",
            22,
            "tcp",
            ("/usr/sbin/sshd", "-D", "-e"),
            setup=("ssh-keygen -A", "mkdir -p /run/sshd"),
            frees_port=False,
        ),
        Daemon(
            "apache2",
            "/usr/sbin/apache2",
            "apache2.service",
            80,
            "tcp",
            ("sh", "-c", ". /etc/apache2/envvars && exec /usr/sbin/apache2 -DFOREGROUND"),
            setup=("mkdir -p /run/apache2 /run/lock/apache2 /var/log/apache2",),
        ),
        Daemon(
            "docker-proxy",
            "/usr/sbin/docker-proxy",
            "docker.service",
            8080,
            "tcp",
            # dockerd hands the proxy a pipe as fd 3 to learn it is ready (docker 20.10's
            # signal-parent); without it the proxy's own listener lands on fd 3 and gets closed.
            (
                "sh",
                "-c",
                "exec /usr/sbin/docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8080 "
                "-container-ip 127.0.0.1 -container-port 18080 3>/dev/null",
            ),
            revert_restores=False,
            restart_as=("sleep", "600"),  # stands for dockerd: it re-creates live containers' proxies only
        ),
    )
}

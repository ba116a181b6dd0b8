"""The kernel's HZ (jiffies per second): what turns a TIME_WAIT's timer, read from the bind hash
in jiffies (kernel/bindhash_table.py), into the milliseconds inet_diag reports.

HZ is a build constant (CONFIG_HZ), so it is taken, cheapest first, from: this process's memory;
the per-boot cache in /run/rebind (written by the one calibration, trusted as the BTF layouts'
are: kernel/bpf/layoutcache.py); the kernel's own build configuration (/proc/config.gz with
CONFIG_IKCONFIG_PROC, else /boot/config-RELEASE); and only then a measurement
(bindhash_table.calibrate_hz: jiffies_64 from two BPF runs ~100 ms apart, what `rebind trace`
does at its start). A one-shot command never waits for the measurement: without HZ it reads no
TIME_WAIT's time from the bind hash.
"""

from __future__ import annotations

import os
import re
import zlib

from rebind.kernel.bpf.layoutcache import cache_key, layout_cache

#: The kernel's possible CONFIG_HZ values (kernel/Kconfig.hz).
STANDARD_HZ = (100, 250, 300, 1000)
_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d+)$", re.MULTILINE)
_MEMO: dict[str, int | None] = {}


def _decode(lines: list[str]) -> int | None:
    try:
        hz = int(lines[0])
    except (IndexError, ValueError):
        return None
    return hz if hz in STANDARD_HZ else None


#: One line, the value; the layouts' per-boot file and trust rules (read and written directly:
#: there is nothing to build from BTF).
_CACHE = layout_cache("hz", 1, "CONFIG_HZ", build=lambda _btf: 0, encode=lambda hz: [str(hz)], decode=_decode)


def known_hz() -> int | None:
    """HZ from any source but a measurement (see the module docstring), or None."""
    if "hz" in _MEMO:
        return _MEMO["hz"]
    key = cache_key()
    hz = _CACHE.read(key) if key is not None else None
    if hz is None:
        hz = config_hz()
    if hz is not None:
        _MEMO["hz"] = hz
    return hz


def remember(hz: int | None) -> None:
    """A calibration's outcome: kept for the process (None too: an ambiguous rate is not
    measured again), and a standard value for the boot."""
    _MEMO["hz"] = hz
    key = cache_key()
    if hz in STANDARD_HZ and key is not None:
        _CACHE.write(key, hz)


def config_hz() -> int | None:
    """CONFIG_HZ from the running kernel's build configuration, where it is readable."""
    try:
        with open("/proc/config.gz", "rb") as f:
            # gzip framing (wbits 16+): the config is ~100 KiB once inflated
            hz = parse_config_hz(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(f.read(1 << 20)))
        if hz is not None:
            return hz
    except (OSError, zlib.error):
        pass
    try:
        with open(f"/boot/config-{os.uname().release}", "rb") as f:
            return parse_config_hz(f.read(1 << 22))
    except OSError:
        return None


def parse_config_hz(text: bytes) -> int | None:
    """The CONFIG_HZ line of a kernel configuration, if it names a standard value."""
    m = _CONFIG_HZ.search(text)
    hz = int(m.group(1)) if m else None
    return hz if hz in STANDARD_HZ else None

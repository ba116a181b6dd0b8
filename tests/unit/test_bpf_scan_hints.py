"""The owner scan's head start (kernel/bpf/scan.py: ``files``): which hints it takes, and the
bitmap the program's pre-filter reads (programs._bit: bit (address >> 6) & 0xffff)."""

from __future__ import annotations

from rebind.kernel.bpf import scan
from rebind.kernel.bpf.programs import BITMAP_BYTES


def test_hints_are_for_wanted_inodes_each_address_once() -> None:
    files = {10: 0xFFFF888000001040, 11: 0xFFFF888000002080, 12: 0, 99: 0xFFFF888000003000}
    # 12 has no address (a socket without a file), 99 is not wanted, 13 shares 10's file (a
    # file is one socket's: the first inode keeps it)
    files[13] = files[10]
    assert scan._hints([10, 11, 12, 13], files) == [(0xFFFF888000001040, 10), (0xFFFF888000002080, 11)]
    assert scan._hints([10], {}) == []


def test_the_bitmap_sets_the_program_s_bit() -> None:
    a = 0xFFFF888000001040  # (a >> 6) & 0xffff = 0x41: byte 8, bit 1
    bits = scan._bitmap([a])
    assert len(bits) == BITMAP_BYTES
    assert bits[8] == 0b10 and sum(bits) == 2
    assert scan._bitmap([a, a + (1 << 22)]) == bits  # the same 16 bits: the same bit

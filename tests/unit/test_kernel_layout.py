"""kernel_layout: member offsets from BTF bytes built here, then from the running kernel's BTF.

The synthetic blobs are laid out by hand after the kernel's Documentation/bpf/btf.rst, so
each expected offset below is the one written into the bytes, not one the reader computed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from exporter.capture.kernel_layout import (
    SOCKET_WALK_MEMBERS,
    VMLINUX_BTF,
    Btf,
    KernelLayoutError,
    socket_walk_offsets,
)

INT, PTR, ARRAY, STRUCT, UNION, ENUM, TYPEDEF, VOLATILE, CONST, FUNC_PROTO, DECL_TAG, ENUM64 = (
    1, 2, 3, 4, 5, 6, 8, 9, 10, 13, 17, 19)


class BtfBuilder:
    """Types in id order (the first is id 1) and their names, as a BTF blob."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, trailing: bytes = b"",
             kind_flag: bool = False) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self._name(name), info, size_or_type) + trailing
        self.count += 1
        return self.count

    def int_(self, name: str, size: int, bits: int | None = None, bit_offset: int = 0) -> int:
        encoding = (bit_offset << 16) | (size * 8 if bits is None else bits)
        return self._add(name, INT, 0, size, struct.pack("<I", encoding))

    def ptr(self, target: int) -> int:
        return self._add("", PTR, 0, target)

    def alias(self, kind: int, name: str, target: int) -> int:
        return self._add(name, kind, 0, target)

    def record(self, name: str, size: int, members: list[tuple[str, int, int]], union: bool = False,
               kind_flag: bool = False) -> int:
        """members: (name, type id, offset word: bits, or bitfield_size << 24 | bits with kind_flag)."""
        trailing = b"".join(struct.pack("<III", self._name(m), t, o) for m, t, o in members)
        return self._add(name, UNION if union else STRUCT, len(members), size, trailing, kind_flag)

    def raw(self, kind: int, vlen: int, trailing: bytes) -> int:
        return self._add("", kind, vlen, 0, trailing)

    def blob(self) -> bytes:
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                             len(self.strings))
        return header + bytes(self.types) + bytes(self.strings)


def sock_like() -> tuple[BtfBuilder, int]:
    """struct sock_common as the kernel writes it (anonymous unions of anonymous structs, a
    bitfield), inside a struct sock that puts it at byte 8 so that its offset must be added."""
    b = BtfBuilder()
    u16, u32, u64 = b.int_("u16", 2), b.int_("u32", 4), b.int_("u64", 8)
    be16 = b.alias(TYPEDEF, "__be16", u16)
    ports = b.record("", 4, [("skc_dport", be16, 0), ("skc_num", b.alias(VOLATILE, "", u16), 16)])
    addrs = b.record("", 8, [("skc_daddr", u32, 0), ("skc_rcv_saddr", b.alias(CONST, "", u32), 32)])
    addr_union = b.record("", 8, [("skc_addrpair", u64, 0), ("", addrs, 0)], union=True)
    port_union = b.record("", 4, [("skc_portpair", u32, 0), ("", b.alias(TYPEDEF, "ports_t", ports), 0)],
                          union=True)
    flags = b.record("", 4, [("skc_reuse", u32, (4 << 24) | 0), ("skc_state", u16, 16)], kind_flag=True)
    common = b.record("sock_common", 24, [("", addr_union, 0), ("skc_hash", u32, 64), ("", port_union, 96),
                                          ("skc_family", u16, 128), ("", flags, 160)])
    sock = b.record("sock", 64, [("sk_refcnt", u64, 0), ("__sk_common", common, 64), ("sk_rcvbuf", u32, 256)])
    return b, sock


def test_anonymous_unions_and_structs_add_their_offsets() -> None:
    b, _sock = sock_like()
    btf = Btf(b.blob(), "test")
    assert {path: btf.offset_of("sock", f"__sk_common.{path}") for path in
            ("skc_daddr", "skc_rcv_saddr", "skc_addrpair", "skc_hash", "skc_portpair", "skc_dport", "skc_num",
             "skc_family", "skc_state")} == {
        "skc_daddr": 8, "skc_rcv_saddr": 12, "skc_addrpair": 8, "skc_hash": 16, "skc_portpair": 20,
        "skc_dport": 20, "skc_num": 22, "skc_family": 24, "skc_state": 30}
    assert btf.offset_of("sock", "sk_rcvbuf") == 32
    assert btf.offset_of("sock_common", "skc_num") == 14


@pytest.mark.parametrize(("bits", "bit_offset", "member_offset"), [
    (4, 0, 0),  # an INT narrower than its size
    (8, 2, 0),  # an INT shifted inside its bytes
    (16, 0, 4),  # a whole INT not on a byte boundary
])
def test_old_style_bitfields_are_refused(bits: int, bit_offset: int, member_offset: int) -> None:
    b = BtfBuilder()
    field = b.int_("u16", 2, bits, bit_offset)
    b.record("file", 8, [("f_mode", b.int_("u32", 4), 0), ("f_flags", field, 32 + member_offset)])
    btf = Btf(b.blob(), "test")
    assert btf.offset_of("file", "f_mode") == 0
    with pytest.raises(KernelLayoutError, match=r"^kernel BTF test: file\.f_flags is a bitfield, which a BPF "
                                                r"program cannot read by offset: run with --no-tls$"):
        btf.offset_of("file", "f_flags")


def test_kind_flag_bitfield_is_refused_inside_an_anonymous_member() -> None:
    b, _sock = sock_like()
    with pytest.raises(KernelLayoutError, match=r"sock\.__sk_common\.skc_reuse is a bitfield"):
        Btf(b.blob(), "test").offset_of("sock", "__sk_common.skc_reuse")


def test_missing_struct_and_member_name_the_fix() -> None:
    b, _sock = sock_like()
    btf = Btf(b.blob(), "/x/vmlinux")
    with pytest.raises(KernelLayoutError) as missing_struct:
        btf.offset_of("task_struct", "files")
    assert str(missing_struct.value) == ("kernel BTF /x/vmlinux has no struct task_struct: TLS capture does not "
                                         "know this kernel; run with --no-tls")
    with pytest.raises(KernelLayoutError) as missing_member:
        btf.offset_of("sock", "__sk_common.skc_v6_daddr")
    assert str(missing_member.value) == ("kernel BTF /x/vmlinux: struct sock has no member __sk_common.skc_v6_daddr: "
                                         "TLS capture does not know this kernel; run with --no-tls")
    with pytest.raises(KernelLayoutError, match=r"has no member sk_refcnt\.skc_num"):
        btf.offset_of("sock", "sk_refcnt.skc_num")  # a path through a member that is no struct
    with pytest.raises(KernelLayoutError, match="has no struct ports_t"):
        btf.offset_of("ports_t", "skc_num")  # a typedef's name is not a struct's


def test_a_union_is_not_a_struct_of_the_same_name() -> None:
    b = BtfBuilder()
    u32 = b.int_("u32", 4)
    b.record("pair", 8, [("a", u32, 0), ("b", u32, 32)], union=True)
    with pytest.raises(KernelLayoutError, match="has no struct pair"):
        Btf(b.blob(), "t").offset_of("pair", "b")


def test_duplicate_struct_names_must_agree() -> None:
    b = BtfBuilder()
    u32 = b.int_("u32", 4)
    b.record("socket", 8, [("state", u32, 0), ("type", u32, 32)])
    b.record("socket", 12, [("flags", u32, 0), ("state", u32, 32), ("type", u32, 64)])
    b.record("socket", 8, [("state", u32, 0), ("sk", u32, 32)])
    btf = Btf(b.blob(), "t")
    assert btf.offset_of("socket", "sk") == 4  # only one definition has it
    with pytest.raises(KernelLayoutError, match=r"struct socket is defined 3 times with type at offsets \[4, 8\]"):
        btf.offset_of("socket", "type")


def test_every_kind_is_stepped_over_by_its_own_trailing_size() -> None:
    """Types whose trailing data differ in size come before the struct: a wrong size for any of
    them would misplace every later type."""
    b = BtfBuilder()
    u32 = b.int_("u32", 4)
    b.raw(ARRAY, 0, struct.pack("<III", u32, u32, 4))
    b.raw(ENUM, 3, b"\0" * 8 * 3)
    b.raw(FUNC_PROTO, 2, b"\0" * 8 * 2)
    b.raw(DECL_TAG, 0, struct.pack("<i", -1))
    b.raw(ENUM64, 2, b"\0" * 12 * 2)
    b.ptr(u32)
    b.record("fdtable", 16, [("max_fds", u32, 0), ("fd", b.ptr(b.ptr(u32)), 64)])
    assert Btf(b.blob(), "t").offset_of("fdtable", "fd") == 8


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda blob: blob[:-5], "its sections run past its"),
    (lambda blob: blob[:10], "10 bytes, shorter than its header"),
    (lambda blob: b"\xeb\x9f" + blob[2:], "magic 0x9feb, not 0xeb9f"),
    (lambda blob: blob[:2] + b"\x02" + blob[3:], "version 2, this reader knows 1"),
    (lambda blob: blob[:12] + struct.pack("<I", struct.unpack_from("<I", blob, 12)[0] - 4) + blob[16:],
     "runs past the type section"),  # a type section that ends inside a record
    (lambda blob: blob[:12] + struct.pack("<I", struct.unpack_from("<I", blob, 12)[0] + 4) + blob[16:],
     "is cut short"),  # one word past the last record: a record of less than 3 words
    (lambda blob: blob[:12] + struct.pack("<I", struct.unpack_from("<I", blob, 12)[0] - 2) + blob[16:],
     "its type section is not made of whole 4-byte words"),
])
def test_broken_blobs_are_one_line(mangle: object, reason: str) -> None:
    b, _sock = sock_like()
    with pytest.raises(KernelLayoutError) as broken:
        Btf(mangle(b.blob()), "/sys/kernel/btf/vmlinux")  # type: ignore[operator]
    message = str(broken.value)
    assert message.startswith("kernel BTF /sys/kernel/btf/vmlinux is not valid BTF (")
    assert reason in message and message.endswith("): run with --no-tls") and "\n" not in message


def test_a_name_without_its_nul_is_refused() -> None:
    b = BtfBuilder()
    b.record("socket", 8, [("sk", b.int_("u64", 8), 0)])
    with pytest.raises(KernelLayoutError, match=r"name offset \d+ is outside the string section"):
        blob = b.blob()
        # The last string, the struct's name, loses its NUL.
        Btf(blob[:20] + struct.pack("<I", struct.unpack_from("<I", blob, 20)[0] - 1) + blob[24:-1],
            "t").offset_of("socket", "sk")


def test_unknown_kind_and_dangling_type_are_refused() -> None:
    b = BtfBuilder()
    b.raw(31, 0, b"")
    with pytest.raises(KernelLayoutError, match=r"type 1 has unknown kind 31\): run with --no-tls$"):
        Btf(b.blob(), "t")
    b = BtfBuilder()
    b.record("inode", 4, [("i_mode", 7, 0)])
    with pytest.raises(KernelLayoutError, match="a member refers to type 7, which does not exist"):
        Btf(b.blob(), "t").offset_of("inode", "i_mode")


def kernel_like(offsets: dict[str, int]) -> bytes:
    """A blob with every SOCKET_WALK_MEMBERS member at the offset given for its key."""
    b = BtfBuilder()
    u64 = b.int_("u64", 8)
    by_struct: dict[str, list[tuple[str, int]]] = {}
    for key, (struct_name, path) in SOCKET_WALK_MEMBERS.items():
        by_struct.setdefault(struct_name, []).append((path.removeprefix("__sk_common."), offsets[key]))
    common = b.record("sock_common", 128, [(name, u64, 8 * at) for name, at in by_struct.pop("sock")])
    b.record("sock", 256, [("__sk_common", common, 0)])
    for struct_name, members in by_struct.items():
        b.record(struct_name, 4096, [(name, u64, 8 * at) for name, at in members])
    return b.blob()


def test_socket_walk_offsets_reads_every_key_and_names_a_missing_file(tmp_path: Path) -> None:
    expected = {key: 8 * index for index, key in enumerate(SOCKET_WALK_MEMBERS)}
    blob = tmp_path / "vmlinux"
    blob.write_bytes(kernel_like(expected))
    assert socket_walk_offsets(blob) == expected
    socket_walk_offsets(blob)["SK_NUM"] = -1  # the caller's copy: the cache is not touched
    assert socket_walk_offsets(blob) == expected
    with pytest.raises(KernelLayoutError) as missing:
        socket_walk_offsets(tmp_path / "none")
    assert str(missing.value) == (f"kernel BTF not found at {tmp_path / 'none'}: the kernel needs "
                                  "CONFIG_DEBUG_INFO_BTF=y; run with --no-tls")


@pytest.mark.skipif(not VMLINUX_BTF.exists(), reason="the running kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
def test_running_kernel_offsets_are_structurally_right() -> None:
    """Facts that hold of every kernel these structs have existed in; the BPF walk of a real
    socket (tests/integration/test_kernel_layout.py) checks the values themselves."""
    found = socket_walk_offsets()
    assert set(found) == set(SOCKET_WALK_MEMBERS)
    btf = Btf(VMLINUX_BTF.read_bytes(), str(VMLINUX_BTF))
    assert btf.offset_of("sock", "__sk_common") == 0
    assert found["SK_NUM"] == found["SK_DPORT"] + 2  # the two halves of skc_portpair
    assert found["SK_RCV_SADDR"] == found["SK_DADDR"] + 4  # the two halves of skc_addrpair
    assert found["SK_DADDR"] == btf.offset_of("sock_common", "skc_addrpair")
    assert found["SK_DPORT"] == btf.offset_of("sock_common", "skc_portpair")
    assert found["SK_V6_RCV_SADDR"] == found["SK_V6_DADDR"] + 16
    pointers = ("TASK_FILES", "FILES_FDT", "FDT_FD", "FILE_INODE", "FILE_PRIVATE_DATA", "SOCKET_SK")
    assert all(found[key] % 8 == 0 for key in pointers)
    assert found["FDT_MAX_FDS"] % 4 == 0 and found["INODE_MODE"] % 2 == 0 and found["SOCKET_TYPE"] % 2 == 0

"""Where the socket behind an fd sits in the RUNNING kernel's structs, read from its BTF.

    socket_walk_offsets  the byte offsets a BPF program needs to walk
                         task_struct -> files -> fdtable -> file -> socket -> sock
    SOCKET_WALK_MEMBERS  which (struct, member path) each of those offsets is
    Btf                  the small BTF reader behind it (also used by the tests on synthetic bytes)
    KernelLayoutError    one line naming the fix (a CaptureError)

Why BTF and not headers: BCC compiles against the kernel headers installed on the
machine, which need not match the running kernel (Debian 6.1 headers under a 6.18
kernel here), so `offsetof` in the C file would be wrong without a word. The kernel
describes its own layout in /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF=y); the
offsets go to the C file as -D defines.

Why a parser of our own: no library on this machine parses BTF in Python, and BCC's
BTF support does not expose member offsets. Only what offsets need is read (format:
the kernel's Documentation/bpf/btf.rst): the header, the string section, and the type
section, walked record by record because a type's id is its position in it. Named
members are found inside anonymous structs and unions too (their offsets add up), as
C sees them. Bitfields are refused: a BPF program reads whole bytes.

Reading and walking the 5.5 MB vmlinux BTF (127k types) takes ~55 ms of CPU and ~12 MB of
transient memory on the 6.18 kernel here; the result, a dict of ints, is cached per
process and per path.
"""

from __future__ import annotations

import array
import functools
import struct
from collections.abc import Iterator
from pathlib import Path

from exporter.errors import CaptureError

__all__ = ["SOCKET_WALK_MEMBERS", "Btf", "KernelLayoutError", "socket_walk_offsets"]

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# Key -> (struct, dotted member path). sock_common sits at the head of struct sock
# (sock.__sk_common, offset 0 today); its offset is added all the same.
SOCKET_WALK_MEMBERS: dict[str, tuple[str, str]] = {
    "TASK_FILES": ("task_struct", "files"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDT_MAX_FDS": ("fdtable", "max_fds"),
    "FDT_FD": ("fdtable", "fd"),
    "FILE_INODE": ("file", "f_inode"),
    "FILE_PRIVATE_DATA": ("file", "private_data"),
    "INODE_MODE": ("inode", "i_mode"),
    "SOCKET_TYPE": ("socket", "type"),
    "SOCKET_SK": ("socket", "sk"),
    "SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "SK_NUM": ("sock", "__sk_common.skc_num"),
    "SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    # The TCP socket's stream positions, which tell whether an SSL call's bytes are the ones the
    # socket filter saw on the wire (tls_probes.c, wire_start and wire_end).
    "TCP_COPIED_SEQ": ("tcp_sock", "copied_seq"),
    "TCP_WRITE_SEQ": ("tcp_sock", "write_seq"),
}

_MAGIC = 0xEB9F
# The kernel writes its BTF in its own byte order, which is this machine's.
_HEADER = struct.Struct("=HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
# A type record is 3 u32 words (name_off, info, size_or_type), then its kind's trailing data,
# all in whole words; a struct or union member is 3 words (name_off, type, offset).
_TYPE_WORDS = 3
_MEMBER_WORDS = 3

_KIND_INT = 1
_KIND_STRUCT = 4
_KIND_UNION = 5
_KIND_TYPEDEF = 8
_KIND_VOLATILE = 9
_KIND_CONST = 10
_KIND_RESTRICT = 11
_KIND_TYPE_TAG = 18
# Kinds that only qualify or rename another type (their third word is that type's id).
_ALIASES = frozenset({_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG})

# Bytes that follow a kind's 12-byte btf_type: (fixed, per vlen entry), kinds 1..19
# (INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC,
# FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64). A kind not listed cannot be
# stepped over, so the walk stops with an error rather than misread the rest.
_TRAILING: dict[int, tuple[int, int]] = {
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
    8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
    15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12),
}
# The same in words, indexed by the 5-bit kind, for the walk's inner loop (-1: unknown kind).
_STEP_FIXED = [_TYPE_WORDS + _TRAILING[kind][0] // 4 if kind in _TRAILING else -1 for kind in range(32)]
_STEP_PER_ENTRY = [_TRAILING[kind][1] // 4 if kind in _TRAILING else 0 for kind in range(32)]


class KernelLayoutError(CaptureError):
    """The running kernel's struct layout could not be read from its BTF."""


class Btf:
    """The struct and union members of one BTF blob (no base BTF: vmlinux's own)."""

    def __init__(self, blob: bytes, source: str) -> None:
        self._source = source
        if len(blob) < _HEADER.size:
            raise self._invalid(f"{len(blob)} bytes, shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(blob)
        if magic != _MAGIC:
            raise self._invalid(f"magic {magic:#06x}, not {_MAGIC:#06x}")
        if version != 1:
            raise self._invalid(f"version {version}, this reader knows 1")
        types_start, strings_start = hdr_len + type_off, hdr_len + str_off
        if hdr_len < _HEADER.size or max(types_start + type_len, strings_start + str_len) > len(blob):
            raise self._invalid(f"its sections run past its {len(blob)} bytes (truncated?)")
        if types_start % 4 or type_len % 4:
            raise self._invalid("its type section is not made of whole 4-byte words")
        self._strings = blob[strings_start:strings_start + str_len]
        self._words = memoryview(blob)[types_start:types_start + type_len].cast("I")
        # _at[id]: the word where type `id`'s record starts; id 0 is void and has none.
        self._at = array.array("q", [-1])
        # Named structs by the offset of their name, then (_structs_named) by their name.
        self._structs: dict[int, list[int]] = {}
        self._struct_names: dict[bytes, list[int]] | None = None
        self._walk()

    def _invalid(self, reason: str) -> KernelLayoutError:
        return KernelLayoutError(f"kernel BTF {self._source} is not valid BTF ({reason}): run with --no-tls")

    def _walk(self) -> None:
        # The hot loop of start-up (~127k types in vmlinux): plain list indexing, no unpacking.
        words, at_list, structs = self._words, self._at, self._structs
        fixed, per_entry, end, at = _STEP_FIXED, _STEP_PER_ENTRY, len(self._words), 0
        while at < end:
            if at + _TYPE_WORDS > end:
                raise self._invalid(f"type {len(at_list)} is cut short")
            info = words[at + 1]
            kind = (info >> 24) & 0x1F
            step = fixed[kind]
            if step < 0:
                raise self._invalid(f"type {len(at_list)} has unknown kind {kind}")
            if kind == _KIND_STRUCT and words[at]:
                structs.setdefault(words[at], []).append(len(at_list))
            at_list.append(at)
            at += step + per_entry[kind] * (info & 0xFFFF)
        if at != end:
            raise self._invalid(f"type {len(at_list) - 1} runs past the type section")

    def _name(self, name_off: int) -> str:
        end = self._strings.find(b"\0", name_off)
        if name_off >= len(self._strings) or end < 0:
            raise self._invalid(f"name offset {name_off} is outside the string section")
        return self._strings[name_off:end].decode("ascii", "replace")

    def _structs_named(self, name: str) -> list[int]:
        """Ids of the structs called `name` (the names of all structs are read at the first call)."""
        if self._struct_names is None:
            strings, by_name = self._strings, dict[bytes, list[int]]()
            for name_off, ids in self._structs.items():
                end = strings.find(b"\0", name_off)
                if end < 0:
                    raise self._invalid(f"name offset {name_off} is outside the string section")
                by_name.setdefault(strings[name_off:end], []).extend(ids)
            self._struct_names = by_name
        return self._struct_names.get(name.encode(), [])

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type) of a type, through no alias."""
        if not 0 < type_id < len(self._at):
            raise self._invalid(f"a member refers to type {type_id}, which does not exist")
        at = self._at[type_id]
        info = self._words[at + 1]
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, self._words[at + 2]

    def _resolve(self, type_id: int) -> int:
        """The id behind typedefs and qualifiers (bounded: a loop is invalid BTF, not a hang)."""
        for _ in range(64):
            kind, _vlen, _kflag, target = self._type(type_id)
            if kind not in _ALIASES:
                return type_id
            type_id = target
        raise self._invalid(f"type {type_id} is a chain of more than 64 typedefs or qualifiers")

    def _members(self, type_id: int) -> Iterator[tuple[str, int, int]]:
        """(name, resolved type id, byte offset) of a struct or union's direct members: name ""
        for an anonymous one; type id -1 and the offset in bits for a bitfield."""
        _kind, vlen, kflag, _size = self._type(type_id)
        at = self._at[type_id] + _TYPE_WORDS
        for _ in range(vlen):
            name_off, member_type, offset = self._words[at:at + _MEMBER_WORDS]
            at += _MEMBER_WORDS
            name = self._name(name_off) if name_off else ""
            bits, bit_offset = (offset >> 24, offset & 0xFFFFFF) if kflag else (0, offset)
            resolved = self._resolve(member_type)
            if not kflag:
                # Without kind_flag a bitfield shows as an INT narrower than its size, or shifted.
                member_kind, _vlen, _kflag, int_size = self._type(resolved)
                if member_kind == _KIND_INT:
                    encoding = self._words[self._at[resolved] + _TYPE_WORDS]
                    if encoding & 0xFF != int_size * 8 or (encoding >> 16) & 0xFF:
                        bits = encoding & 0xFF
            if bits or bit_offset % 8:
                yield name, -1, bit_offset  # a bitfield: no byte offset to give
                continue
            yield name, resolved, bit_offset // 8

    def _find(self, type_id: int, name: str, struct_name: str) -> tuple[int, int] | None:
        """(byte offset, resolved type id) of member `name`, looking inside anonymous members."""
        for member, member_type, offset in self._members(type_id):
            if member == name:
                if member_type < 0:
                    raise KernelLayoutError(
                        f"kernel BTF {self._source}: {struct_name}.{name} is a bitfield, which a BPF "
                        f"program cannot read by offset: run with --no-tls")
                return offset, member_type
            if not member and member_type > 0 and self._type(member_type)[0] in (_KIND_STRUCT, _KIND_UNION):
                inner = self._find(member_type, name, struct_name)
                if inner is not None:
                    return offset + inner[0], inner[1]
        return None

    def offset_of(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a.b.c", members of members) in `struct struct_name`."""
        candidates = self._structs_named(struct_name)
        if not candidates:
            raise KernelLayoutError(
                f"kernel BTF {self._source} has no struct {struct_name}: TLS capture does not know "
                f"this kernel; run with --no-tls")
        found: set[int] = set()
        for type_id in candidates:
            total, current, where = 0, type_id, struct_name
            for name in path.split("."):
                hit = self._find(current, name, where) if current > 0 else None
                if hit is None:
                    break
                total, current, where = total + hit[0], hit[1], f"{where}.{name}"
            else:
                found.add(total)
        if not found:
            raise KernelLayoutError(
                f"kernel BTF {self._source}: struct {struct_name} has no member {path}: TLS capture "
                f"does not know this kernel; run with --no-tls")
        if len(found) > 1:
            raise KernelLayoutError(
                f"kernel BTF {self._source}: struct {struct_name} is defined {len(candidates)} times with "
                f"{path} at offsets {sorted(found)}: TLS capture cannot tell which; run with --no-tls")
        return found.pop()


def socket_walk_offsets(btf_path: Path = VMLINUX_BTF) -> dict[str, int]:
    """The byte offset of every SOCKET_WALK_MEMBERS member in the running kernel.

    Read once per process and path. KernelLayoutError, with the fix, when the BTF is
    missing, unreadable or lacks a member."""
    return dict(_socket_walk_offsets(btf_path))


@functools.cache
def _socket_walk_offsets(btf_path: Path) -> dict[str, int]:
    try:
        blob = btf_path.read_bytes()
    except FileNotFoundError:
        raise KernelLayoutError(
            f"kernel BTF not found at {btf_path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y; "
            f"run with --no-tls") from None
    except OSError as exc:
        raise KernelLayoutError(
            f"cannot read kernel BTF {btf_path}: {exc.strerror}; run as root, or with --no-tls") from None
    btf = Btf(blob, str(btf_path))
    return {key: btf.offset_of(struct_name, path) for key, (struct_name, path) in SOCKET_WALK_MEMBERS.items()}

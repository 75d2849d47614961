"""TEMPORARY stand-in for exporter/capture/openssl_layout.py and kernel_layout.py (branch
tlslayout): the values measured on this machine (OpenSSL 3.0.19; Linux 6.18 BTF read with
bpftool + offsetof). Deleted when tlslayout is merged."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import CaptureError


class SslLayoutError(CaptureError):
    pass


class KernelLayoutError(CaptureError):
    pass


@dataclass(frozen=True, slots=True)
class SslLayout:
    rbio_offset: int
    bio_num_offset: int


def calibrate(path: str) -> SslLayout:
    return SslLayout(16, 56)


def socket_walk_offsets() -> dict[str, int]:
    return {"TASK_FILES": 1824, "FILES_FDT": 32, "FDT_MAX_FDS": 0, "FDT_FD": 8, "FILE_INODE": 32,
            "FILE_PRIVATE_DATA": 24, "INODE_MODE": 0, "SOCKET_TYPE": 4, "SOCKET_SK": 24, "SK_FAMILY": 16,
            "SK_DPORT": 12, "SK_NUM": 14, "SK_DADDR": 0, "SK_RCV_SADDR": 4, "SK_V6_DADDR": 56,
            "SK_V6_RCV_SADDR": 72}

"""The values that cross module boundaries: what capture hands the core, and what the core hands metrics and SLOs.

Everything here is plain data. Capture builds `Segment`s from frames (live or pcap);
the core turns them into `Exchange`s. Neither side knows how the other gets its bytes.

`Segment` and `Exchange` are NamedTuples: as immutable as a frozen dataclass, but built
about four times faster (a frozen dataclass sets each field through object.__setattr__),
and one of each is built per segment and per exchange on the user-space path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# TCP flag bits, as on the wire.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


class Segment(NamedTuple):
    """One TCP segment of a watched port, as seen by the capture edge.

    `payload` may be shorter than `payload_len` when the kernel truncated the frame
    (a body byte that user space does not need). The core treats the missing tail as
    bytes it knows the length of but not the content.
    """

    ts_ns: int  # kernel receive timestamp, CLOCK_REALTIME nanoseconds
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    seq: int
    flags: int
    payload: bytes
    payload_len: int


@dataclass(frozen=True, slots=True)
class RpcCall:
    """What an exchange adds when it is an RPC (gRPC over HTTP/2), in OTel's RPC terms."""

    system: str  # rpc.system: "grpc"
    service: str  # rpc.service, e.g. "helloworld.Greeter"
    method: str  # rpc.method, e.g. "SayHello"
    status_code: str  # rpc.grpc.status_code as text: "0".."16", or a documented non-numeric value


class Exchange(NamedTuple):
    """One HTTP request with its final response.

    Latency is `end_ns - start_ns`: from the first byte of the request to the last
    byte of the response, both kernel timestamps.
    """

    method: str  # the token as sent; metrics map unknown ones to _OTHER
    target: str  # path only: absolute-form reduced to its path, query string removed
    status: int
    start_ns: int
    end_ns: int
    request_body_bytes: int
    response_body_bytes: int
    server_port: int
    # Where the bytes came from, as OTel labels them. Every capture source sets these; the
    # defaults are clear-text HTTP/1.x on the wire.
    scheme: str = "http"  # url.scheme: "https" for plaintext read from the TLS library
    protocol_version: str = "1.1"  # network.protocol.version: "1.0", "1.1" or "2"
    rpc: RpcCall | None = None  # set for gRPC streams; they also feed the RPC histogram
    # The address that answered, as the packets carry it: with the port and the capture's own
    # network namespace, what identity/ resolves to a process, container and pod. "" when unknown.
    server_ip: str = ""

    @property
    def duration_seconds(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

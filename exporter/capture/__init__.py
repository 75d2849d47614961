"""The capture edge: kernel filter, packet socket, frame decoder, capture files.

    live.LiveCapture   AF_PACKET socket + bpf/http_filter.c, TPACKET_V3 ring or recvmsg
    bpf.HttpFilter     the loaded filter and its maps, over bpf(2) (bpfsys)
    bpf_loader         helper process: the only importer of bcc, compiles and hands over fds
    tls.TlsCapture     bpf/tls_probes.c: uprobes on libssl, HTTPS plaintext as Segments
    ringbuf.RingBuffer a BPF ring buffer read by mmap (the TLS events)
    ringbuf.DrainedRing the same, emptied by a thread into a queue bounded in bytes
    frames             pure frame -> Segment decoder, shared by live and replay
    pcap.read_capture  pcap/pcapng replay (imports pypacker, so not re-exported here)

Every failure leaves this package as `exporter.errors.CaptureError`.
"""

from exporter.capture.frames import decode_frame, decode_frame_reason
from exporter.capture.live import LiveCapture

__all__ = ["LiveCapture", "decode_frame", "decode_frame_reason"]

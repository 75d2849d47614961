"""The capture edge: kernel filter, packet socket, frame decoder, capture files.

    live.LiveCapture   AF_PACKET socket + bpf/http_filter.c, TPACKET_V3 ring or recvmsg
    bpf.HttpFilter     the compiled filter and its maps (the only importer of bcc)
    frames             pure frame -> Segment decoder, shared by live and replay
    pcap.read_capture  pcap/pcapng replay (imports pypacker, so not re-exported here)

Every failure leaves this package as `exporter.errors.CaptureError`.
"""

from exporter.capture.frames import decode_frame, decode_frame_reason
from exporter.capture.live import LiveCapture

__all__ = ["LiveCapture", "decode_frame", "decode_frame_reason"]

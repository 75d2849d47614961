/*
 * tls_wire.h  What the socket filter (http_filter.c) and the TLS probes (tls_probes.c) share:
 *             the flow key, and the wire times of a TLS connection's encrypted segments.
 *
 * The two programs are compiled and loaded apart (two BCC objects, in two helper processes).
 * The filter owns the map (`tls_flows`, one entry per direction of a TLS connection); user
 * space puts its fd in the probes' one-slot array of maps (`tls_wire_maps`), so the probes
 * read the filter's entries at an SSL call's return, with no pinned map and no bpffs.
 *
 * Per direction, what the filter saw last on the wire, on bpf_ktime_get_ns (CLOCK_MONOTONIC,
 * the probes' clock too), in a packet's receive path before TCP takes its bytes:
 * - client -> server: the current client "turn", i.e. the first data segment after the
 *   client got more server data (its ACK moved): its time, its sequence number, and the
 *   length of the TLS application-data record it starts with (0 when it starts with none);
 *   `ack` is the ACK of the client's last data segment, which tells the next turn.
 * - server -> client: the last data segment: its time and the sequence number after it.
 * Writers set `ns` to 0 first and to the time last, so a reader that sees the same non-zero
 * `ns` before and after reading the other fields has read one segment's values (x86 keeps
 * stores, and loads, in program order; the accesses are volatile so clang keeps them too).
 */
#ifndef TLS_WIRE_H
#define TLS_WIRE_H

/* One direction of one connection. Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d;
 * ports in host byte order. The fast path keys flows client -> server with it. */
struct flow_key {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
};

struct tls_wire {
    u64 ns;      /* 0 while being written */
    u32 seq;     /* client: the turn's first segment's seq; server: the seq after the last segment */
    u32 record;  /* client: the length of the record the turn starts with (its 5-byte header not included) */
    u32 ack;     /* client: the ACK of its last data segment */
    u32 pad;
};

#define TLS_RECORD_HEADER 5
#define TLS_APPLICATION_DATA 23

#endif

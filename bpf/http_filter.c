/*
 * http_filter.c  Socket filter that hands user space only the TCP segments an
 *                HTTP/1.x exporter needs.
 *
 * Attached to an AF_PACKET socket (SO_ATTACH_BPF) by exporter/capture/live.py,
 * after exporter/capture/bpf.py has compiled it with BCC:
 *
 *     BPF(src_file="bpf/http_filter.c", cflags=["-DCNT_SEEN=0", ...])
 *     fn = b.load_func("http_filter", BPF.SOCKET_FILTER)
 *     setsockopt(SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
 *
 * The counter and config indices come in as -D defines from bpf.py, which is
 * the one place their names live; this file does not build on its own.
 *
 * A packet is kept when it is TCP over IPv4 or IPv6, its source or destination
 * port is in `watched_ports`, and it carries payload or FIN or RST. Everything
 * else (pure ACKs, SYNs, other protocols, other ports) dies here, counted by
 * reason in `filter_counters`. The return value is the number of bytes of the
 * frame to keep: the whole frame up to the snap length, or only the headers
 * when the payload lies entirely before the `body_skip` mark of its direction
 * (user space still learns the payload length from the IP header).
 *
 * Requirements: Linux >= 4.4 (SO_ATTACH_BPF, bpf_skb_load_bytes for socket
 * filters), BCC with kernel headers. No kprobes, no BTF, no tc.
 *
 * Trade-offs, candidly:
 * - On a loopback interface every packet passes the packet taps twice, once
 *   as PACKET_OUTGOING and once as PACKET_HOST. The outgoing copy is dropped,
 *   but only when user space says the interface is loopback (config map): on
 *   a real interface a local server's responses are outgoing and must stay.
 * - Non-first IPv4/IPv6 fragments are dropped: they have no TCP header and
 *   TCP on a sane path does not fragment (PMTU discovery). A first fragment is
 *   kept as it is, with only the payload that fragment holds.
 * - IPv6 extension headers: hop-by-hop, routing, destination options,
 *   fragment and AH are walked, at most MAX_V6_EXT of them; a longer chain is
 *   counted as malformed rather than followed.
 * - The snap length clips the frame, so a GSO super-packet (up to 64 KiB on
 *   lo) larger than the snap length loses its tail; payload_len still tells.
 * - Each header byte is fetched with bpf_skb_load_bytes, which checks bounds
 *   against the (possibly non-linear) skb; a short packet is counted, never
 *   silently dropped as LD_ABS would do.
 * - Counters are per-CPU and lock free; bpf.py sums them at scrape time.
 */

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#ifndef CNT_SEEN
#error "load through exporter/capture/bpf.py: it defines the counter and config indices"
#endif

#define MAX_V6_EXT 6
#define MAX_VLAN_TAGS 2

/* Ports to watch, host byte order. Filled and changed from Python at run time. */
BPF_HASH(watched_ports, u16, u8, 1024);

/* CFG_* indices: loopback flag, snap length, link-layer header length (14 or 0). */
BPF_ARRAY(config, u32, CFG_COUNT);

/* CNT_* indices: seen, kept, one slot per drop reason. */
BPF_PERCPU_ARRAY(filter_counters, u64, CNT_COUNT);

/* One direction of one connection. Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d;
 * ports in host byte order. */
struct flow_key {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
};

/* Sequence number (exclusive) up to which payload is not needed. LRU so that
 * entries user space forgot to remove cannot fill the map. */
BPF_TABLE("lru_hash", struct flow_key, u32, body_skip, 16384);

static __always_inline void count(u32 idx)
{
    u64 *val = filter_counters.lookup(&idx);
    if (val)
        (*val)++;
}

static __always_inline u32 cfg(u32 idx, u32 fallback)
{
    u32 *val = config.lookup(&idx);
    return val ? *val : fallback;
}

static __always_inline int is_v6_ext(u8 nexthdr)
{
    return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
           nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT ||
           nexthdr == IPPROTO_AH;
}

/* Returns 0 to drop, else the number of bytes to keep. Every path counts once. */
int http_filter(struct __sk_buff *skb)
{
    count(CNT_SEEN);

    if (skb->pkt_type == PACKET_OUTGOING && cfg(CFG_LOOPBACK, 0)) {
        count(CNT_DROPPED_LOOPBACK_DUP);
        return 0;
    }

    u32 len = skb->len;
    u32 off = cfg(CFG_LINK_HEADER_LEN, ETH_HLEN);
    u16 proto = 0;
    u8 b[2];

    if (off == ETH_HLEN) {
        if (bpf_skb_load_bytes(skb, 12, b, 2) < 0)
            goto malformed;
        proto = ((u16)b[0] << 8) | b[1];
#pragma unroll
        for (int i = 0; i < MAX_VLAN_TAGS; i++) {
            if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
                break;
            if (bpf_skb_load_bytes(skb, off + 2, b, 2) < 0)
                goto malformed;
            proto = ((u16)b[0] << 8) | b[1];
            off += 4;
        }
    } else {
        /* No link header (tun, wireguard): the IP version nibble decides. */
        if (bpf_skb_load_bytes(skb, off, b, 1) < 0)
            goto malformed;
        proto = (b[0] >> 4) == 4 ? ETH_P_IP : (b[0] >> 4) == 6 ? ETH_P_IPV6 : 0;
    }

    struct flow_key key = {};
    u32 l3_end;     /* end of the IP packet in the frame */
    u32 l4;         /* offset of the TCP header */

    if (proto == ETH_P_IP) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
            goto malformed;
        if (ip.protocol != IPPROTO_TCP) {
            count(CNT_DROPPED_NOT_TCP);
            return 0;
        }
        if (ntohs(ip.frag_off) & 0x1fff) {
            count(CNT_DROPPED_FRAGMENT);
            return 0;
        }
        u32 ihl = ip.ihl * 4;
        if (ihl < sizeof(ip))
            goto malformed;
        u32 tot = ntohs(ip.tot_len);
        /* tot_len 0 means a GSO packet too big for the field (BIG TCP). */
        l3_end = tot ? off + tot : len;
        l4 = off + ihl;
        key.saddr[10] = 0xff;
        key.saddr[11] = 0xff;
        key.daddr[10] = 0xff;
        key.daddr[11] = 0xff;
        __builtin_memcpy(&key.saddr[12], &ip.saddr, 4);
        __builtin_memcpy(&key.daddr[12], &ip.daddr, 4);
    } else if (proto == ETH_P_IPV6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            goto malformed;
        u32 plen = ntohs(ip6.payload_len);
        l3_end = plen ? off + sizeof(ip6) + plen : len;
        l4 = off + sizeof(ip6);
        u8 nexthdr = ip6.nexthdr;
#pragma unroll
        for (int i = 0; i < MAX_V6_EXT; i++) {
            if (!is_v6_ext(nexthdr))
                break;
            u8 ext[4];
            if (bpf_skb_load_bytes(skb, l4, ext, 4) < 0)
                goto malformed;
            if (nexthdr == IPPROTO_FRAGMENT) {
                /* Fragment header: 8 bytes; offset in the top 13 bits of ext[2..3]. */
                if ((((u16)ext[2] << 8) | ext[3]) & 0xfff8) {
                    count(CNT_DROPPED_FRAGMENT);
                    return 0;
                }
                l4 += 8;
            } else if (nexthdr == IPPROTO_AH) {
                l4 += ((u32)ext[1] + 2) * 4;
            } else {
                l4 += ((u32)ext[1] + 1) * 8;
            }
            nexthdr = ext[0];
        }
        if (is_v6_ext(nexthdr))
            goto malformed;
        if (nexthdr != IPPROTO_TCP) {
            count(CNT_DROPPED_NOT_TCP);
            return 0;
        }
        __builtin_memcpy(key.saddr, &ip6.saddr, 16);
        __builtin_memcpy(key.daddr, &ip6.daddr, 16);
    } else {
        count(CNT_DROPPED_NOT_TCP);
        return 0;
    }

    struct tcphdr tcp;
    if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
        goto malformed;

    u16 sport = ntohs(tcp.source);
    u16 dport = ntohs(tcp.dest);
    if (!watched_ports.lookup(&sport) && !watched_ports.lookup(&dport)) {
        count(CNT_DROPPED_PORT);
        return 0;
    }

    u32 headers_end = l4 + tcp.doff * 4;
    if (tcp.doff < 5 || headers_end > l3_end)
        goto malformed;
    u32 payload_len = l3_end - headers_end;

    if (payload_len == 0) {
        if (tcp.fin || tcp.rst) {
            count(CNT_KEPT);
            return headers_end;
        }
        count(CNT_DROPPED_NO_PAYLOAD);
        return 0;
    }

    key.sport = sport;
    key.dport = dport;
    u32 *seq_end = body_skip.lookup(&key);
    if (seq_end) {
        u32 last = ntohl(tcp.seq) + payload_len; /* exclusive end, mod 2^32 */
        if ((s32)(last - *seq_end) <= 0) {
            count(CNT_KEPT);
            count(CNT_TRUNCATED_BODY_SKIP);
            return headers_end;
        }
    }

    count(CNT_KEPT);
    u32 snaplen = cfg(CFG_SNAPLEN, 65535);
    return l3_end < snaplen ? l3_end : snaplen;

malformed:
    count(CNT_DROPPED_MALFORMED);
    return 0;
}

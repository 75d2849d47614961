/*
 * http_filter.c  Socket filter that hands user space only the TCP segments an
 *                HTTP/1.x exporter needs.
 *
 * Attached to an AF_PACKET socket (SO_ATTACH_BPF) by exporter/capture/live.py,
 * after exporter/capture/bpf.py has compiled it with BCC:
 *
 *     BPF(src_file="bpf/http_filter.c", cflags=["-DCNT_SEEN=0", ...])
 *     fn = b.load_func("http_filter", BPF.SOCKET_FILTER)
 *     scan_progs[0], scan_progs[1] = load_func("http_scan"), load_func("http_finish")
 *     setsockopt(SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
 *
 * Three programs, one packet: http_filter (attached) parses the link, IP and
 * TCP headers into the per-CPU scratch; with the fast path on, it tail-calls
 * http_scan when the payload may start a head, which scans SCAN_CHUNK bytes a
 * run and tail-calls itself until the head ends (at most HEAD_MAX / SCAN_CHUNK
 * runs), then http_finish, which runs the per-flow state machine and returns
 * the verdict. Each program has the verifier's whole budget (verified_insns on
 * 6.18: http_filter 2.6k, http_scan 490k, http_finish 680k of 1M), which is
 * what lets a head be 4 KB. bpf_loop would do it in one program, but BCC 0.26
 * cannot load its callback (no BPF_PSEUDO_FUNC relocation), hence tail calls.
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
 * FAST PATH (config slot CFG_FAST_PATH = 1; off by default, `run --fast-path`):
 * simple HTTP/1.x exchanges are recognised and aggregated right here, so the
 * common case never reaches user space. Per connection (LRU `flow_state`,
 * keyed client -> server) a flow is FAST or SLOW:
 *
 * - A client segment on a flow with no state, or on an idle FAST flow at the
 *   expected seq, is taken when it is one whole request head (or the start of
 *   one: SPLIT HEADS below), with any number of header lines, and at most its
 *   body: GET/HEAD/POST/PUT/DELETE/OPTIONS/
 *   TRACE/PATCH, SP, origin-form target of printable ASCII, " HTTP/1.d" CRLF
 *   (1.0 and 1.1), header lines `token ":" value CRLF` (names matched in any
 *   case), no Transfer-Encoding, at most one Content-Length, head <= HEAD_MAX
 *   bytes, path (cut at '?' or '#': the query is scanned, never stored) <=
 *   RAW_PATH_LEN bytes as sent and <= PATH_LEN as keyed (ids as "{id}", below;
 *   a head split before its path ends keeps PATH_LEN bytes of it). The body
 *   Content-Length announces may be in the segment,
 *   after it, or both; its bytes are counted by sequence number, never read.
 *   Anything else makes the flow SLOW and the segment goes up.
 * - SPLIT HEADS. A head that goes on past its segment (a 2 KB head behind a
 *   1500-byte MTU) is followed over in-order segments, the head as a whole
 *   still <= HEAD_MAX: the scan's state where it stopped (parser state,
 *   Content-Length so far, method, path bytes so far) goes into the flow's
 *   state (PHASE_HEAD, struct head_scan), the segment's bytes into head_parts,
 *   and the next client segment at cseq resumes the scan from its first byte
 *   (resume_head, in http_filter, reading the state unclaimed; fast_step,
 *   claimed, takes the result only at that seq). The request is timed from
 *   the head's first segment. Out of order, partly retransmitted, answered or
 *   closed mid-head: handed over like any other segment, and the record says
 *   how many head bytes the kernel consumed (head_len), which user space reads
 *   from head_parts and parses first. The bytes are kept only for that case.
 * - A server segment answering it is taken when its head lies in the segment:
 *   "HTTP/1.d NNN" with NNN >= 200 and not 101, strict header lines, at most one
 *   Content-Length of <= 9 digits, no Transfer-Encoding, and framing known
 *   without the connection's end (Content-Length, or none for HEAD/204/304).
 *   Body segments are then counted by sequence number, never read, up to the
 *   last byte, where the exchange is added to `http_agg` (per-CPU hash keyed by
 *   server address and port, method, status and the path's hash, the value
 *   holding the path: duration, response-size and request-size bucket counts
 *   and sums).
 * - With CFG_ROUTE_IDS (set by user space when RouteMapper allows it), each
 *   path segment routes.py's heuristic takes for an id (digits; 16+ bytes of
 *   hex, a UUID, or letters and digits; over 64 bytes) is keyed as "{id}":
 *   random ids, UUIDs and hashes do not fill http_agg.
 * - FIN/RST on an idle FAST flow die here with its state. Everything else hands
 *   the flow over to user space, counted by reason (HO_*, bpf.py's
 *   HANDOVER_REASONS): new_flow (its first request is not one we take, for no
 *   more specific reason below), request (likewise, later on the connection:
 *   unknown method, absolute form, Transfer-Encoding, a syntax error, bytes
 *   after the head and body), head_too_long (over HEAD_MAX bytes), head_split
 *   (a head over segments not followed to its end: its part not kept, a next
 *   segment scanned as a head of its own, an answer mid-head), path_too_long (over
 *   RAW_PATH_LEN, or over PATH_LEN as keyed), request_body (the server answered before the request body ended:
 *   100 Continue, 413), pipelined (a request while one is open), response
 *   (interim, 101, or unframed: chunked, close-delimited), extra (bytes past
 *   the response's end), seq (out-of-order data), unsolicited (server data
 *   with no request), close (FIN/RST or FIN with data while an exchange is
 *   open), agg_full (http_agg full; or its path shares a hash with the path
 *   this CPU's copy of the key counts, see aggregate).
 *
 * HANDOVER, and why counts stay exact: the switch to SLOW happens before any
 * state change for the segment that causes it, and the kernel writes, keyed
 * by the flow, what user space needs to continue the byte streams as if it had
 * parsed them itself (`struct fp_handover`): the next client seq, the next
 * server seq when known, and the open exchange if there is one (method, path,
 * start time from bpf_ktime_get_ns, i.e. CLOCK_MONOTONIC; and, once the
 * response head was consumed here, its status, Content-Length and body bytes
 * already seen). The record is written before the mode changes and the
 * segment is queued after both, so user space, which drains `handover` after
 * every ring read and before parsing, always has the record before the first
 * segment of that flow (Tracker.seed). From then on every segment of the flow
 * goes up until it closes. An exchange is therefore counted exactly once: in
 * `http_agg` if it completed here, else by user space from the record.
 *
 * Concurrency: two CPUs may see segments of one flow at once (a client
 * pipelining while the response streams). A FAST flow's state is changed
 * only under a cmpxchg claim on `lock`; a CPU that finds it held waits a
 * bounded time (CLAIM_TRIES reads), then passes the segment up and counts
 * `busy`: inexact for that flow, and expected to stay 0, since a claim is held
 * for about a microsecond (only a holder's vCPU losing its physical CPU for
 * longer than the wait could cause it).
 *
 * Trade-offs of the fast path, candidly:
 * - The latency clock is bpf_ktime_get_ns() when the filter runs, not the skb
 *   timestamp (not readable from socket filters). On lo the skb's is taken as
 *   the sender queues the packet and the filter's in the NET_RX softirq that
 *   follows, microseconds apart; when a busy machine leaves that softirq to
 *   ksoftirqd, the filter's trails by the wait (milliseconds, seen once in ~12
 *   runs of test_tls_wire_timing under load). Durations are differences.
 * - LRU evictions are invisible: `fast_counters` counts state creations and
 *   deletions, and FLOW_STATES is sized for far more connections than the
 *   exporter tracks. A SLOW flow whose state is evicted would have its next
 *   simple request taken here while user space holds the stream's earlier
 *   part; that is the one inexact case, and it needs > FLOW_STATES live flows.
 * - `http_agg` is cleared only a generation at a time (reading and deleting
 *   live keys would race the increments; see agg_fence): distinct (server,
 *   port, method, status, path) keys are bounded by AGG_ENTRIES; past it,
 *   exchanges go to user space (handover reason agg_full), exactly, until
 *   user space drains the map, which KernelFastPath does at a read that finds
 *   it half full. Ids in paths: with route_ids on, id-shaped
 *   segments share a key ("{id}"), which is exact because RouteMapper names
 *   such a path as it names the path sent (routes.py), so only distinct route
 *   shapes take keys.
 * - The head scan is a state machine over at most HEAD_MAX bytes, a byte at a
 *   time where the stages below take no word, with its state (position
 *   included) in the per-CPU scratch map value, so that http_scan can stop
 *   after SCAN_CHUNK steps and go on in its next run; the verifier walks the
 *   SCAN_CHUNK steps once (490k instructions), whatever HEAD_MAX is.
 * - Its cost is the instructions it runs (BPF_PROG_TEST_RUN here: ~30 ns a header
 *   line, ~0.3 ns a byte of a long value), so a step goes through stages that
 *   take the common case a word or more at a time, and the byte-at-a-time
 *   machine takes only the byte where they stop:
 *   - a name beginning with 'c' or 't' is told apart from Content-Length and
 *     Transfer-Encoding by one comparison of its first 8 bytes when they are
 *     letters, digits or '-' (a name ending in them is neither), "length:"
 *     after "content-" is one more, and the common value, " " then 1 to 6
 *     digits then CR, one more;
 *   - other names pass NAME_WORDS words a step while their bytes are letters,
 *     digits or '-', and the word holding the ':' goes on into the value;
 *   - values, most of a head's bytes, and a status line's reason phrase pass
 *     up to VALUE_WORDS words a step: a borrow test a word (exact as a yes/no)
 *     finds the first holding a byte under 0x20, exact zero-byte tests on
 *     word ^ 0x0d.., 0x0a.. its CR or LF; the value's CR jumps straight past
 *     it, its LF and the next line's first byte, or the empty line ending the
 *     head;
 *   - the target a word at a time while its bytes are printable and none is
 *     ' ', '?' or '#' (in the query: ' '), up to the first other byte, and
 *     " HTTP/1.d" CRLF with the next line's first byte in one step.
 *   A ~1.3 KB browser head takes ~23 steps (47 before, 110 before that) and
 *   the bench's nginx response head 6 (17, 45); the filter and scan of a
 *   recorded realistic load's request segments ~1.09 -> ~1.00 us, of its
 *   response segments ~0.70 -> ~0.59 us (BPF_PROG_TEST_RUN, side by side).
 * - The scan costs the sender's softirq about a byte-time per head byte; with
 *   the packet-tap cost every frame pays anyway, that is what separates the
 *   fast path's throughput from the no-capture run in `make bench`.
 * - A split head's bytes are kept in head_parts (LRU, HEAD_PARTS = 1,024, 8 KB
 *   each) until the head ends: a connection given up mid-head after its entry
 *   was evicted (more than 1,024 heads in flight at once) is lost, counted
 *   (head_lost), rather than handed over without the head's start.
 * - Kernel memory (not RSS): flow_state ~16 MB, http_agg ~10 MB on 2 CPUs
 *   (each CPU's copy of a value holds the path), head_parts ~8.5 MB, handover
 *   ~3.5 MB, scratch 2 x 5 KB, all preallocated.
 *
 * Requirements: Linux >= 4.4 (SO_ATTACH_BPF, bpf_skb_load_bytes for socket
 * filters), BCC with kernel headers. No kprobes, no BTF, no tc.
 *
 * Trade-offs, candidly:
 * - On a loopback interface every packet passes the packet taps twice, once
 *   as PACKET_OUTGOING and once as PACKET_HOST. live.py sets
 *   PACKET_IGNORE_OUTGOING on lo, so the kernel skips the outgoing pass before
 *   cloning the skb or running this filter; the check below stays for kernels
 *   before 4.20. Either way only when user space says the interface is
 *   loopback (config map): on a real interface a local server's responses are
 *   outgoing and must stay.
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

#if !defined(CNT_SEEN) || !defined(FC_COUNT) || !defined(HO_COUNT)
#error "load through exporter/capture/bpf.py: it defines the counter and config indices"
#endif

#define MAX_V6_EXT 6
#define MAX_VLAN_TAGS 2

/* Fast path sizes; bpf.py reads the same numbers from its own constants. */
#ifndef HEAD_MAX
#define HEAD_MAX 4096       /* payload bytes scanned for a head (power of two) */
#endif
#ifndef SCAN_CHUNK
#define SCAN_CHUNK 128      /* scan steps per run of http_scan (see verified_insns in the header); HEAD_MAX / SCAN_CHUNK + 1 <= 33 tail calls */
#endif
#define VALUE_WORDS 16      /* header value words a scan step passes at most (a 700-byte cookie: 6 steps) */
#define NAME_WORDS 4        /* header name words a scan step passes at most (25 bytes and ':' in one) */
#define PROG_SCAN 0         /* slots of scan_progs, filled by bpf.py's loader */
#define PROG_FINISH 1
#define PATH_LEN 96         /* path bytes kept (the http_agg key); a longer key makes the flow SLOW */
#define RAW_PATH_LEN 128    /* path bytes read as sent: ids written "{id}" may bring it to PATH_LEN */
#define MAX_DUR_BOUNDS 32
#define MAX_SIZE_BOUNDS 16
#ifndef FLOW_STATES
#define FLOW_STATES 65536
#endif
#ifndef AGG_ENTRIES
#define AGG_ENTRIES 8192
#endif
#ifndef HANDOVER_ENTRIES
#define HANDOVER_ENTRIES 16384
#endif
#ifndef HEAD_PARTS
#define HEAD_PARTS 1024     /* request heads begun in one segment and not ended yet (LRU) */
#endif
#define CLAIM_TRIES 256  /* x 32 reads: ~10-40 us of waiting; a holder needs about 1 us */

/* The programs http_filter and http_scan tail-call (PROG_SCAN, PROG_FINISH). */
BPF_PROG_ARRAY(scan_progs, 2);

/* Ports to watch: 1 at the index of each (host byte order). Filled and changed
 * from Python at run time. An array rather than a hash: its lookup is inlined
 * by the JIT, and every packet on the interface pays one or two of them. */
BPF_ARRAY(watched_ports, u8, 65536);

/* CFG_* indices: loopback flag, snap length, link-layer header length (14 or 0), fast path,
 * node-wide capture, interface set (see NODE-WIDE CAPTURE below), route ids, http_agg's
 * generation, and whether tls_flows ever had an entry (until then its lookup is skipped). */
BPF_ARRAY(config, u32, CFG_COUNT);

/* CNT_* indices: seen, kept, one slot per drop reason. */
BPF_PERCPU_ARRAY(filter_counters, u64, CNT_COUNT);

/* FC_* indices: fast path events (not packet verdicts). */
BPF_PERCPU_ARRAY(fast_counters, u64, FC_COUNT);

/* HO_* indices: flows turned SLOW, by reason. */
BPF_PERCPU_ARRAY(handover_counters, u64, HO_COUNT);

/* struct flow_key (one direction of one connection) and struct tls_wire: shared with
 * tls_probes.c, which reads this file's tls_flows. */
#include "tls_wire.h"

/* NODE-WIDE CAPTURE (config slot CFG_NODE = 1; `--interface any`, a glob, or several):
 * one packet socket bound to every interface (ifindex 0) sees a packet once per captured
 * interface it crosses: pod A -> bridge -> pod B shows up on veth A (received) and veth B
 * (sent); host -> pod on the bridge (sent) and the pod's veth (sent); lo twice (sent and
 * received). Duplicates must die here, before the fast path, whose per-CPU flow state is
 * keyed by the 4-tuple and would take a copy for a retransmission or a new request.
 *  - capture_ifaces (CFG_IFACE_SET = 1): the ifindexes user space matched against the
 *    --interface globs; a packet on any other interface is dropped first thing.
 *  - lo: its sent copy is dropped, as the single-interface loopback mode does.
 *  - flow_iface: per connection (keyed client -> server, so both directions share it), the
 *    interface its first passed packet was seen on. Only that interface's copies count, so an
 *    exchange is counted and timed once, by the clocks of the first captured interface it
 *    crossed (for a pod client: its own veth; for a host client: the bridge or lo). LRU: an
 *    evicted connection locks again on the interface its next segment is seen on first. */
#ifndef CAPTURE_IFACES
#define CAPTURE_IFACES 4096
#endif
#ifndef FLOW_IFACES
#define FLOW_IFACES 65536
#endif
#define LOOPBACK_IFINDEX 1  /* lo is ifindex 1 in every network namespace */
BPF_HASH(capture_ifaces, u32, u8, CAPTURE_IFACES);
BPF_TABLE("lru_hash", struct flow_key, u32, flow_iface, FLOW_IFACES);
struct node_scratch {
    struct flow_key conn;  /* client -> server */
    u32 ifindex;
};
BPF_PERCPU_ARRAY(node_scratch, struct node_scratch, 1);

/* A stretch of a direction's byte stream whose payload user space only counts
 * (a body it knows the length of): segments lying wholly within [start, end)
 * are cut to their headers. Both ends are checked, so an entry left over from
 * an earlier connection on the same 4-tuple rarely matches a new one's random
 * sequence numbers. LRU so that entries user space forgot cannot fill the map. */
struct skip_range {
    u32 start;
    u32 end;  /* exclusive */
};
BPF_TABLE("lru_hash", struct flow_key, struct skip_range, body_skip, 16384);

/* Connections user space found to carry TLS records (keyed by direction, like body_skip):
 * their payload is ciphertext, of no use here, and dies in the kernel (verdict `tls`); the
 * plaintext comes from the TLS uprobes. FIN and RST still go up, so that user space ends
 * the connection and forgets the entry; LRU for the ones it never saw end. Each entry keeps
 * its direction's wire times (struct tls_wire, see tls_wire.h), which the TLS probes read to
 * time an HTTPS exchange from its encrypted segments (tls_wire_seen below). */
BPF_TABLE("lru_hash", struct flow_key, struct tls_wire, tls_flows, 16384);

/* The server's first data sequence number (its SYN-ACK's seq + 1) per connection, keyed
 * client -> server, until the connection's first request: the fast path's anchor for the
 * first response byte, so that a first response segment overtaken by the next one is
 * told apart (handover seq, with the anchor) instead of being taken for the start. LRU:
 * connections that never send a request age out. */
BPF_TABLE("lru_hash", struct flow_key, u32, syn_seq, 16384);

/* Histogram bounds, written once by bpf.py: a value's bucket is the number of
 * bounds strictly below it (Python's bisect_left, since `le` is <=). Unused
 * slots hold U64_MAX; n_dur/n_size are for readers of the map. */
struct hist_bounds {
    u64 dur_ns[MAX_DUR_BOUNDS];
    u64 size[MAX_SIZE_BOUNDS];
    u32 n_dur;
    u32 n_size;
};
BPF_ARRAY(agg_bounds, struct hist_bounds, 1);

#define MODE_FAST 1
#define MODE_SLOW 2
#define MODE_LOST 3         /* its handover record did not fit: the rest of it dies here, counted */
#define PHASE_IDLE 0
#define PHASE_REQUEST 1   /* request taken, no response byte yet */
#define PHASE_RESPONSE 2  /* response head taken, body still arriving */
#define PHASE_HEAD 3      /* a request head begun in earlier segments: its scan resumes at cseq */

/* Where the scan of a request head stopped at the end of a segment (PHASE_HEAD); the method,
 * and the path bytes read so far (as sent), are kept in fp_state's method/path/path_len. */
struct head_scan {
    u32 cl;
    u16 seen;           /* the head's bytes in earlier segments, kept in head_parts */
    u8 state;
    u8 nlen;            /* saturated at 255: only names up to 17 bytes are matched */
    u8 cl_ok;
    u8 te_ok;
    u8 cl_phase;
    u8 cl_seen;
    u8 ndig;
    u8 vpos;
    u8 in_query;
    u8 pad;
};

struct fp_state {
    u64 lock;           /* 0 free, 1 claimed (cmpxchg; 64-bit for BPF atomics) */
    u64 start_ns;       /* first byte of the open request, bpf_ktime_get_ns */
    u32 cseq;           /* next client seq expected */
    u32 sseq;           /* next server seq expected, if sseq_known */
    u32 resp_len;       /* Content-Length of the response in progress */
    u32 resp_seen;      /* its body bytes seen so far */
    u16 status;
    u8 mode;
    u8 phase;
    u8 method;
    u8 path_len;
    u8 sseq_known;
    u8 fins;            /* bit 0: client FIN seen, bit 1: server FIN seen */
    char path[PATH_LEN];
    u64 held_ns;        /* when the held body range arrived */
    u32 held_seq;       /* a body segment that overtook the one before it: its range, */
    u32 held_len;       /* counted once the gap before it fills; 0 when none */
    u32 req_len;        /* Content-Length of the open request's body */
    u32 req_left;       /* its bytes still to come (counted by sequence number, never read) */
    struct head_scan head;  /* PHASE_HEAD only */
};
BPF_TABLE("lru_hash", struct flow_key, struct fp_state, flow_state, FLOW_STATES);

/* The bytes of a request head's earlier segments (PHASE_HEAD), for user space should the kernel
 * give the connection up before the head ends: it then parses them first, from `seq` on. Not
 * needed when the head ends here (the usual case), so LRU: entries of connections that died
 * mid-head age out. One per connection, reused for its next split head. `bytes` is twice what
 * a head may hold so that the verifier can prove a write of up to HEAD_MAX bytes at any offset
 * below HEAD_MAX in bounds (the head itself stays <= HEAD_MAX). */
struct head_part {
    u32 seq;            /* the head's first byte */
    u32 len;            /* bytes kept */
    u8 bytes[2 * HEAD_MAX];
};
BPF_TABLE("lru_hash", struct flow_key, struct head_part, head_parts, HEAD_PARTS);
BPF_ARRAY(head_part_zero, struct head_part, 1);  /* never written: the initial value */

/* Written when a FAST flow turns SLOW; user space reads and deletes it. */
struct fp_handover {
    u64 start_ns;
    u32 cseq;
    u32 sseq;
    u32 resp_len;
    u32 resp_seen;
    u16 status;
    u8 phase;
    u8 method;
    u8 path_len;
    u8 sseq_known;
    u8 reason;
    u8 http_seen;       /* 1: the kernel read HTTP on this connection, so later bytes that look
                         * like a TLS record are garbage, not a TLS connection; 0: anchor only */
    char path[PATH_LEN];
    u64 held_ns;        /* the flow's held body range, if held_len: user space counts it */
    u32 held_seq;       /* by length when the gap before it fills */
    u32 held_len;
    u32 req_len;        /* the open request's body length, and how much of it is still to come */
    u32 req_left;
    u32 head_len;       /* a request head begun before the handover: its first head_len bytes
                         * (from cseq on) are in head_parts, for user space to parse first */
};
BPF_HASH(handover, struct flow_key, struct fp_handover, HANDOVER_ENTRIES);

struct http_agg_key {
    u8 server_ip[16];   /* the server's address (IPv4 as ::ffff:a.b.c.d): pods sharing a port stay apart */
    u16 port;
    u16 status;
    u8 method;
    u8 path_len;
    u8 gen;             /* CFG_AGG_GEN when added: user space drains the other generation */
    u8 pad;
    u64 path_hash;      /* path_hash() of the path, which the value holds: the kernel hashes and
                         * compares a key of 32 bytes at each lookup, not one of 120 (see aggregate) */
};
struct http_agg_val {
    u64 count;
    u64 dur_sum_ns;
    u64 resp_sum;
    u64 dur[MAX_DUR_BOUNDS + 1];
    u64 resp[MAX_SIZE_BOUNDS + 1];
    u64 req_sum;
    u64 req[MAX_SIZE_BOUNDS + 1];
    char path[PATH_LEN];  /* this CPU's copy: the path of the exchanges it counts, set by its first */
};
BPF_TABLE("percpu_hash", struct http_agg_key, struct http_agg_val, http_agg, AGG_ENTRIES);
BPF_ARRAY(agg_zero, struct http_agg_val, 1);  /* never written: the initial value */

/* Recycling http_agg (HttpFilter.drain_aggregates): user space flips CFG_AGG_GEN, then
 * updates agg_fence, which returns only once every BPF program running at that moment has
 * finished (a map-in-map update waits for an RCU grace period). From then on nothing adds to
 * the old generation's keys: user space reads them whole and deletes them, and no
 * increment is lost. Neither map is used by the programs. */
BPF_ARRAY(agg_fence_inner, u32, 1);
BPF_ARRAY_OF_MAPS(agg_fence, "agg_fence_inner", 1);

/* Per-CPU work area: payload bytes, the scanner's state (kept in memory on
 * purpose, see the header) and keys/records too big for the 512-byte stack. */
struct scratch {
    u8 buf[HEAD_MAX + VALUE_WORDS * 8];  /* the scan reads VALUE_WORDS words at any index below HEAD_MAX */
    u8 raw[RAW_PATH_LEN + 8];  /* the path as sent, written by the scan (+ 8: copy_path reads words) */
    struct flow_key key;  /* the packet's own direction; in memory, see http_filter */
    struct fp_state st;
    struct fp_handover ho;
    struct http_agg_key ak;
    /* The packet, as http_filter parsed it, for the programs it tail-calls. */
    u32 to_server;
    u32 seq;
    u32 plen;             /* TCP payload length */
    u32 off;              /* offset of the payload in the frame */
    u32 l3_end;           /* end of the IP packet in the frame */
    u32 fin;
    u32 rst;
    u32 syn;
    u32 scanned;          /* the payload went through http_scan: classify_end it */
    u32 out;              /* ids_path: bytes written, */
    u32 seg_out;          /* where the current segment starts in the output, */
    u32 seg;              /* and what it can still be (SH_*): */
    u32 seg_len;          /* its length, */
    u32 uuid_hex;         /* its hex digits, */
    u32 uuid_dash;        /* and 1 + uuid_hex at its last dash (0: none) */
    u32 reject;           /* HO_* reason a request was not taken, or HO_COUNT: not more specific */
    u32 n;
    u32 pos;              /* next byte of buf the scan reads */
    u32 mlen;             /* method length + 1: where the target starts */
    u32 method;
    u32 request;
    u32 kind;
    u32 state;
    u32 nlen;
    u32 cl_ok;
    u32 te_ok;
    u32 cl_phase;
    u32 cl_seen;
    u32 cl;
    u32 ndig;
    u32 path_len;
    u32 in_query;
    u32 vpos;
    u32 head_len;
    u32 status;
    u32 body;
    u32 merged;           /* held body bytes a completing segment joined up with */
    u32 resumed;          /* the scan continues the head of the flow's state (PHASE_HEAD) */
    u32 prefix;           /* that head's bytes in earlier segments */
};
BPF_PERCPU_ARRAY(scratch, struct scratch, 1);

static __always_inline void count(u32 idx)
{
    u64 *val = filter_counters.lookup(&idx);
    if (val)
        (*val)++;
}

static __always_inline void fcount(u32 idx)
{
    u64 *val = fast_counters.lookup(&idx);
    if (val)
        (*val)++;
}

static __always_inline void hcount(u32 idx)
{
    u64 *val = handover_counters.lookup(&idx);
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

/* ---- head scanner -------------------------------------------------------- */

enum {
    S_TARGET, S_VERSION, S_REASON0, S_LF, S_LSTART, S_NAME, S_VALUE,
    S_CLV, S_END_LF, S_DONE, S_FAIL, S_PATH_LONG,  /* S_DONE and after: the scan stops */
};

/* RFC 9110 tchar as two bitmaps (bytes 0-63, 64-127). */
#define TCHAR_LO 0x03ff6cfa00000000ULL
#define TCHAR_HI 0x57ffffffc7fffffeULL
/* Header names, lower case, little-endian packed: "content-length", "transfer-encoding". */
#define CL_W0 0x2d746e65746e6f63ULL  /* "content-" */
#define CL_W1 0x00006874676e656cULL  /* "length" */
#define TE_W0 0x726566736e617274ULL  /* "transfer" */
#define TE_W1 0x6e69646f636e652dULL  /* "-encodin" */
#define TE_W2 0x0000000000000067ULL  /* "g" */
#define VERSION_W 0x002e312f50545448ULL /* "HTTP/1." */

static __always_inline int is_tchar(u32 c)
{
    if (c < 64)
        return (TCHAR_LO >> c) & 1;
    if (c < 128)
        return (TCHAR_HI >> (c - 64)) & 1;
    return 0;
}

static __always_inline u32 pat_byte(u64 w0, u64 w1, u64 w2, u32 k)
{
    if (k < 8)
        return (w0 >> (k * 8)) & 0xff;
    if (k < 16)
        return (w1 >> ((k - 8) * 8)) & 0xff;
    if (k < 24)
        return (w2 >> ((k - 16) * 8)) & 0xff;
    return 0x100;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* Word-at-a-time tests on 8 payload bytes (little-endian: byte i is bits 8i..8i+7). Each
 * returns the high bit of every byte that passes, exactly (no carry crosses a byte). */

/* Bytes equal to zero. */
static __always_inline u64 zero_bytes(u64 x)
{
    return ~(((x & ~HIGHS) + ~HIGHS) | x) & HIGHS;
}

/* Bytes that are letters, digits or '-' (tchar, and most header names are nothing else);
 * w must hold no byte >= 0x80. x + (0x80 - lo) has its high bit set iff x >= lo, and
 * x + (0x7f - hi) iff x > hi. */
static __always_inline u64 name_bytes(u64 w)
{
    u64 lower = w | (0x20 * ONES);
    u64 letter = (lower + (0x80 - 'a') * ONES) & ~(lower + (0x7f - 'z') * ONES);
    u64 digit = (w + (0x80 - '0') * ONES) & ~(w + (0x7f - '9') * ONES);
    return (letter | digit | zero_bytes(w ^ ('-' * ONES))) & HIGHS;
}

/* Index of the byte whose high bit is the lowest set bit of m (m != 0, high bits only).
 * Branch free, as the line lengths it follows vary: that bit is 1 << (8k + 7), and
 * 1 << 8k times 0x0001020304050607 has k, byte 7 - k of the constant, in its top byte. */
static __always_inline u32 first_byte(u64 m)
{
    return (((m & (~m + 1)) >> 7) * 0x0001020304050607ULL) >> 56;
}

/* The first byte of a header line (S_LSTART): the end of the head, or a name's first byte. */
static __always_inline void line_start(volatile struct scratch *s, u32 c)
{
    if (c == '\r') {
        s->state = S_END_LF;
    } else if (is_tchar(c)) {
        s->state = S_NAME;
        s->nlen = 1;
        s->cl_ok = (c | 0x20) == 'c';
        s->te_ok = (c | 0x20) == 't';
    } else {
        s->state = S_FAIL;
    }
}

/* The CR at cr_at ends a line: past its LF and the next line's first byte in the same step
 * when the bytes are here (S_LF, S_LSTART), else on to S_LF. */
static __always_inline void after_cr(volatile struct scratch *s, u32 cr_at)
{
    if (cr_at + 2 < s->n) {
        if (s->buf[(cr_at + 1) & (HEAD_MAX - 1)] != '\n') {
            s->state = S_FAIL;
            return;
        }
        u32 c = s->buf[(cr_at + 2) & (HEAD_MAX - 1)];
        if (c == '\r' && cr_at + 3 < s->n) {  /* the empty line: the head ends here */
            if (s->buf[(cr_at + 3) & (HEAD_MAX - 1)] == '\n') {
                s->head_len = cr_at + 4;
                s->state = S_DONE;
            } else {
                s->state = S_FAIL;
            }
            s->pos = cr_at + 4;
            return;
        }
        line_start(s, c);
        s->pos = cr_at + 3;
    } else {
        s->pos = cr_at + 1;
        s->state = S_LF;
    }
}

/* The ':' of a Content-Length header: its value is read (one per head). */
static __always_inline void content_length(volatile struct scratch *s)
{
    if (s->cl_seen) {
        s->state = S_FAIL;
    } else {
        s->cl_seen = 1;
        s->cl = 0;
        s->ndig = 0;
        s->cl_phase = 0;
        s->state = S_CLV;
    }
}

/* Scan state for s->buf[s->start .. s->n) as the rest of a head: for a request,
 * from the target on; for a response, from after "HTTP/1.d NNN". Everything the
 * user-space parser would reject is rejected here too, and some things it
 * accepts (bare LF, bytes >= 0x80 in the target) are left to it. */
static __always_inline void scan_init(struct scratch *s, u32 start)
{
    s->pos = start;
    s->state = s->request ? S_TARGET : S_REASON0;
    s->head_len = 0;
    s->cl_seen = 0;
    s->cl = 0;
    s->path_len = 0;
    s->in_query = 0;
    s->vpos = 0;
}

/* A word of the scratch buffer from byte i on (i + 8 <= HEAD_MAX + 8 * VALUE_WORDS). */
#define BUF_WORD(s, i) (*(volatile u64 *)((volatile u8 *)(s)->buf + (i)))

/* At most SCAN_CHUNK steps of the scan. A step goes through the stages below in order, each
 * taking what it can of the common case a word or more at a time and moving pos through memory
 * (so that the verifier sees each stage's ways in as one state), then the byte-at-a-time machine
 * takes the byte where they stopped: a header line is mostly one step (see the header). The
 * position and every state live in the per-CPU scratch, so the http_scan program can tail-call
 * itself and go on where it stopped: the verifier walks SCAN_CHUNK steps once, whatever the
 * head's length. */
static __always_inline void scan_chunk(volatile struct scratch *s)
{
#ifdef NO_SCAN
    s->state = S_FAIL;
    return;
#endif
    for (u32 i = 0; i < SCAN_CHUNK; i++) {
        u32 at = s->pos;
        if (at >= s->n)
            break;
        u32 idx = at & (HEAD_MAX - 1);
        u32 c = s->buf[idx];
        u32 state = s->state;
        /* A name that began with 'c' or 't' (line_start took that byte; at 0 it was the segment
         * before's, not in buf): when its first 8 bytes are letters, digits or '-', one
         * comparison each says whether it can still be Content-Length or Transfer-Encoding; a
         * name that ends in them is shorter than both. */
        if (state == S_NAME && s->nlen == 1 && (s->cl_ok || s->te_ok) && at > 0 && at + 7 <= s->n) {
            u64 w = BUF_WORD(s, (at - 1) & (HEAD_MAX - 1));
            if (!(w & HIGHS)) {
                u64 ok = name_bytes(w);
                if (ok == HIGHS) {
                    u64 lw = w | (0x20 * ONES);  /* lower case: the bytes are letters, digits, '-' */
                    if (lw != CL_W0)
                        s->cl_ok = 0;
                    if (lw != TE_W0)
                        s->te_ok = 0;
                    s->nlen = 8;
                    s->pos = at + 7;
                } else {
                    u64 colon = zero_bytes(w ^ (':' * ONES));
                    u64 first = colon & (~colon + 1);
                    u64 before = (first - 1) & HIGHS;
                    if (colon && (ok & before) == before) {
                        s->cl_ok = 0;
                        s->te_ok = 0;
                    }
                }
                at = s->pos;
                if (at >= s->n)
                    continue;
                idx = at & (HEAD_MAX - 1);
                c = s->buf[idx];
                state = s->state;
            }
        }
        /* "Content-" matched so far: "length:" in one comparison (letters in any case: b | 0x20
         * is a given lower-case letter only for that letter's two cases); anything else is
         * another content-* name. */
        if (state == S_NAME && s->cl_ok && s->nlen == 8 && at + 8 <= s->n) {
            u64 w = BUF_WORD(s, idx);
            if (((w | 0x202020202020ULL) & 0x00ffffffffffffffULL) == (CL_W1 | ((u64)':' << 48))) {
                content_length(s);
                s->pos = at + 7;
            } else {
                s->cl_ok = 0;
            }
            at = s->pos;
            if (at >= s->n)
                continue;
            idx = at & (HEAD_MAX - 1);
            c = s->buf[idx];
            state = s->state;
        }
        /* The common Content-Length value, " " then 1 to 6 digits then CR, in one step; any
         * other goes byte by byte below. */
        if (state == S_CLV && s->cl_phase == 0 && at + 8 <= s->n) {
            u64 w = BUF_WORD(s, idx);
            if ((w & 0xff) == ' ' && !(w & HIGHS)) {
                u64 digit = (w + (0x80 - '0') * ONES) & ~(w + (0x7f - '9') * ONES) & HIGHS;
                u64 other = ~digit & HIGHS & ~0x80ULL;  /* byte 0 is the space */
                u32 end = other ? first_byte(other) : 0;
                if (end >= 2 && ((w >> (end * 8)) & 0xff) == '\r') {
                    u32 cl = 0;
#pragma unroll
                    for (u32 j = 1; j < 7; j++) {
                        if (j < end)
                            cl = cl * 10 + (((w >> (j * 8)) & 0xff) - '0');
                    }
                    s->cl = cl;
                    s->ndig = end - 1;
                    s->cl_phase = 1;
                    s->pos = at + end;  /* its CR, taken below as the byte path would */
                }
            }
            at = s->pos;
            if (at >= s->n)
                continue;
            idx = at & (HEAD_MAX - 1);
            c = s->buf[idx];
        }
        /* A name that can no longer be Content-Length or Transfer-Encoding only has to be valid:
         * up to NAME_WORDS words while its bytes are letters, digits or '-', and when a word
         * holds its ':', on into the value in the same step (anything else: byte by byte). */
        if (state == S_NAME && !s->cl_ok && !s->te_ok && at + 8 <= s->n) {
            u32 passed = 0, value = 0;
#pragma unroll
            for (u32 j = 0; j < NAME_WORDS; j++) {
                if (at + 8 * j + 8 > s->n)
                    break;
                u64 w = BUF_WORD(s, idx + 8 * j);
                if (w & HIGHS)
                    break;
                u64 ok = name_bytes(w);
                u64 colon = zero_bytes(w ^ (':' * ONES));
                if (!colon && ok == HIGHS) {
                    passed = 8 * j + 8;
                    continue;
                }
                u64 first = colon & (~colon + 1);
                u64 before = (first - 1) & HIGHS;
                if (colon && (ok & before) == before)
                    value = 8 * j + first_byte(first) + 1;
                break;
            }
            if (value) {
                s->pos = at + value;
                s->state = S_VALUE;
            } else if (passed) {
                s->pos = at + passed;
                continue;
            }
            at = s->pos;
            if (at >= s->n)
                continue;
            idx = at & (HEAD_MAX - 1);
            c = s->buf[idx];
            state = s->state;
        }
        /* A status line's reason phrase ends as a header value does (at CR; LF alone fails). */
        if (state == S_REASON0 && (c == ' ' || c == '\t')) {
            s->pos = at + 1;
            s->state = S_VALUE;
            at = s->pos;
            if (at >= s->n)
                continue;
            idx = at & (HEAD_MAX - 1);
            c = s->buf[idx];
            state = s->state;
        }
        if (state == S_VALUE && at + 8 <= s->n) {
            /* A value ends only at CR (LF alone fails): up to VALUE_WORDS words that hold neither
             * pass in one step. A borrow test per word, exact as a yes/no, finds the first that
             * holds a control byte (< 0x20); exact zero-byte tests then look for CR and LF in it. */
            u32 j;
            u64 ends = 0;
            if (at + 8 * VALUE_WORDS <= s->n) {  /* the common case: no word to check against n */
#pragma unroll
                for (j = 0; j < VALUE_WORDS; j++) {
                    u64 w = BUF_WORD(s, idx + 8 * j);
                    if (!((w - 0x20 * ONES) & ~w & HIGHS))
                        continue;
                    ends = zero_bytes(w ^ ('\r' * ONES)) | zero_bytes(w ^ ('\n' * ONES));
                    if (ends)
                        break;
                }
            } else {
#pragma unroll
                for (j = 0; j < VALUE_WORDS; j++) {
                    if (at + 8 * j + 8 > s->n)
                        break;
                    u64 w = BUF_WORD(s, idx + 8 * j);
                    if (!((w - 0x20 * ONES) & ~w & HIGHS))
                        continue;
                    ends = zero_bytes(w ^ ('\r' * ONES)) | zero_bytes(w ^ ('\n' * ONES));
                    if (ends)
                        break;
                }
            }
            if (!ends) {
                s->pos = at + 8 * j;
                continue;
            }
            /* On to the value's end, through memory: the verifier then walks what follows once,
             * not once per word it could be in. */
            s->pos = at + 8 * j + first_byte(ends);
            at = s->pos;
            if (at >= s->n)
                continue;
            idx = at & (HEAD_MAX - 1);
            c = s->buf[idx];
            if (c == '\r') {  /* straight past it, its LF and the next line's first byte */
                after_cr(s, at);
                if (s->state >= S_DONE)
                    break;
                continue;
            }
        }
        /* The byte the stages above stopped at. */
        if (state == S_VALUE) {
            if (c == '\r')
                s->state = S_LF;
            else if (c == '\n')
                s->state = S_FAIL;
        } else if (state == S_NAME) {
            u32 k = s->nlen;
            if (c == ':') {
                if (s->te_ok && k == 17) {
                    s->state = S_FAIL;
                } else if (s->cl_ok && k == 14) {
                    content_length(s);
                } else {
                    s->state = S_VALUE;
                }
            } else if (is_tchar(c)) {
                /* Names match in any case: c | 0x20 lowers letters and leaves '-' as it is. */
                u32 lc = c | 0x20;
                if (s->cl_ok && lc != pat_byte(CL_W0, CL_W1, 0, k))
                    s->cl_ok = 0;
                if (s->te_ok && lc != pat_byte(TE_W0, TE_W1, TE_W2, k))
                    s->te_ok = 0;
                s->nlen = k + 1;
            } else {
                s->state = S_FAIL;
            }
        } else if (state == S_LF) {
            s->state = c == '\n' ? S_LSTART : S_FAIL;
        } else if (state == S_LSTART) {
            line_start(s, c);
        } else if (state == S_TARGET) {
            /* Target bytes (printable, none of ' ', '?', '#'; in the query, any printable but
             * ' ') a word at a time up to the first other byte, which is taken below in the same
             * step; the path's are kept as they go by (raw's 8 spare bytes take the word). */
            if (at + 8 <= s->n) {
                u64 w = BUF_WORD(s, idx);
                if (!(w & HIGHS)) {
                    u64 plain = (w + (0x80 - 0x21) * ONES) & ~(w + (0x7f - 0x7e) * ONES) & HIGHS;
                    u32 in_query = s->in_query;
                    if (!in_query)
                        plain &= ~zero_bytes(w ^ ('?' * ONES)) & ~zero_bytes(w ^ ('#' * ONES));
                    u64 other = ~plain & HIGHS;
                    u32 take = other ? first_byte(other) : 8;
                    if (take && !in_query) {
                        u32 pl = s->path_len;
                        if (pl <= RAW_PATH_LEN && pl + take <= RAW_PATH_LEN) {
                            *(volatile u64 *)((volatile u8 *)s->raw + pl) = w;
                            s->path_len = pl + take;
                        } else {
                            take = 0;  /* the byte below says S_PATH_LONG */
                        }
                    }
                    if (take == 8) {
                        s->pos = at + 8;
                        continue;
                    }
                    if (take) {
                        at += take;
                        idx = at & (HEAD_MAX - 1);
                        c = s->buf[idx];
                    }
                }
            }
            if (c == ' ') {
                /* "HTTP/1.d" CRLF whole in the bytes loaded: in this step, with the next line's
                 * first byte when it is here (else S_VERSION). */
                if (at + 11 <= s->n) {
                    u64 w = BUF_WORD(s, (at + 1) & (HEAD_MAX - 1));
                    u32 d = (w >> 56) & 0xff;
                    if ((w & 0x00ffffffffffffffULL) == VERSION_W && d >= '0' && d <= '9' &&
                        s->buf[(at + 9) & (HEAD_MAX - 1)] == '\r' && s->buf[(at + 10) & (HEAD_MAX - 1)] == '\n') {
                        if (at + 11 < s->n) {
                            line_start(s, s->buf[(at + 11) & (HEAD_MAX - 1)]);
                            s->pos = at + 12;
                        } else {
                            s->state = S_LSTART;
                            s->pos = at + 11;
                        }
                        if (s->state >= S_DONE)
                            break;
                        continue;
                    }
                }
                s->state = S_VERSION;
            } else if (c < 0x21 || c > 0x7e) {
                s->state = S_FAIL;
            } else {
                if (c == '?' || c == '#')
                    s->in_query = 1;
                if (!s->in_query) {
                    u32 pl = s->path_len;
                    if (pl >= RAW_PATH_LEN) {
                        s->state = S_PATH_LONG;
                    } else {
                        s->raw[pl] = c;  /* kept apart from buf: a head's next segment reuses it */
                        s->path_len = pl + 1;
                    }
                }
            }
        } else if (state == S_CLV) {
            if (c == ' ' || c == '\t') {
                if (s->cl_phase == 1)
                    s->cl_phase = 2;
            } else if (c >= '0' && c <= '9') {
                if (s->cl_phase == 2 || s->ndig >= 9) {
                    s->state = S_FAIL;
                } else {
                    s->cl_phase = 1;
                    s->cl = s->cl * 10 + (c - '0');
                    s->ndig = s->ndig + 1;
                }
            } else if (c == '\r' && s->cl_phase != 0) {
                after_cr(s, at);
                if (s->state >= S_DONE)
                    break;
                continue;
            } else {
                s->state = S_FAIL;
            }
        } else if (state == S_VERSION) {
            u32 v = s->vpos;
            int ok;
            if (v == 7)
                ok = c >= '0' && c <= '9';
            else if (v == 8)
                ok = c == '\r';
            else if (v == 9)
                ok = c == '\n';
            else
                ok = c == ((VERSION_W >> ((v & 7) * 8)) & 0xff);
            if (!ok)
                s->state = S_FAIL;
            else if (v == 9)
                s->state = S_LSTART;
            s->vpos = v + 1;
        } else if (state == S_REASON0) {
            s->state = c == '\r' ? S_LF : S_FAIL;  /* ' ' and '\t' went on into the reason above */
        } else if (state == S_END_LF) {
            if (c == '\n') {
                s->head_len = at + 1;
                s->state = S_DONE;
            } else {
                s->state = S_FAIL;
            }
        }
        s->pos = at + 1;
        if (s->state >= S_DONE)
            break;
    }
}

/* Load up to HEAD_MAX payload bytes into the scratch buffer; returns how many (0: under `least`). */
static __always_inline u32 load_payload(struct __sk_buff *skb, struct scratch *s, u32 off, u32 plen, u32 least)
{
    u32 n = plen < HEAD_MAX ? plen : HEAD_MAX;
    if (n < least || n == 0)
        return 0;
    /* Through memory, then clamped so that the verifier sees 1..HEAD_MAX: a size
     * argument is tracked precisely back to its source, and were that source
     * the payload length, every range of it the fast path compares against
     * would be a separate verifier state (it ran out of its 1M instructions). */
    volatile struct scratch *vs = s;
    vs->n = n;
    n = ((vs->n - 1) & (HEAD_MAX - 1)) + 1;
    if (bpf_skb_load_bytes(skb, off, s->buf, n) < 0)
        return 0;
    return n;
}

/* Method ids; bpf.py has the same table (METHODS). CONNECT never takes the fast path. */
static __always_inline u32 method_of(u64 w, u32 *len)
{
    if ((w & 0xffffffffULL) == 0x20544547ULL) { *len = 4; return 1; }            /* "GET " */
    if ((w & 0xffffffffffULL) == 0x2044414548ULL) { *len = 5; return 2; }        /* "HEAD " */
    if ((w & 0xffffffffffULL) == 0x2054534f50ULL) { *len = 5; return 3; }        /* "POST " */
    if ((w & 0xffffffffULL) == 0x20545550ULL) { *len = 4; return 4; }            /* "PUT " */
    if ((w & 0xffffffffffffffULL) == 0x204554454c4544ULL) { *len = 7; return 5; } /* "DELETE " */
    if (w == 0x20534e4f4954504fULL) { *len = 8; return 6; }                       /* "OPTIONS " */
    if ((w & 0xffffffffffffULL) == 0x204543415254ULL) { *len = 6; return 7; }    /* "TRACE " */
    if ((w & 0xffffffffffffULL) == 0x204843544150ULL) { *len = 6; return 8; }    /* "PATCH " */
    return 0;
}
#define METHOD_HEAD 2

#define KIND_NONE 0
#define KIND_REQUEST 1   /* the segment is exactly one simple request head */
#define KIND_RESPONSE 2  /* the segment starts with a final response head we can frame */
#define KIND_PARTIAL 3   /* the segment starts or continues a request head that goes on in the next */

/* A client segment that does not start a head may continue the one its flow began earlier
 * (PHASE_HEAD): load the scan state saved at the end of the previous segment, to go on from
 * this segment's first byte. Read without the flow's claim; fast_step, claimed, takes the
 * result only if the flow is still in PHASE_HEAD at this seq, and every change to the saved
 * state moves cseq on. */
static __always_inline int resume_head(struct scratch *s)
{
    volatile struct scratch *vs = s;
    struct fp_state *st = flow_state.lookup(&s->key);
    if (!st || st->mode != MODE_FAST || st->phase != PHASE_HEAD || st->cseq != vs->seq)
        return 0;
    struct head_scan h;
    __builtin_memcpy(&h, &st->head, sizeof(h));
    __builtin_memcpy(s->raw, st->path, PATH_LEN);
    vs->path_len = st->path_len;
    vs->method = st->method;
    vs->state = h.state;
    vs->cl = h.cl;
    vs->nlen = h.nlen;
    vs->cl_ok = h.cl_ok;
    vs->te_ok = h.te_ok;
    vs->cl_phase = h.cl_phase;
    vs->cl_seen = h.cl_seen;
    vs->ndig = h.ndig;
    vs->vpos = h.vpos;
    vs->in_query = h.in_query;
    vs->prefix = h.seen;
    vs->resumed = 1;
    vs->request = 1;
    vs->pos = 0;
    vs->head_len = 0;
    return 1;
}

/* First half of classifying a segment's payload by its direction, before the
 * flow's state is looked at (http_filter): load it, match the method or the
 * status line, and set up the scan. Returns 1 when the scan (http_scan) must
 * run, 0 when the segment cannot start a head we take (body bytes leave after
 * an 8-byte comparison). s->reject says why a request was not taken when the
 * reason is more specific than "not a simple request". */
static __always_inline int classify_start(struct __sk_buff *skb, struct scratch *s, u32 off, u32 plen,
                                          int to_server)
{
    volatile struct scratch *vs = s;
    vs->kind = KIND_NONE;
    if (to_server && plen > HEAD_MAX) {
        vs->reject = HO_HEAD_TOO_LONG;
        return 0;
    }
    u32 n = load_payload(skb, s, off, plen, to_server ? 1 : 16);
    if (!n)
        return 0;
    u64 w;
    __builtin_memcpy(&w, s->buf, 8);
    u32 start;
    if (to_server) {
        u32 mlen = 0;
        u32 method = n >= 16 ? method_of(w, &mlen) : 0;
        if (!method || mlen > 8 || s->buf[mlen & 15] != '/')
            return resume_head(s);
        vs->method = method;
        vs->mlen = mlen;
        start = mlen;
    } else {
        if ((w & 0x00ffffffffffffffULL) != VERSION_W)
            return 0;
        u8 d7 = s->buf[7], sp = s->buf[8], a = s->buf[9], b = s->buf[10], c = s->buf[11];
        if (d7 < '0' || d7 > '9' || sp != ' ')
            return 0;
        if (a < '0' || a > '9' || b < '0' || b > '9' || c < '0' || c > '9')
            return 0;
        u32 status = (a - '0') * 100 + (b - '0') * 10 + (c - '0');
        if (status < 200)
            return 0;  /* interim and 101: user space */
        vs->status = status;
        start = 12;
    }
    vs->request = to_server;
    scan_init(s, start);
    return 1;
}

/* The path into s->st.path as sent, the bytes past path_len zeroed (the path is part
 * of the http_agg key). A word at a time: a twelfth of a byte loop's instructions.
 * Little-endian, as every JIT target we run on: a word's first byte is its low byte.
 * raw's 8 spare bytes keep the last read in bounds. */
static __always_inline void copy_path(struct scratch *s, u32 path_len)
{
#pragma unroll
    for (u32 w = 0; w < PATH_LEN / 8; w++) {
        u32 lo = w * 8;
        u64 word = *(u64 *)(s->raw + lo);
        u64 keep = path_len >= lo + 8 ? ~0ULL : path_len <= lo ? 0 : (1ULL << ((path_len - lo) * 8)) - 1;
        *(u64 *)(s->st.path + lo) = word & keep;
    }
}

/* What a path segment read so far can still be, for ids_path (bits of s->seg). */
#define SH_DIGITS 1       /* digits only */
#define SH_HEX 2          /* hex digits only */
#define SH_HAS_DIGIT 4
#define SH_HAS_LETTER 8
#define SH_UUID 16        /* 8-4-4-4-12 hex digits, each dash between groups optional */
#define SH_FRESH (SH_DIGITS | SH_HEX | SH_UUID)

/* The path into s->st.path with every segment RouteMapper's heuristic takes for an
 * identifier written as "{id}", so that 100,000 ids make one http_agg key, not 100,000.
 * The rule is routes.py's `_is_identifier`, byte for byte: digits only; or 16 bytes or more
 * and hex only, or a UUID (dashes optional), or mixing letters and digits, or over 64 bytes.
 * The heuristic keeps a literal "{id}" as it is, so the route of the key is the route of the
 * path sent. User space turns this on (CFG_ROUTE_IDS) only when no `--route` pattern has a
 * literal segment of that shape (RouteMapper.identifiers_are_ids), since a pattern's
 * placeholder matches either. The path as sent may be up to RAW_PATH_LEN bytes; the result
 * must fit PATH_LEN. Returns 0, having written nothing that matters, when it does not: the
 * caller copies the path as sent if that fits. */
static __always_inline int ids_path(struct scratch *s, u32 path_len)
{
    volatile struct scratch *vs = s;
    vs->out = 0;
    vs->seg_out = 0;
    vs->seg = SH_FRESH;
    vs->seg_len = 0;
    vs->uuid_hex = 0;
    vs->uuid_dash = 0;
    for (u32 i = 0; i <= RAW_PATH_LEN; i++) {
        if (i > path_len)
            break;
        /* A '/' past the end closes the last segment. */
        u32 c = i < path_len ? s->raw[i] : '/';
        if (c == '/') {
            u32 len = vs->seg_len, f = vs->seg;
            int id = len && ((f & SH_DIGITS) ||
                             (len >= 16 && (len > 64 || (f & SH_HEX) ||
                                            ((f & SH_HAS_DIGIT) && (f & SH_HAS_LETTER)) ||
                                            ((f & SH_UUID) && vs->uuid_hex == 32))));
            if (id) {
                u32 o = vs->seg_out;
                if (o > PATH_LEN - 4)
                    return 0;
                s->st.path[o] = '{';
                s->st.path[o + 1] = 'i';
                s->st.path[o + 2] = 'd';
                s->st.path[o + 3] = '}';
                vs->out = o + 4;
            } else if (vs->out > PATH_LEN) {
                return 0;  /* a segment kept as sent ends past the key */
            }
            if (i == path_len)
                break;
            u32 o = vs->out;
            if (o >= PATH_LEN)
                return 0;
            s->st.path[o] = '/';
            vs->out = o + 1;
            vs->seg_out = o + 1;
            vs->seg = SH_FRESH;
            vs->seg_len = 0;
            vs->uuid_hex = 0;
            vs->uuid_dash = 0;
        } else {
            /* Bytes past the key are dropped: they count only if the segment is an id. */
            u32 o = vs->out;
            if (o < PATH_LEN)
                s->st.path[o] = c;
            vs->out = o + 1;
            vs->seg_len = vs->seg_len + 1;
            u32 lower = c | 0x20;  /* letters to lower case; no other path byte lands in a..z */
            int digit = c >= '0' && c <= '9';
            int letter = lower >= 'a' && lower <= 'z';
            int hex = digit || (lower >= 'a' && lower <= 'f');
            u32 f = vs->seg;
            if (!digit)
                f &= ~SH_DIGITS;
            if (!hex)
                f &= ~SH_HEX;
            if (digit)
                f |= SH_HAS_DIGIT;
            if (letter)
                f |= SH_HAS_LETTER;
            u32 h = vs->uuid_hex;
            if (hex) {
                if (h >= 32)
                    f &= ~SH_UUID;
                vs->uuid_hex = h + 1;
            } else if (c == '-' && (h == 8 || h == 12 || h == 16 || h == 20) && vs->uuid_dash != h + 1) {
                vs->uuid_dash = h + 1;  /* one dash at most between two groups */
            } else {
                f &= ~SH_UUID;
            }
            vs->seg = f;
        }
    }
    /* Bytes past the result may hold what a "{id}" replaced: zero them, a word at a time. */
    u32 len = vs->out;
    if (len > PATH_LEN)
        return 0;
#pragma unroll
    for (u32 w = 0; w < PATH_LEN / 8; w++) {
        u32 lo = w * 8;
        u64 keep = len >= lo + 8 ? ~0ULL : len <= lo ? 0 : (1ULL << ((len - lo) * 8)) - 1;
        *(u64 *)(s->st.path + lo) &= keep;
    }
    s->st.path_len = len;
    return 1;
}

/* Second half, once the scan has stopped (http_finish): sets s->kind; for a
 * request s->st.method/path/path_len, for a response s->head_len, s->cl_seen
 * and s->cl. A request head that goes on past the segment (KIND_PARTIAL) leaves in
 * s->st what fast_path keeps of it: the scan state, the method and the path so far. */
static __always_inline void classify_end(struct scratch *s)
{
    volatile struct scratch *vs = s;
    vs->kind = KIND_NONE;
    u32 state = vs->state;
    u32 prefix = vs->prefix;
    if (state != S_DONE) {
        if (!vs->request)
            return;
        if (state == S_PATH_LONG) {
            vs->reject = HO_PATH_TOO_LONG;
        } else if (state != S_FAIL && vs->pos >= vs->n) {  /* the bytes ran out mid-head */
            u32 seen = prefix + vs->n;  /* n is the whole segment: longer ones are not scanned */
            if (seen >= HEAD_MAX) {
                vs->reject = HO_HEAD_TOO_LONG;
                return;
            }
            vs->reject = HO_HEAD_SPLIT;  /* should the kernel be unable to keep it */
            struct head_scan *h = &s->st.head;
            h->seen = seen;
            h->state = state;
            h->cl = vs->cl;
            u32 nlen = vs->nlen;
            h->nlen = nlen < 255 ? nlen : 255;
            h->cl_ok = vs->cl_ok;
            h->te_ok = vs->te_ok;
            h->cl_phase = vs->cl_phase;
            h->cl_seen = vs->cl_seen;
            h->ndig = vs->ndig;
            h->vpos = vs->vpos;
            h->in_query = vs->in_query;
            h->pad = 0;
            u32 path_len = vs->path_len;
            if (path_len > PATH_LEN) {  /* fp_state keeps PATH_LEN bytes of it */
                vs->reject = HO_PATH_TOO_LONG;
                return;
            }
            copy_path(s, path_len);
            s->st.path_len = path_len;
            s->st.method = vs->method;
            vs->kind = KIND_PARTIAL;
        }
        return;
    }
    if (!vs->request) {
        vs->kind = KIND_RESPONSE;
        return;
    }
    /* A body announced by Content-Length is counted by sequence number, never read: the
     * segment may carry all of it, part of it, or none; anything past it is pipelining. */
    u32 head_len = vs->head_len;
    u32 plen = vs->plen;
    if (prefix + head_len > HEAD_MAX) {
        vs->reject = HO_HEAD_TOO_LONG;
        return;
    }
    u32 cl = vs->cl_seen ? vs->cl : 0;
    if (head_len > plen || plen - head_len > cl)
        return;  /* bytes after the head (and body): pipelining or garbage, user space's */
    s->st.req_len = cl;
    s->st.req_left = cl - (plen - head_len);
    u32 path_len = vs->path_len;
    if (path_len > RAW_PATH_LEN)
        return;
    if (!(cfg(CFG_ROUTE_IDS, 0) && ids_path(s, path_len))) {
        if (path_len > PATH_LEN) {
            vs->reject = HO_PATH_TOO_LONG;
            return;
        }
        copy_path(s, path_len);
        s->st.path_len = path_len;
    }
    s->st.method = vs->method;
    vs->kind = KIND_REQUEST;
}

/* The body length of a classified response to `method`; 0 when it is framed
 * only by the connection's end (user space's case). */
static __always_inline int response_body(struct scratch *s, u32 method, u32 *body)
{
    if (method == METHOD_HEAD || s->status == 204 || s->status == 304)
        *body = 0;
    else if (s->cl_seen)
        *body = s->cl;
    else
        return 0;
    return 1;
}

/* ---- aggregation --------------------------------------------------------- */

/* Bucket of v: how many bounds lie strictly below it, by binary search over
 * the sorted bounds (unused slots hold U64_MAX, bpf.py). Fixed steps, so the
 * verifier sees every index bounded and nothing needs unrolling onto the stack. */
static __always_inline u32 duration_bucket(struct hist_bounds *b, u64 v)
{
    u32 idx = 0;
    if (b->dur_ns[15] < v) idx += 16;
    if (b->dur_ns[(idx + 7) & 31] < v) idx += 8;
    if (b->dur_ns[(idx + 3) & 31] < v) idx += 4;
    if (b->dur_ns[(idx + 1) & 31] < v) idx += 2;
    if (b->dur_ns[idx & 31] < v) idx += 1;
    if (idx == 31 && b->dur_ns[31] < v) idx = 32;
    return idx;
}

static __always_inline u32 size_bucket(struct hist_bounds *b, u64 v)
{
    u32 idx = 0;
    if (b->size[7] < v) idx += 8;
    if (b->size[(idx + 3) & 15] < v) idx += 4;
    if (b->size[(idx + 1) & 15] < v) idx += 2;
    if (b->size[idx & 15] < v) idx += 1;
    if (idx == 15 && b->size[15] < v) idx = 16;
    return idx;
}

/* A 64-bit hash of a path (zero-padded to PATH_LEN), a word at a time (FxHash's step). Not a
 * keyed hash: two paths of one hash are told apart by the path in the value (aggregate). */
static __always_inline u64 path_hash(const char *path)
{
    u64 h = 0;
#pragma unroll
    for (u32 w = 0; w < PATH_LEN / 8; w++)
        h = (((h << 5) | (h >> 59)) ^ *(const u64 *)(path + w * 8)) * 0x517cc1b727220a95ULL;
    return h;
}

/* Add the exchange of `st` ending now; -1 (nothing added) when http_agg is full, or, should two
 * paths share a hash, when this CPU's copy of the key already counts the other one.
 *
 * The key holds the path's hash and the value the path: the lookup, whose cost grows with
 * the key the kernel hashes (jhash) and compares, took ~120 ns a response segment with the
 * path in a 120-byte key and ~76 ns with this one (BPF_PROG_TEST_RUN replay, against an array
 * lookup in its place; filtercost4-under-load.md). A CPU's copy of a value is fresh (count 0) until its first exchange, which
 * writes the path; later ones check it, a word at a time. Each copy is written only by its
 * CPU, so user space (bpf.py) reads every copy's path and sums the copies per path: two
 * paths of one hash on two CPUs are still counted apart, exactly. */
static __always_inline int aggregate(struct scratch *s, struct fp_state *st, struct flow_key *fk, u64 now,
                                     u32 body)
{
    u32 zero = 0;
    struct http_agg_key *ak = &s->ak;
    __builtin_memcpy(ak->server_ip, fk->daddr, 16);
    ak->port = fk->dport;
    ak->status = s->status;  /* set by fast_step for both ways an exchange completes */
    ak->method = st->method;
    ak->path_len = st->path_len;
    ak->gen = cfg(CFG_AGG_GEN, 0) & 1;
    ak->pad = 0;
    ak->path_hash = path_hash(st->path);
    struct http_agg_val *v = http_agg.lookup(ak);
    if (!v) {
        struct http_agg_val *init = agg_zero.lookup(&zero);
        if (!init)
            return -1;
        http_agg.insert(ak, init);  /* EEXIST when another CPU won the race: fine */
        v = http_agg.lookup(ak);
        if (!v)
            return -1;
    }
    if (!v->count) {
        __builtin_memcpy(v->path, st->path, PATH_LEN);
    } else {
        u64 diff = 0;
#pragma unroll
        for (u32 w = 0; w < PATH_LEN / 8; w++)
            diff |= *(u64 *)(v->path + w * 8) ^ *(u64 *)(st->path + w * 8);
        if (diff)
            return -1;
    }
    struct hist_bounds *b = agg_bounds.lookup(&zero);
    if (!b)
        return -1;
    u64 d = now > st->start_ns ? now - st->start_ns : 0;
    u32 di = duration_bucket(b, d);
    u32 si = size_bucket(b, body);
    u32 ri = size_bucket(b, st->req_len);
    v->count++;
    v->dur_sum_ns += d;
    v->resp_sum += body;
    if (di <= MAX_DUR_BOUNDS)
        v->dur[di]++;
    if (si <= MAX_SIZE_BOUNDS)
        v->resp[si]++;
    v->req_sum += st->req_len;
    if (ri <= MAX_SIZE_BOUNDS)
        v->req[ri]++;
    return 0;
}

/* ---- per-flow state machine ---------------------------------------------- */

#define V_CONSUMED 0      /* the kernel took the segment */
#define V_DELETE 1        /* took it, and the connection is over: delete the state */
#define V_COMPLETE 2      /* the open exchange ends with this segment: aggregate */
#define V_HANDOVER 16     /* + HO_* reason: turn SLOW, pass the segment up */

/* Keep a client segment that starts or continues a request head without ending it in head_parts,
 * after the `used` bytes of the head kept before (its first byte: head_seq); 0 when kept. The
 * segment is whole in the scratch (plen <= HEAD_MAX), and used + plen < HEAD_MAX. */
static __always_inline int keep_head_part(struct __sk_buff *skb, struct scratch *s, u32 head_seq, u32 used)
{
    volatile struct scratch *vs = s;
    struct head_part *p = head_parts.lookup(&s->key);
    if (!p) {
        if (used)
            return -1;  /* evicted: the head's first bytes are gone */
        u32 zero = 0;
        struct head_part *init = head_part_zero.lookup(&zero);
        if (!init || head_parts.update(&s->key, init) != 0)
            return -1;
        p = head_parts.lookup(&s->key);
        if (!p)
            return -1;
    } else if (used && (p->seq != head_seq || p->len != used)) {
        return -1;  /* evicted, and the entry taken by another connection */
    }
    u32 n = ((vs->plen - 1) & (HEAD_MAX - 1)) + 1;  /* as load_payload: 1..HEAD_MAX to the verifier */
    if (bpf_skb_load_bytes(skb, vs->off, p->bytes + (used & (HEAD_MAX - 1)), n) < 0)
        return -1;
    p->seq = head_seq;
    p->len = used + n;
    return 0;
}

/* Decide what a segment does to a claimed FAST flow. Changes `st` only when it
 * returns V_CONSUMED or V_DELETE; V_COMPLETE and handovers leave it untouched. */
static __always_inline u32 fast_step(struct __sk_buff *skb, struct scratch *s, struct fp_state *st,
                                     int to_server, u32 seq, u32 plen, u32 off, u8 fin, u8 rst,
                                     u8 syn, u64 now)
{
    u32 phase = st->phase;
    s->merged = 0;
    if (rst)
        return phase == PHASE_IDLE ? V_DELETE : V_HANDOVER + HO_CLOSE;
    if (syn)
        return V_HANDOVER + HO_SEQ;
    if (plen && fin && to_server)
        return V_HANDOVER + HO_CLOSE;  /* a request and close at once: rare, user space */
    /* A server's data with FIN (a Connection: close response often ends so) is taken only
     * when it completes the exchange; fast_path then records the FIN. */
    if (to_server) {
        if (plen) {
            s32 d = (s32)(seq - st->cseq);
            if (d + (s32)plen <= 0) {
                fcount(FC_RETRANSMITS);
                return V_CONSUMED;
            }
            if (d != 0)
                return V_HANDOVER + HO_SEQ;
            if (st->req_left) {  /* request body bytes: counted, never read */
                if (plen > st->req_left)
                    return V_HANDOVER + HO_PIPELINED;
                st->req_left -= plen;
                st->cseq = seq + plen;
                return V_CONSUMED;
            }
            if (s->resumed != (phase == PHASE_HEAD))
                return V_HANDOVER + HO_HEAD_SPLIT;  /* a head's next part scanned as a head of its own */
            if (phase == PHASE_HEAD) {
                if (s->kind == KIND_PARTIAL) {
                    u32 used = st->head.seen;  /* before this segment (s->st.head counts it in) */
                    if (keep_head_part(skb, s, seq - used, used) != 0)
                        return V_HANDOVER + HO_HEAD_SPLIT;
                    __builtin_memcpy(&st->head, &s->st.head, sizeof(st->head));
                    st->path_len = s->st.path_len;
                    __builtin_memcpy(st->path, s->st.path, PATH_LEN);
                    st->cseq = seq + plen;
                    return V_CONSUMED;
                }
            } else if (phase != PHASE_IDLE) {
                return V_HANDOVER + HO_PIPELINED;
            } else if (s->kind == KIND_PARTIAL) {
                if (keep_head_part(skb, s, seq, 0) != 0)
                    return V_HANDOVER + HO_HEAD_SPLIT;
                __builtin_memcpy(&st->head, &s->st.head, sizeof(st->head));
                st->method = s->st.method;
                st->path_len = s->st.path_len;
                __builtin_memcpy(st->path, s->st.path, PATH_LEN);
                st->phase = PHASE_HEAD;
                st->start_ns = now;  /* the request starts with its head's first byte */
                st->cseq = seq + plen;
                return V_CONSUMED;
            }
            if (s->kind != KIND_REQUEST)
                return V_HANDOVER + (s->reject < HO_COUNT ? s->reject : HO_REQUEST);
            if (phase == PHASE_HEAD)
                fcount(FC_SPLIT_HEADS);
            else
                st->start_ns = now;
            st->phase = PHASE_REQUEST;
            st->req_len = s->st.req_len;
            st->req_left = s->st.req_left;
            st->method = s->st.method;
            st->path_len = s->st.path_len;
            __builtin_memcpy(st->path, s->st.path, PATH_LEN);
            st->cseq = seq + plen;
            fcount(FC_REQUESTS);
            return V_CONSUMED;
        }
        if (phase != PHASE_IDLE)
            return V_HANDOVER + HO_CLOSE;
        st->fins |= 1;
        return st->fins == 3 ? V_DELETE : V_CONSUMED;
    }
    if (!plen) {
        if (phase != PHASE_IDLE)
            return V_HANDOVER + HO_CLOSE;
        st->fins |= 2;
        return st->fins == 3 ? V_DELETE : V_CONSUMED;
    }
    if (st->sseq_known) {
        s32 d = (s32)(seq - st->sseq);
        if (d + (s32)plen <= 0) {
            if (fin)
                return V_HANDOVER + HO_CLOSE;
            fcount(FC_RETRANSMITS);
            return V_CONSUMED;
        }
        if (d != 0) {
            /* On lo a response's segments leave from two CPUs, and one sometimes reaches
             * the tap before the one ahead of it. Hold one such range that lies wholly
             * inside the body (its bytes are only counted) rather than hand over. */
            if (d > 0 && phase == PHASE_RESPONSE && !fin) {
                if (st->held_len) {
                    if (seq == st->held_seq && plen <= st->held_len) {
                        fcount(FC_RETRANSMITS);
                        return V_CONSUMED;
                    }
                    /* The segment after the held range overtook the same gap (seen: k+1 and
                     * k+2 both before k): the range grows, and its time is its last byte's. */
                    if (seq == st->held_seq + st->held_len &&
                        (u64)(u32)d + plen <= (u64)(st->resp_len - st->resp_seen)) {
                        st->held_len += plen;
                        st->held_ns = now;
                        fcount(FC_OVERTAKEN);
                        return V_CONSUMED;
                    }
                } else if ((u64)(u32)d + plen <= (u64)(st->resp_len - st->resp_seen)) {
                    st->held_seq = seq;
                    st->held_len = plen;
                    st->held_ns = now;
                    fcount(FC_OVERTAKEN);
                    return V_CONSUMED;
                }
            }
            return V_HANDOVER + HO_SEQ;
        }
    }
    if (phase == PHASE_IDLE)
        return V_HANDOVER + HO_UNSOLICITED;
    if (phase == PHASE_HEAD)
        return V_HANDOVER + HO_HEAD_SPLIT;  /* answered before the head ended (400, 408) */
    if (st->req_left)
        return V_HANDOVER + HO_REQUEST_BODY;  /* an early answer (100 Continue, 413): user space */
    if (phase == PHASE_REQUEST) {
        u32 body;
        if (s->kind != KIND_RESPONSE || !response_body(s, st->method, &body))
            return V_HANDOVER + HO_RESPONSE;
        u32 head_len = s->head_len;
        s->body = body;
        u64 total = (u64)head_len + body;
        if (plen > total)
            return V_HANDOVER + HO_EXTRA;
        if (plen == total)
            return V_COMPLETE;
        if (fin)
            return V_HANDOVER + HO_CLOSE;  /* the response ends before its length */
        st->status = s->status;
        st->resp_len = body;
        st->resp_seen = plen - head_len;
        st->phase = PHASE_RESPONSE;
        st->sseq = seq + plen;
        st->sseq_known = 1;
        return V_CONSUMED;
    }
    u32 left = st->resp_len - st->resp_seen;
    u32 got = plen;
    if (st->held_len) {
        u32 gap = st->held_seq - seq;  /* bytes from here to the held range */
        if (plen > gap)
            return V_HANDOVER + HO_SEQ;  /* overlaps it: resegmented, user space sorts it out */
        if (plen == gap)
            got = plen + st->held_len;  /* fills the hole: the held bytes count now */
    }
    if (got > left)
        return V_HANDOVER + HO_EXTRA;
    if (got == left) {
        s->status = st->status;
        s->body = st->resp_len;
        s->merged = got - plen;
        return V_COMPLETE;
    }
    if (fin)
        return V_HANDOVER + HO_CLOSE;
    st->resp_seen += got;
    st->sseq = seq + got;
    if (got != plen)
        st->held_len = 0;
    return V_CONSUMED;
}

/* Write the handover record for `st` (claimed, still FAST) and turn it SLOW. */
static __always_inline void hand_over(struct scratch *s, struct flow_key *fk, struct fp_state *st,
                                      u32 reason, int to_server, u32 seq)
{
    struct fp_handover *ho = &s->ho;
    /* A head begun in earlier segments: user space parses it from its first byte, which
     * head_parts still holds unless evicted (then the connection is lost here, counted). */
    u32 head_len = 0;
    if (st->phase == PHASE_HEAD) {
        head_len = st->head.seen;
        struct head_part *p = head_parts.lookup(fk);
        if (!p || p->len != head_len || p->seq != st->cseq - head_len) {
            fcount(FC_HEAD_LOST);
            st->mode = MODE_LOST;
            return;
        }
    }
    ho->head_len = head_len;
    ho->start_ns = st->start_ns;
    ho->cseq = st->cseq - head_len;
    ho->sseq = st->sseq;
    ho->sseq_known = st->sseq_known;
    if (!to_server && !st->sseq_known) {
        ho->sseq = seq;  /* the first server byte user space will see */
        ho->sseq_known = 1;
    }
    ho->resp_len = st->resp_len;
    ho->resp_seen = st->resp_seen;
    ho->status = st->status;
    ho->phase = st->phase == PHASE_HEAD ? PHASE_IDLE : st->phase;  /* nothing open yet */
    ho->method = st->method;
    ho->path_len = st->path_len;
    ho->reason = reason;
    ho->http_seen = 1;  /* a FAST flow: the kernel took a request head on it */
    __builtin_memcpy(ho->path, st->path, PATH_LEN);
    ho->held_ns = st->held_ns;
    ho->held_seq = st->held_seq;
    ho->held_len = st->held_len;
    ho->req_len = st->req_len;
    ho->req_left = st->req_left;
    if (handover.update(fk, ho) != 0) {
        /* User space would get the connection's next segments without knowing what the kernel
         * had open, and could pair a response with the wrong request. Rather, the connection
         * stays here and its segments are dropped until it closes: its exchanges are lost,
         * counted on handover_map_full (per connection), never mis-counted. */
        fcount(FC_HANDOVER_MAP_FULL);
        st->mode = MODE_LOST;
        return;
    }
    hcount(reason);
    st->mode = MODE_SLOW;
}

/* A record for a connection that is SLOW from its first segment, when the SYN-ACK gave the
 * server's first sequence number: user space then anchors the server side there, not at
 * whichever response segment it sees first. Nothing is open: phase 0. */
static __always_inline void anchor_record(struct scratch *s, struct flow_key *fk, u32 cseq, u32 sseq,
                                          u32 reason)
{
    struct fp_handover *ho = &s->ho;
    __builtin_memset(ho, 0, sizeof(*ho));
    ho->cseq = cseq;  /* this segment, which user space parses */
    ho->sseq = sseq;
    ho->sseq_known = 1;
    ho->reason = reason;
    if (handover.update(fk, ho) != 0)
        fcount(FC_HANDOVER_MAP_FULL);
}

static __always_inline void slow_close(struct flow_key *fk, struct fp_state *st, int to_server, u8 fin, u8 rst)
{
    if (rst) {
        if (flow_state.delete(fk) == 0)
            fcount(FC_FLOWS_DELETED);
    } else if (fin) {
        st->fins |= to_server ? 1 : 2;
        if (st->fins == 3 && flow_state.delete(fk) == 0)
            fcount(FC_FLOWS_DELETED);
    }
}

/* Returns 1 to pass the segment up (then the usual keep/truncate rules apply), 0 when taken here. */
static __always_inline int fast_path(struct __sk_buff *skb, struct scratch *s, struct flow_key *key,
                                     int to_server, u32 seq, u32 plen, u32 off, u8 fin, u8 rst, u8 syn)
{
    struct flow_key fk = {};
    if (to_server) {
        __builtin_memcpy(&fk, key, sizeof(fk));
    } else {
        __builtin_memcpy(fk.saddr, key->daddr, 16);
        __builtin_memcpy(fk.daddr, key->saddr, 16);
        fk.sport = key->dport;
        fk.dport = key->sport;
    }
    struct fp_state *st = flow_state.lookup(&fk);
    if (st) {
        if (st->mode != MODE_FAST) {
            slow_close(&fk, st, to_server, fin, rst);
            return st->mode != MODE_LOST;
        }
        int claimed = 0;
        /* Test and test-and-set: wait on plain reads, so the line is not bounced.
         * Several reads per try make the wait longer without more branches: the
         * verifier follows at most 8192 jumps on one path and walks every try. */
        volatile u64 *lockp = &st->lock;
        for (int i = 0; i < CLAIM_TRIES; i++) {
            if (*lockp == 0 && __sync_val_compare_and_swap(&st->lock, 0, 1) == 0) {
                claimed = 1;
                break;
            }
            u64 held = 0;  /* a pause before the next try: 32 reads, no branches */
#pragma unroll
            for (int r = 0; r < 32; r++)
                held |= *lockp;
            (void)held;
        }
        if (!claimed) {
            fcount(FC_BUSY);
            return 1;
        }
        if (st->mode != MODE_FAST) {  /* turned SLOW while we waited */
            __sync_fetch_and_add(&st->lock, -1);
            slow_close(&fk, st, to_server, fin, rst);
            return st->mode != MODE_LOST;
        }
    }

    u64 now = bpf_ktime_get_ns();

    if (!st) {
        /* Only a client's data starts state; anything else of an unknown flow is user space's. */
        if (!to_server || !plen || fin || rst || syn)
            return 1;
        struct fp_state *ns = &s->st;
        ns->lock = 0;
        ns->cseq = seq + plen;
        u32 *first = syn_seq.lookup(&fk);
        u32 anchor = first ? *first : 0;
        u8 anchored = first != 0;
        if (anchored)
            syn_seq.delete(&fk);
        ns->sseq = anchor;
        ns->resp_len = 0;
        ns->resp_seen = 0;
        ns->status = 0;
        ns->sseq_known = anchored;
        ns->fins = 0;
        ns->held_ns = 0;
        ns->held_seq = 0;
        ns->held_len = 0;
        int simple = s->kind == KIND_REQUEST;
        /* A head going on in the next segment: its part kept, the scan state (in ns, from
         * classify_end) waits for that segment. */
        int partial = s->kind == KIND_PARTIAL && keep_head_part(skb, s, seq, 0) == 0;
        if (!simple) {
            ns->req_len = 0;
            ns->req_left = 0;
        }
        if (simple || partial) {
            ns->mode = MODE_FAST;
            ns->phase = simple ? PHASE_REQUEST : PHASE_HEAD;
            ns->start_ns = now;
        } else {
            ns->mode = MODE_SLOW;
            ns->phase = PHASE_IDLE;
            ns->start_ns = 0;
        }
        if (flow_state.insert(&fk, ns) != 0) {
            fcount(FC_BUSY);  /* another CPU created it this instant */
            return 1;
        }
        fcount(FC_FLOWS_CREATED);
        if (partial)
            return 0;
        if (!simple) {
            u32 reason = s->reject < HO_COUNT ? s->reject : HO_NEW_FLOW;
            if (ns->sseq_known)
                anchor_record(s, &fk, seq, ns->sseq, reason);
            hcount(reason);
            return 1;
        }
        fcount(FC_REQUESTS);
        return 0;
    }

    u32 v = fast_step(skb, s, st, to_server, seq, plen, off, fin, rst, syn, now);
    if (v == V_COMPLETE) {
        /* A held range that ends the body carries the response's last byte: its time is the
         * exchange's end, as user space times a reordered response. */
        u64 end = s->merged ? st->held_ns : now;
        if (aggregate(s, st, &fk, end, s->body) == 0) {
            st->phase = PHASE_IDLE;
            st->sseq = seq + plen + s->merged;
            st->sseq_known = 1;
            st->held_len = 0;
            fcount(FC_EXCHANGES);
            v = V_CONSUMED;
            if (fin) {  /* the response's last segment closed the connection's server side */
                st->fins |= 2;
                if (st->fins == 3)
                    v = V_DELETE;
            }
        } else {
            v = V_HANDOVER + HO_AGG_FULL;
        }
    }
    if (v >= V_HANDOVER)
        hand_over(s, &fk, st, v - V_HANDOVER, to_server, seq);
    int up = v >= V_HANDOVER && st->mode != MODE_LOST;
    __sync_fetch_and_add(&st->lock, -1);
    if (v == V_DELETE || (v >= V_HANDOVER && rst)) {
        if (flow_state.delete(&fk) == 0)
            fcount(FC_FLOWS_DELETED);
    } else if (v >= V_HANDOVER && fin) {
        /* Handed over by a FIN: note it, as for any SLOW flow, or the state outlives the
         * connection (the other side's FIN would find only one of the two bits). */
        slow_close(&fk, st, to_server, fin, 0);
    }
    return up;
}

/* What to keep of a packet user space gets (every counted outcome but the fast path's). */
static __always_inline int verdict(struct __sk_buff *skb, struct scratch *sc)
{
    volatile struct scratch *vs = sc;
    u32 payload_len = vs->plen;
    u32 headers_end = vs->off;
    u32 l3_end = vs->l3_end;
    if (payload_len == 0) {
        count(CNT_KEPT);
        return headers_end;
    }

    struct skip_range *skip = body_skip.lookup(&sc->key);
    if (skip) {
        u32 seq = vs->seq;
        u32 last = seq + payload_len; /* exclusive end, mod 2^32 */
        if ((s32)(seq - skip->start) >= 0 && (s32)(last - skip->end) <= 0) {
            count(CNT_KEPT);
            count(CNT_TRUNCATED_BODY_SKIP);
            return headers_end;
        }
    }

    count(CNT_KEPT);
    u32 snaplen = cfg(CFG_SNAPLEN, 65535);
    return l3_end < snaplen ? l3_end : snaplen;
}

/* Node-wide capture: 1 when this copy is on the interface the connection is locked to.
 * The key is built in node_scratch, not on the stack: stack bytes written only when node-wide
 * capture is on would split the verifier's states, and the fast path after this is explored
 * once per state (twice: over the verifier's 1M-instruction budget). */
static __always_inline int first_interface(struct __sk_buff *skb, struct flow_key *kp, int to_server)
{
    u32 zero = 0;
    struct node_scratch *ns = node_scratch.lookup(&zero);
    if (!ns)
        return 1;
    if (to_server) {
        __builtin_memcpy(&ns->conn, kp, sizeof(ns->conn));
    } else {
        __builtin_memcpy(ns->conn.saddr, kp->daddr, 16);
        __builtin_memcpy(ns->conn.daddr, kp->saddr, 16);
        ns->conn.sport = kp->dport;
        ns->conn.dport = kp->sport;
    }
    ns->ifindex = skb->ifindex;
    u32 *locked = flow_iface.lookup(&ns->conn);
    if (locked)
        return *locked == ns->ifindex;
    flow_iface.update(&ns->conn, &ns->ifindex);
    return 1;
}

/* A data segment of a TLS connection: its direction's wire times (struct tls_wire). The
 * server's: its time and the sequence number after it, on every segment. The client's: only
 * when it opens a turn, i.e. when its ACK moved since the client's last data segment (it got
 * server data in between: a response), with the record it starts with. Each entry is one
 * lookup this program already made; the cost is the writes, and for a turn one 5-byte load. */
static __always_inline void tls_wire_seen(struct __sk_buff *skb, struct tls_wire *wire, int to_server, u32 seq,
                                          u32 ack, u32 payload_off, u32 payload_len)
{
    volatile struct tls_wire *w = wire;
    if (!to_server) {
        w->ns = 0;
        w->seq = seq + payload_len;
        w->ns = bpf_ktime_get_ns();
        return;
    }
    if (w->ns && w->ack == ack)
        return;  /* the same turn */
    u8 head[TLS_RECORD_HEADER];
    u32 record = 0;
    if (payload_len >= TLS_RECORD_HEADER && bpf_skb_load_bytes(skb, payload_off, head, TLS_RECORD_HEADER) == 0 &&
        head[0] == TLS_APPLICATION_DATA && head[1] == 3)
        record = ((u32)head[3] << 8) | head[4];
    w->ns = 0;
    w->seq = seq;
    w->record = record;
    w->ack = ack;
    w->ns = bpf_ktime_get_ns();
}

/* Returns 0 to drop, else the number of bytes to keep. Every path counts once. */
int http_filter(struct __sk_buff *skb)
{
    count(CNT_SEEN);

    if (cfg(CFG_IFACE_SET, 0)) {
        u32 ifindex = skb->ifindex;
        if (!capture_ifaces.lookup(&ifindex)) {
            count(CNT_DROPPED_INTERFACE);
            return 0;
        }
    }

    if (skb->pkt_type == PACKET_OUTGOING &&
        (cfg(CFG_LOOPBACK, 0) || (skb->ifindex == LOOPBACK_IFINDEX && cfg(CFG_NODE, 0)))) {
        count(CNT_DROPPED_LOOPBACK_DUP);
        return 0;
    }

    u32 len = skb->len;
    u32 off = cfg(CFG_LINK_HEADER_LEN, ETH_HLEN);
    u16 proto = 0;
    u8 b[2];

    /* The common frame, IPv4 without options then TCP, in one load instead of three (each
     * bpf_skb_load_bytes is a call; ~40 ns a packet). `pad` aligns the IP and TCP headers on
     * the stack, as the verifier requires. Anything else, or a frame too short for the load,
     * takes the general way below. */
    struct {
        u8 pad[2];
        u8 link[ETH_HLEN];
        struct iphdr ip;
        struct tcphdr tcp;
    } h;
    int whole;
    if (off == ETH_HLEN)
        whole = bpf_skb_load_bytes(skb, 0, h.link, ETH_HLEN + sizeof(h.ip) + sizeof(h.tcp)) == 0 &&
                h.link[12] == (ETH_P_IP >> 8) && h.link[13] == (ETH_P_IP & 0xff);
    else
        whole = bpf_skb_load_bytes(skb, off, &h.ip, sizeof(h.ip) + sizeof(h.tcp)) == 0 && h.ip.version == 4;
    whole = whole && h.ip.ihl == 5;

    if (whole) {
        proto = ETH_P_IP;
    } else if (off == ETH_HLEN) {
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

    /* The key lives in the per-CPU scratch, not on the stack: the verifier tracks
     * stack bytes, so IPv4 (constant ::ffff: prefix) and IPv6 would reach the
     * fast path as two states, and it would walk the head scan twice. */
    u32 zero = 0;
    struct scratch *sc = scratch.lookup(&zero);
    if (!sc)
        goto malformed;
    struct flow_key *kp = &sc->key;
    __builtin_memset(kp, 0, sizeof(*kp));
    u32 l3_end;     /* end of the IP packet in the frame */
    u32 l4;         /* offset of the TCP header */

    if (proto == ETH_P_IP) {
        struct iphdr ip;
        if (whole)
            __builtin_memcpy(&ip, &h.ip, sizeof(ip));
        else if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
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
        kp->saddr[10] = 0xff;
        kp->saddr[11] = 0xff;
        kp->daddr[10] = 0xff;
        kp->daddr[11] = 0xff;
        __builtin_memcpy(&kp->saddr[12], &ip.saddr, 4);
        __builtin_memcpy(&kp->daddr[12], &ip.daddr, 4);
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
        __builtin_memcpy(kp->saddr, &ip6.saddr, 16);
        __builtin_memcpy(kp->daddr, &ip6.daddr, 16);
    } else {
        count(CNT_DROPPED_NOT_TCP);
        return 0;
    }

    struct tcphdr tcp;
    if (whole)
        __builtin_memcpy(&tcp, &h.tcp, sizeof(tcp));
    else if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
        goto malformed;

    u16 sport = ntohs(tcp.source);
    u16 dport = ntohs(tcp.dest);
    /* The destination port wins when both are watched, as in user space's Tracker. */
    u32 dport_idx = dport, sport_idx = sport;
    u8 *watched = watched_ports.lookup(&dport_idx);
    int to_server = watched && *watched;
    watched = to_server ? NULL : watched_ports.lookup(&sport_idx);
    if (!to_server && !(watched && *watched)) {
        count(CNT_DROPPED_PORT);
        return 0;
    }

    u32 headers_end = l4 + tcp.doff * 4;
    if (tcp.doff < 5 || headers_end > l3_end)
        goto malformed;
    u32 payload_len = l3_end - headers_end;

    if (payload_len == 0 && !tcp.fin && !tcp.rst) {
        if (tcp.syn && tcp.ack && !to_server && cfg(CFG_FAST_PATH, 0)) {
            struct flow_key ck = {};
            __builtin_memcpy(ck.saddr, kp->daddr, 16);
            __builtin_memcpy(ck.daddr, kp->saddr, 16);
            ck.sport = dport;
            ck.dport = sport;
            u32 first = ntohl(tcp.seq) + 1;  /* the SYN takes one sequence number */
            syn_seq.update(&ck, &first);
        }
        count(CNT_DROPPED_NO_PAYLOAD);
        return 0;
    }

    kp->sport = sport;
    kp->dport = dport;
    volatile struct scratch *vs = sc;
    vs->to_server = to_server;
    vs->seq = ntohl(tcp.seq);
    vs->plen = payload_len;
    vs->off = headers_end;
    vs->l3_end = l3_end;
    vs->fin = tcp.fin;
    vs->rst = tcp.rst;
    vs->syn = tcp.syn;

    if (cfg(CFG_NODE, 0) && !first_interface(skb, kp, to_server)) {
        count(CNT_DROPPED_DUPLICATE);
        return 0;
    }
    struct tls_wire *wire = payload_len && cfg(CFG_TLS_FLOWS, 0) ? tls_flows.lookup(kp) : 0;
    if (wire) {
        if (tcp.fin || tcp.rst) {
            count(CNT_KEPT);  /* the end of the connection, without its ciphertext */
            return headers_end;
        }
        tls_wire_seen(skb, wire, to_server, ntohl(tcp.seq), ntohl(tcp.ack_seq), headers_end, payload_len);
        count(CNT_DROPPED_TLS);
        return 0;
    }

    if (cfg(CFG_FAST_PATH, 0)) {
        /* The fast path runs in http_finish, after the head scan in http_scan when the
         * payload may start a head: each program has the verifier's whole budget. */
        vs->kind = KIND_NONE;
        vs->reject = HO_COUNT;
        vs->resumed = 0;
        vs->prefix = 0;
        int scan = payload_len && !tcp.rst && !tcp.syn &&  /* data with FIN too: a last response */
                   classify_start(skb, sc, headers_end, payload_len, to_server);
        vs->scanned = scan;
        /* The scan's first run here: most heads end in it, and a tail call is ~50 ns
         * (retpolines). Its state goes through memory, so the verifier walks it once. */
        if (scan)
            scan_progs.call(skb, PROG_SCAN);
        else
            scan_progs.call(skb, PROG_FINISH);
        /* Only reached when the slot is empty (bpf.py fills both before turning the fast
         * path on): the flow's state is not looked at, so say so. */
        fcount(FC_TAIL_CALL_FAILED);
    }
    return verdict(skb, sc);

malformed:
    count(CNT_DROPPED_MALFORMED);
    return 0;
}

/* The head scan, SCAN_CHUNK steps a run; then itself again, or http_finish. */
int http_scan(struct __sk_buff *skb)
{
    u32 zero = 0;
    struct scratch *s = scratch.lookup(&zero);
    if (!s)
        return 0;
    volatile struct scratch *vs = s;
    scan_chunk(s);
    if (vs->state < S_DONE && vs->pos < vs->n)
        scan_progs.call(skb, PROG_SCAN);
    else
        scan_progs.call(skb, PROG_FINISH);
    fcount(FC_TAIL_CALL_FAILED);
    return verdict(skb, s);
}

/* The fast path for the packet http_filter parsed (and http_scan classified), then the verdict. */
int http_finish(struct __sk_buff *skb)
{
    u32 zero = 0;
    struct scratch *s = scratch.lookup(&zero);
    if (!s)
        return 0;
    volatile struct scratch *vs = s;
    if (vs->scanned)
        classify_end(s);
    if (!fast_path(skb, s, &s->key, vs->to_server, vs->seq, vs->plen, vs->off, vs->fin, vs->rst, vs->syn)) {
        count(CNT_CONSUMED_FAST_PATH);
        return 0;
    }
    return verdict(skb, s);
}

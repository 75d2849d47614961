/*
 * tls_probes.c  The plaintext of TLS connections, read at OpenSSL's SSL_read
 *               and SSL_write, for the HTTP/1.x and HTTP/2 parsers in user space.
 *
 * Loaded by exporter/capture/tls.py through the BPF loader helper process
 * (exporter/capture/bpf_loader.py, the only importer of BCC):
 *
 *     uprobe     SSL_read, SSL_read_ex, SSL_write, SSL_write_ex  (tls_*_entry_<library>)
 *     uretprobe  the same four symbols                            (tls_return)
 *     uprobe     SSL_free                                         (tls_free)
 *
 * on every libssl the exporter found (libssl.so.3, libssl.so.1.1, --libssl). No
 * syscall tracepoint: nothing runs outside an SSL call. Needs uprobes
 * (CONFIG_UPROBES), the BPF ring buffer (Linux >= 5.8), task storage in tracing
 * programs (Linux >= 5.12) and the running kernel's BTF (/sys/kernel/btf/vmlinux)
 * for the offsets below. The counter indices, the
 * sizes, the watched ports and all struct offsets come in as -D defines from
 * tls.py, the one place they are named; this file does not build on its own.
 *
 * The entry probes only keep the call's arguments (and their library's offsets) in the
 * thread's task storage; the rest happens at the return of a call that returned data, so
 * the calls that return none (WANT_READ: one of nginx's three per keep-alive request)
 * cost a store and a get.
 *
 * Which socket an SSL* talks to, read at the return of each call with data, in two steps:
 * - its fd: `((BIO *)ssl->rbio)->num`. `struct ssl_st` and `struct bio_st` are
 *   opaque and change between OpenSSL builds, so their offsets are measured per
 *   library by exporter/capture/openssl_layout.py (through the library's own
 *   SSL_new/SSL_set_fd/SSL_get_rbio) and each library gets its own entry
 *   programs (LIBRARY_PROBES(i), TLS_RBIO_OFFSET_i, TLS_BIO_NUM_OFFSET_i). A memory
 *   BIO has num -1: such an SSL* has no socket (counted `no_fd`).
 * - its addresses, once per connection (a new SSL*, or its fd changed): current
 *   task -> files -> fdt -> fd[fd] -> file, an S_IFSOCK inode, file->private_data
 *   (struct socket) of type SOCK_STREAM, its sk of family AF_INET/AF_INET6: local
 *   port skc_num, peer port skc_dport, addresses skc_rcv_saddr/skc_daddr or the v6
 *   pair. The kernel headers BCC compiles with need not match the running kernel,
 *   so the offsets come from its BTF (exporter/capture/kernel_layout.py) and the
 *   walk reads plain addresses with bpf_probe_read_kernel. A failed walk (not a TCP
 *   socket, or closed under us) is counted `unresolved`, and the SSL* ignored.
 *
 * The verdict is the kernel's: a connection is watched when its local port is a
 * watched port (TLS_WATCHED_PORT), i.e. it is the server's accepted socket. A
 * client's local port is ephemeral, so curl, wrk or a proxy's upstream on the same
 * host are dropped from their first call with data, with no event. Every SSL* judged has a
 * `tls_state` entry keyed by (tgid, SSL*) with the fd it was judged for: an
 * unwatched one costs that lookup per call with data (`ignored_calls`), plus the
 * traps. A watched
 * one sends an OPEN event with both ends before its first data; user space builds
 * the flow from it, with no /proc lookup. Connections opened before the probes
 * were attached are judged at their next call like new ones.
 *
 * The end: SSL_free(ssl) sends CLOSE for a watched SSL* and drops its state and
 * skips. SSL* addresses are reused by malloc, fd numbers by the kernel: the state
 * entry goes at SSL_free, and a state whose fd differs from the BIO's now is a new
 * connection (the old one gets its CLOSE). That is checked at reads only (see judge()),
 * and the BIO's fd is read again only when ssl->rbio is no longer the BIO it was read
 * from (SSL_set_fd makes a new one). A process that exits without SSL_free
 * leaves LRU entries that the fd check and the LRU age out; user space ends such
 * connections itself (tls.py's reap).
 *
 * The ring: the reader is woken once TLS_WAKE_BYTES are unread, not per event
 * (it also reads every TLS_DRAIN_EVERY_S), and past TLS_TRIM_BYTES unread a call copies
 * its first TLS_PREFIX bytes only; see tls.py for the sizes and why. An event the ring
 * refuses (at every try while it has room, or full) goes to a second, small ring
 * (`tls_fallback`), and the events after it follow it there until user space has taken it, so
 * that user space reads every event in the order it was written (see output()).
 *
 * Events (`struct tls_event`, 48-byte header then data) go through the
 * `tls_events` ring buffer. One SSL call's bytes are sent in chunks of at most
 * TLS_CHUNK bytes, up to TLS_MAX_CHUNKS of them; each chunk carries its offset
 * in its direction's byte stream, kept per SSL* in `tls_state`: the sequence
 * numbers of the segments user space builds. Bytes past the chunk budget are sent
 * by length only (counted `truncated`), and bytes the ring buffer could not take
 * (counted `lost`) become a gap of known length. The bytes read from user memory
 * never go past the length the call returned. An OPEN the ring could not take is
 * sent again at the next call; the bytes of calls in between are a gap.
 *
 * Bodies: user space, which frames each message, names the stretches of a stream it will
 * only count (`tls_skips`, the wire path's body_skip), tagged with the connection (its
 * OPEN's time) so that a stale entry never applies to a later SSL* at the same address;
 * calls inside one send their length in a header-only event instead of their bytes. A lost
 * event marks its direction, and the next event sent says so (TLS_FLAG_AFTER_LOSS): the gap
 * will not fill, and user space counts it as bytes of known length rather than waiting.
 *
 * Timing: an event's ts_ns is the call's return (bpf_ktime_get_ns), or the wire's time when it
 * is known exactly. The socket filter (http_filter.c) keeps, in its tls_flows entry of each
 * direction of a TLS connection (struct tls_wire, tls_wire.h), the time of the first segment of
 * the client's current turn with its seq and the TLS record it starts, and the time and end seq
 * of the server's last segment; user space puts that map in tls_wire_maps (slot 0) when a
 * filter is loaded. A watched connection's two entries are made here at its first read, if user
 * space has not made them yet (mark_wire). Then:
 * - the first read after writes (or the connection's first), a request's start, takes the turn's
 *   time when the socket's copied_seq after the call is the end of the record the turn starts
 *   (wire_start): the call read that record, so its plaintext's first byte came with that segment;
 * - every write, maybe a response's last, takes the server's last segment's time when that
 *   segment ends at the socket's write_seq (wire_end): all the call's bytes were on the wire.
 * Otherwise the probe's time stays. How each client turn's start and each server turn's end
 * (its last write, counted when the next turn starts or the connection ends) were timed is
 * counted from TC_START_WIRE and TC_END_WIRE: from the wire, no_match (the segments did not match
 * the call: the client's TLS 1.3 Finished opened the turn, a pipelined request, a response still
 * held by Nagle or the congestion window), no_wire (the filter has no times for the connection:
 * not on a captured interface, no filter, or nothing seen since the entry was made). Both clocks
 * are CLOCK_MONOTONIC; the filter's is read in the packet's receive path, before TCP has it.
 *
 * Return values: SSL_read/SSL_write return an int (read as 32-bit signed, so
 * -1 stays -1); <= 0 is an error or a retry and carries no data. The _ex
 * variants return 1 on success with the length behind their fourth argument.
 *
 * Known limits: a thread blocked inside SSL_read when the probes are attached
 * is never seen returning from it (its bytes are missed; the parser resyncs at
 * the next message). Statically linked TLS libraries have no SSL_read symbol
 * here to probe. An rbio that is a filter BIO over the socket (not OpenSSL's
 * socket BIO itself) has no fd in num: its SSL* is unresolved.
 */
#include <uapi/linux/ptrace.h>
/* struct flow_key and struct tls_wire: the socket filter's wire times (see "Timing" above). */
#include "tls_wire.h"

#define KIND_READ 0
#define KIND_WRITE 1
#define KIND_CLOSE 2
#define KIND_OPEN 3

#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000
#define SOCK_STREAM_ 1
#define AF_INET_ 2
#define AF_INET6_ 10

/* An SSL_* call in progress on one thread: its arguments, and its library's offsets. The return
 * probe judges the connection, once the call returned data. */
struct tls_call {
    u64 ssl;
    u64 buf;
    u64 out_len;  /* size_t * of the _ex variants, 0 for SSL_read/SSL_write */
    u32 rbio_offset;
    u32 num_offset;
    u8 kind;
    u8 pad[7];
};

struct tls_state_key {
    u64 ssl;
    u32 tgid;
    u32 pad;
};

/* Per SSL* (of one process): the fd its BIO had when it was judged, the verdict, and how far
 * each direction's byte stream has gone. */
struct tls_state {
    u64 stream[2];  /* bytes read (KIND_READ) and written (KIND_WRITE) so far */
    u64 conn;       /* the OPEN event's time: names this connection in tls_skips */
    u64 rbio;       /* the read BIO `fd` was read from: while ssl->rbio is still it, so is the fd */
    s32 fd;
    u8 watched;
    u8 announced;   /* its OPEN event is in the ring (0: the ring was full, send it again) */
    u8 lost[2];     /* per direction: bytes since the last event sent were lost */
    u64 sk;         /* the socket's struct sock (a tcp_sock), from the walk */
    struct flow_key client;  /* client -> server, as the socket filter keys tls_flows */
    u8 last;        /* the kind of the last call with data, plus 1 (0: none yet) */
    u8 end_timing;  /* WIRE_* of the last write: counted when the server's turn ends */
    u8 pad[2];
};

/* Per connection and direction, a stretch of the byte stream (32-bit offsets, wrapping) that
 * only needs counting (a body of known length): calls inside it send their length only. */
struct tls_skip_key {
    u64 ssl;
    u32 tgid;
    u32 dir;
};

struct tls_skip {
    u32 start;
    u32 end;
    u64 conn;  /* tls_state.conn it was set for: a stale entry never applies to a later connection */
};

struct tls_event {
    u64 ts_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC; an OPEN's is also its connection's name */
    u64 ssl;
    u64 stream_off;  /* offset of data[0] in this direction's byte stream */
    u32 tgid;
    s32 fd;
    u32 len;         /* bytes of data[] that follow */
    u32 skipped;     /* with len 0: bytes of the call past the chunk budget, not copied */
    u8 kind;
    u8 flags;        /* TLS_FLAG_AFTER_LOSS: bytes before stream_off were lost */
    u8 pad[6];
    u8 data[TLS_CHUNK * 2];  /* twice: the verifier bounds a length by a mask, so by 2 * TLS_CHUNK - 1 */
};

/* The data of a KIND_OPEN event: the socket's two ends, as the kernel holds them. */
struct tls_open {
    u16 family;      /* AF_INET or AF_INET6 */
    u16 local_port;  /* host order (skc_num) */
    u16 peer_port;   /* network order (skc_dport), as the kernel keeps it */
    u16 pad;
    u8 local[16];    /* IPv4: the first 4 bytes */
    u8 peer[16];
};

#define TLS_EVENT_HEADER 48
#define TLS_FLAG_AFTER_LOSS 1

/* How an exchange's end was timed (see "Timing" above): from the wire, from the probe because
 * the wire's segments did not match this call exactly, or from the probe because the filter
 * has no times for the connection. In this order from TC_START_WIRE and from TC_END_WIRE. */
#define WIRE_EXACT 1
#define WIRE_NO_MATCH 2
#define WIRE_NO_WIRE 3

/* The call in progress, in the calling thread's own storage (freed with the thread): a get at
 * entry and one at return, where a hash keyed by thread id cost an LRU update at entry and a
 * delete at return (~0.27 us more per call, measured). `ssl` 0: no call in progress. */
BPF_TASK_STORAGE(tls_calls, struct tls_call);
/* Every SSL* that made a call with data, watched or not: an unwatched one costs this lookup per
 * such call. A process that exits without SSL_free leaves its entries to the LRU; the fd check
 * keeps a reused (tgid, SSL*) from inheriting them. */
BPF_TABLE("lru_hash", struct tls_state_key, struct tls_state, tls_state, 65536);
BPF_TABLE("lru_hash", struct tls_skip_key, struct tls_skip, tls_skips, 65536);
BPF_RINGBUF_OUTPUT(tls_events, TLS_RING_PAGES);
/* Events tls_events refused, and those that follow them until user space took them (output()):
 * a ring of its own, so a lock of its own. */
BPF_RINGBUF_OUTPUT(tls_fallback, TLS_FALLBACK_PAGES);
BPF_PERCPU_ARRAY(tls_counters, u64, TC_COUNT);
/* [RING_PRODUCED] bytes the probes put in tls_events, [RING_CONSUMED] user space's consumer
 * position, written after each read: the difference is the unread backlog. [RING_DRAINED] the
 * ring's own consumer position, written by the thread that empties it (0 until it has): what is
 * really in the ring, for telling a full ring from a reservation refused with room (lost()).
 * Mmapable: user space writes its positions with a store, no bpf(2) call (which --user, dropping
 * CAP_BPF, would lose). */
#define RING_PRODUCED 0
#define RING_CONSUMED 1
#define RING_DRAINED 2
/* The same two for tls_fallback: bytes the probes put in it, and its consumer position as the
 * draining thread reports it once what it took is queued behind the main ring's (ringbuf.py). */
#define FALLBACK_PRODUCED 3
#define FALLBACK_DRAINED 4
BPF_F_TABLE("array", u32, u64, tls_ring_pos, 5, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(tls_scratch, struct tls_event, 1);
/* The socket filter's tls_flows (http_filter.c), put in slot 0 by user space when a filter is
 * loaded (TlsProbes.anchor_to); empty without one (--no-tls has no probes at all). The
 * template only gives the kernel the inner map's shape: its one entry is never used. */
BPF_TABLE("lru_hash", struct flow_key, struct tls_wire, tls_wire_template, 1);
BPF_ARRAY_OF_MAPS(tls_wire_maps, "tls_wire_template", 1);

static __always_inline void count(u32 slot)
{
    u64 *value = tls_counters.lookup(&slot);
    if (value)
        (*value)++;
}

/* Bytes written to the ring and not yet read by user space: what bpf_ringbuf_query(AVAIL_DATA)
 * says, which this BCC cannot call (it has no ringbuf_query method before 0.28). */
static __always_inline u64 ring_pending(void)
{
    u32 slot = RING_PRODUCED;
    u64 *produced = tls_ring_pos.lookup(&slot);
    slot = RING_CONSUMED;
    u64 *consumed = tls_ring_pos.lookup(&slot);
    if (!produced || !consumed)
        return 0;
    s64 pending = *produced - *consumed;  /* < 0 while a record is reserved and not yet added */
    return pending > 0 ? pending : 0;
}

/* A ring's producer position (RING_PRODUCED or FALLBACK_PRODUCED) moves by the record, its 8-byte
 * header, and padding to 8. */
static __always_inline void ring_produced(u32 slot, u64 size)
{
    u64 *produced = tls_ring_pos.lookup(&slot);
    if (produced)
        __sync_fetch_and_add(produced, (size + 8 + 7) & ~7ULL);
}

/* Bytes of tls_fallback the draining thread has not reported taking (queued behind what it took
 * from tls_events since): while there are any, every event goes there too (output()). */
static __always_inline s64 fallback_backlog(void)
{
    u32 slot = FALLBACK_PRODUCED;
    u64 *produced = tls_ring_pos.lookup(&slot);
    slot = FALLBACK_DRAINED;
    u64 *drained = tls_ring_pos.lookup(&slot);
    return produced && drained ? (s64)(*produced - *drained) : 0;
}

/* Whether the ring has room for a record, judged from its own consumer position (which the
 * draining thread reports), with two largest records of margin for the other CPU's producers;
 * never before the draining thread has reported one. */
static __always_inline int ring_has_room(void)
{
    u32 slot = RING_PRODUCED;
    u64 *produced = tls_ring_pos.lookup(&slot);
    slot = RING_DRAINED;
    u64 *drained = tls_ring_pos.lookup(&slot);
    if (!produced || !drained || !*drained)
        return 0;
    s64 backlog = *produced - *drained;
    return backlog + 2 * (TLS_CHUNK * 2 + 8) <= (s64)TLS_RING_BYTES;
}

/* An event neither ring took. Mostly a full ring (the reader starved of CPU), or a full fallback
 * ring behind an earlier event (`following`); those the ring refused while it had room are counted
 * apart (see output()), so a loss says which it was. */
static __always_inline void lost(int following)
{
    count(TC_LOST);
    if (!following && ring_has_room())
        count(TC_LOST_WITH_ROOM);
}

#ifdef TLS_TEST_REFUSE_EVERY
/* Test builds only (TlsProbes' test_cflags): one event in TLS_TEST_REFUSE_EVERY (by this CPU's
 * event count) gets a flag bpf_ringbuf_output refuses at every try (-EINVAL), with room, as when the
 * ring's lock gives up; counted. A value, not a branch: the verifier's budget for tls_return is
 * nearly spent. */
static __always_inline u64 refusal_for_test(void)
{
    u32 slot = TC_EVENTS;
    u64 *events = tls_counters.lookup(&slot);
    slot = TC_REFUSED_FOR_TEST;
    u64 *refused = tls_counters.lookup(&slot);
    if (!events || !refused)
        return 0;
    u64 hit = *events % TLS_TEST_REFUSE_EVERY == TLS_TEST_REFUSE_EVERY - 1;
    *refused += hit;
    return hit << 62;
}
#endif

/* bpf_ringbuf_output on tls_events, tried again (up to RING_TRIES in all) while it is refused
 * with room in the ring. Since 6.15 the ring's lock is an rqspinlock, which fails a reservation
 * instead of waiting when it reports a deadlock or times out, whatever the room. Measured here
 * with two watched servers writing at once (bench/tls_ring_contention.py): about 1 reservation
 * in 100,000 to 400,000 failed with room, and every first failure (36 of 36 in one run, timed
 * with bpf_ktime_get_ns around the call) returned in under 1 us: not the rqspinlock timeouts
 * (0.25 s and more) nor its deadlock checks, which this kernel's rqspinlock.c (6.18) makes only
 * after 64K spins and 1 ms of waiting; the reservation's room checks cannot fail 16 MiB short.
 * Which branch refuses was not found (this machine refuses ftrace filters, kprobes and fexit
 * programs). A second try failed again half of the time, and one event was taken at the 10th
 * try, 1.4 us after the first. Failed tries are that fast, so 16 of them bound the wait to
 * about 5 us, on this rare path only (with 32, tls_return was too large for the verifier to
 * load). A full ring is not tried again. Events taken at a later try are counted. */
#define RING_TRIES 16
static __always_inline long main_output(void *ev, u64 size, u64 wake)
{
#ifdef TLS_TEST_REFUSE_EVERY
    wake |= refusal_for_test();
#endif
    long err = tls_events.ringbuf_output(ev, size, wake);
    for (int i = 1; i < RING_TRIES && err && ring_has_room(); i++) {
        err = tls_events.ringbuf_output(ev, size, wake);
        if (!err)
            count(TC_RETRIED);
    }
    return err;
}

/* Hand one event to user space, counted: 0 when it was taken, else it is lost (counted).
 * `following`: whether tls_fallback held events not yet taken (fallback_backlog() > 0) when the
 * caller looked, set once this event went there: a caller sending several events looks once, and
 * its later events follow an earlier one that went to tls_fallback.
 *
 * An event tls_events refused with room after all its tries goes to tls_fallback, a ring with a
 * lock of its own (`fallback`): whatever refuses tls_events does not refuse another ring in the
 * same instant (7 of 7 natural refusals, bench/results/2026-12-01/tlsloss-under-load.md). Every event after it goes there too (`fallback_following`), from
 * all connections, for as long as tls_fallback holds events the draining thread has not taken:
 * the thread reads tls_events, then tls_fallback, then tls_events again up to where it was
 * reserved when tls_fallback was read, and queues them in that order before it reports
 * tls_fallback's position (ringbuf.py). So user space reads each connection's events in the
 * order they were written, with no late OPEN, CLOSE or data to put back in place: those in
 * tls_events written before one in tls_fallback are read before it (the second read of
 * tls_events), and those after it are in tls_fallback behind it or, once the thread has
 * reported it, in a later read of tls_events. A full ring (the reader behind, or not
 * yet started: the room is not known before the thread reports) goes to the fallback too: it only
 * delays the loss then, counted when the fallback is full as well (lost()). The fallback wakes
 * its reader the kernel's default way (when the reader has caught up with it), at once: its
 * events hold the rest of the traffic behind them until they are read (about 2 ms under load,
 * measured), and past TLS_FALLBACK_TRIM_BYTES of them calls copy their first TLS_PREFIX bytes
 * only (tls_return), so that a few large bodies cannot fill it. */
static __always_inline long output(void *ev, u64 size, u64 wake, int *following)
{
    long err = 0;
    if (!*following) {
        err = main_output(ev, size, wake);
        if (!err) {
            ring_produced(RING_PRODUCED, size);
            count(TC_EVENTS);
            return 0;
        }
    }
    err = tls_fallback.ringbuf_output(ev, size, 0);
    if (err) {
        lost(*following);
        return err;
    }
    ring_produced(FALLBACK_PRODUCED, size);
    count(TC_EVENTS);
    count(*following ? TC_FALLBACK_FOLLOWING : TC_FALLBACK);
    *following = 1;
    return 0;
}

/* Wake the reader only once a batch is worth it. Each wakeup is an irq_work, a self-IPI, which
 * on a virtual machine costs an exit (measured: ~5 us of run time per event with the default
 * adaptive wakeup); user space also reads the ring at least every TLS_DRAIN_EVERY_S unwoken. */
static __always_inline u64 wakeup_flag(u64 pending)
{
    return pending >= TLS_WAKE_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Hand one event to user space; a loss marks the direction so the next event says so. */
static __always_inline int send(struct tls_event *ev, struct tls_state *state, u32 dir, u64 size, u64 wake,
                                int *following)
{
    ev->flags = state->lost[dir & 1] ? TLS_FLAG_AFTER_LOSS : 0;
    size &= TLS_CHUNK * 2 - 1;
    if (output(ev, size, wake, following)) {
        state->lost[dir & 1] = 1;
        return -1;
    }
    state->lost[dir & 1] = 0;
    return 0;
}

/* A header-only event (OPEN's data is filled by the caller). */
static __always_inline struct tls_event *event(u8 kind, u64 ssl, u32 tgid, s32 fd)
{
    u32 zero = 0;
    struct tls_event *ev = tls_scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->ts_ns = bpf_ktime_get_ns();
    ev->ssl = ssl;
    ev->stream_off = 0;
    ev->tgid = tgid;
    ev->fd = fd;
    ev->len = 0;
    ev->skipped = 0;
    ev->kind = kind;
    ev->flags = 0;
    return ev;
}

static __always_inline void send_control(struct tls_event *ev, u64 size)
{
    int following = fallback_backlog() > 0;
    output(ev, size & (TLS_CHUNK * 2 - 1), wakeup_flag(ring_pending()), &following);
}

/* The SSL*'s read BIO, ssl->rbio, and its fd, ((BIO *)rbio)->num, at this library's offsets
 * (exporter/capture/openssl_layout.py). 0 and -1 when unreadable; num is -1 for a memory BIO. */
static __always_inline u64 ssl_rbio(u64 ssl, u32 rbio_offset)
{
    u64 rbio = 0;
    if (bpf_probe_read_user(&rbio, sizeof(rbio), (void *)(ssl + rbio_offset)))
        return 0;
    return rbio;
}

static __always_inline s32 bio_fd(u64 rbio, u32 num_offset)
{
    s32 num = -1;
    if (!rbio || bpf_probe_read_user(&num, sizeof(num), (void *)(rbio + num_offset)))
        return -1;
    return num;
}

#define READ_KERNEL(dst, addr) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(addr))

/* current->files->fdt->fd[fd]->private_data->sk, when fd is a SOCK_STREAM inet socket, with
 * the offsets of the running kernel's BTF (exporter/capture/kernel_layout.py): its two ends
 * into `open`. 0 when it is not one (or a read failed). */
static __always_inline int socket_of(s32 fd, struct tls_open *open, u64 *sk_out)
{
    u64 task = bpf_get_current_task();
    u64 files = 0, fdt = 0, fds = 0, file = 0, inode = 0, sock = 0, sk = 0;
    u32 max_fds = 0;
    u16 mode = 0, family = 0;
    s16 type = 0;
    if (READ_KERNEL(files, task + TASK_FILES) || !files || READ_KERNEL(fdt, files + FILES_FDT) || !fdt)
        return 0;
    if (READ_KERNEL(max_fds, fdt + FDT_MAX_FDS) || (u32)fd >= max_fds || READ_KERNEL(fds, fdt + FDT_FD))
        return 0;
    if (READ_KERNEL(file, fds + (u64)(u32)fd * 8) || !file || READ_KERNEL(inode, file + FILE_INODE) || !inode)
        return 0;
    if (READ_KERNEL(mode, inode + INODE_MODE) || (mode & S_IFMT_) != S_IFSOCK_)
        return 0;
    if (READ_KERNEL(sock, file + FILE_PRIVATE_DATA) || !sock || READ_KERNEL(type, sock + SOCKET_TYPE) ||
        type != SOCK_STREAM_ || READ_KERNEL(sk, sock + SOCKET_SK) || !sk)
        return 0;
    if (READ_KERNEL(family, sk + SK_FAMILY) || (family != AF_INET_ && family != AF_INET6_))
        return 0;
    *sk_out = sk;
    open->family = family;
    open->pad = 0;
    if (READ_KERNEL(open->local_port, sk + SK_NUM) || READ_KERNEL(open->peer_port, sk + SK_DPORT))
        return 0;
    __builtin_memset(open->local, 0, sizeof(open->local));
    __builtin_memset(open->peer, 0, sizeof(open->peer));
    if (family == AF_INET_) {
        if (bpf_probe_read_kernel(open->local, 4, (void *)(sk + SK_RCV_SADDR)) ||
            bpf_probe_read_kernel(open->peer, 4, (void *)(sk + SK_DADDR)))
            return 0;
    } else if (bpf_probe_read_kernel(open->local, 16, (void *)(sk + SK_V6_RCV_SADDR)) ||
               bpf_probe_read_kernel(open->peer, 16, (void *)(sk + SK_V6_DADDR))) {
        return 0;
    }
    return 1;
}

/* The connection's key in the socket filter's tls_flows: client -> server, IPv4 as ::ffff:a.b.c.d,
 * ports in host order. */
static __always_inline void client_key(struct tls_open *open, struct flow_key *key)
{
    __builtin_memcpy(key->saddr, open->peer, 16);
    __builtin_memcpy(key->daddr, open->local, 16);
    if (open->family == AF_INET_) {
        __builtin_memset(key->saddr, 0, 10);
        key->saddr[10] = key->saddr[11] = 0xff;
        __builtin_memcpy(key->saddr + 12, open->peer, 4);
        __builtin_memset(key->daddr, 0, 10);
        key->daddr[10] = key->daddr[11] = 0xff;
        __builtin_memcpy(key->daddr + 12, open->local, 4);
    }
    key->sport = bpf_ntohs(open->peer_port);
    key->dport = open->local_port;
}

/* The other direction's key. */
static __always_inline void reverse_key(struct flow_key *key, struct flow_key *back)
{
    __builtin_memcpy(back->saddr, key->daddr, 16);
    __builtin_memcpy(back->daddr, key->saddr, 16);
    back->sport = key->dport;
    back->dport = key->sport;
}

/* A watched connection's two entries in the socket filter's tls_flows, unless it has them: from
 * now on the filter drops its ciphertext and keeps its wire times, without waiting for user
 * space to find its first bytes a TLS record (they reach it up to the capture ring's block
 * timeout later, 64 ms, while a keep-alive client may send several requests). User space's own
 * entry for it then keeps these (BPF_NOEXIST both ways). */
static __always_inline void mark_wire(struct flow_key *client)
{
    u32 zero = 0;
    void *flows = tls_wire_maps.lookup(&zero);
    if (!flows)
        return;
    struct tls_wire none = {};
    struct flow_key back;
    reverse_key(client, &back);
    bpf_map_update_elem(flows, client, &none, BPF_NOEXIST);
    bpf_map_update_elem(flows, &back, &none, BPF_NOEXIST);
}

/* The filter's wire times of one direction of a connection (tls_wire.h): the time of the segment
 * they describe, 0 when there is none or it was being written (timing: why). `seq` and `record`
 * are read between two reads of the time, so they are that segment's. */
static __always_inline u64 wire_of(struct flow_key *key, u32 *seq, u32 *record, u8 *timing)
{
    u32 zero = 0;
    void *flows = tls_wire_maps.lookup(&zero);
    volatile struct tls_wire *wire = flows ? bpf_map_lookup_elem(flows, key) : 0;
    *timing = WIRE_NO_WIRE;
    if (!wire)
        return 0;
    u64 ns = wire->ns;
    *seq = wire->seq;
    *record = wire->record;
    if (!ns)
        return 0;  /* no data segment since the filter marked the connection */
    *timing = WIRE_NO_MATCH;
    return wire->ns == ns ? ns : 0;
}

/* The first read of a client turn: the wire time of the turn's first segment when this call's
 * first plaintext came from the record that segment starts, exactly. OpenSSL reads one record per
 * call (no read-ahead), and the first read of a turn finds no plaintext left from an earlier
 * record (the server wrote in between: it had read the request), so the socket's copied_seq
 * after the call is the end of the record it read; that record began the turn when the turn's
 * first segment starts it and its length reaches there. Otherwise (the client's TLS 1.3
 * Finished opened the turn, a pipelined request, read-ahead, a turn the filter saw begin
 * elsewhere) the probe's time stays, counted. */
static __always_inline u64 wire_start(struct tls_state *state, u8 *timing)
{
    u32 seq = 0, record = 0, copied = 0;
    u64 ns = wire_of(&state->client, &seq, &record, timing);
    if (!ns)
        return 0;
    *timing = WIRE_NO_MATCH;
    if (!record || READ_KERNEL(copied, state->sk + TCP_COPIED_SEQ) || seq + TLS_RECORD_HEADER + record != copied)
        return 0;
    *timing = WIRE_EXACT;
    return ns;
}

/* A write: the wire time of the server's last segment when it ends where this call's bytes end
 * (the socket's write_seq), i.e. TCP sent all of them and the filter saw the last; otherwise
 * (held by the congestion window or Nagle, a softirq that has not run yet) the probe's time. */
static __always_inline u64 wire_end(struct tls_state *state, u8 *timing)
{
    struct flow_key back;
    reverse_key(&state->client, &back);
    u32 seq = 0, record = 0, written = 0;
    u64 ns = wire_of(&back, &seq, &record, timing);
    if (!ns)
        return 0;
    *timing = WIRE_NO_MATCH;
    if (READ_KERNEL(written, state->sk + TCP_WRITE_SEQ) || seq != written)
        return 0;
    *timing = WIRE_EXACT;
    return ns;
}

/* The server's turn ended (a read after writes, or the connection's end): how its last write,
 * a response's end, was timed. */
static __always_inline void count_end(struct tls_state *state)
{
    if (state->last == KIND_WRITE + 1 && state->end_timing)
        count(TC_END_WIRE + state->end_timing - WIRE_EXACT);
}

/* OPEN: user space builds the connection's flow from it. Sent before the connection's first
 * data; if the ring has no room, the next call tries again (walking the socket again).
 * `walked`: the scratch event's data already holds this socket's ends. */
static __always_inline void announce(struct tls_state *state, u64 ssl, u32 tgid, int walked)
{
    struct tls_event *ev = event(KIND_OPEN, ssl, tgid, state->fd);
    if (!ev)
        return;
    struct tls_open *open = (struct tls_open *)ev->data;
    u64 sk = 0;
    if (!walked && !socket_of(state->fd, open, &sk)) {
        count(TC_UNRESOLVED);  /* it was a TCP socket a moment ago: closed under us */
        return;
    }
    ev->len = sizeof(struct tls_open);
    ev->stream_off = 0;
    int following = fallback_backlog() > 0;
    if (output(ev, TLS_EVENT_HEADER + sizeof(struct tls_open), wakeup_flag(ring_pending()), &following))
        return;
    state->conn = ev->ts_ns;
    state->announced = 1;
}

/* A watched connection ends (SSL_free, or its SSL* moved to another fd): CLOSE, and its skips go. */
static __always_inline void finish(struct tls_state *state, u64 ssl, u32 tgid)
{
    struct tls_skip_key kkey = {.ssl = ssl, .tgid = tgid, .dir = KIND_READ};
    tls_skips.delete(&kkey);
    kkey.dir = KIND_WRITE;
    tls_skips.delete(&kkey);
    if (!state->watched || !state->announced)
        return;
    count_end(state);
    struct tls_event *ev = event(KIND_CLOSE, ssl, tgid, state->fd);
    if (ev)
        send_control(ev, TLS_EVENT_HEADER);
}

/* The state of a call's SSL*, judged (see the top of this file): 0 unless it is watched. */
static __always_inline struct tls_state *judge(u64 ssl, u32 tgid, u8 kind, u32 rbio_offset, u32 num_offset)
{
    struct tls_state_key skey = {.ssl = ssl, .tgid = tgid};
    struct tls_state *state = tls_state.lookup(&skey);
    /* User memory is read as little as possible: a bpf_probe_read_user costs ~250 ns at a return
     * here, ~600 ns when the line is cold, as ssl->rbio's is (measured, bench/tls_prog_cost.py).
     * So a watched SSL*'s socket is checked at its reads only: a server's connection starts with
     * the client's bytes, so an SSL* reused for another socket without SSL_free (SSL_clear and
     * SSL_set_fd) is found at its first read, and at worst a server's opening write (HTTP/2's
     * SETTINGS) goes to the old connection. An unwatched one (a client, another service) is
     * not checked again: it would take an SSL* of one of those reused, without SSL_free, for a
     * watched server's connection. */
    if (state && (kind == KIND_WRITE || !state->watched)) {
        if (!state->watched) {
            count(TC_IGNORED_CALLS);
            return 0;
        }
        if (!state->announced)
            announce(state, ssl, tgid, 0);
        return state;
    }
    /* While ssl->rbio is the BIO the fd was read from, the fd is the same: SSL_set_fd makes a new
     * BIO while the old one still lives, so a new socket always comes with a new rbio address. */
    u64 rbio = ssl_rbio(ssl, rbio_offset);
    int walked = 0;
    s32 fd = -1;
    if (state && rbio && state->rbio == rbio)
        fd = state->fd;
    else
        fd = bio_fd(rbio, num_offset);
    if (state && state->fd == fd) {
        if (state->rbio != rbio)
            state->rbio = rbio;  /* a new BIO on the same socket */
        if (!state->watched) {
            count(TC_IGNORED_CALLS);
            return 0;
        }
    } else {
        if (fd < 0) {
            count(TC_NO_FD);  /* a memory BIO (or a BIO pair): no socket to name */
            return 0;
        }
        if (state)
            finish(state, ssl, tgid);  /* the same SSL* on another socket now (SSL_clear, SSL_set_fd) */
        struct tls_state fresh = {.fd = fd, .rbio = rbio};
        u32 zero = 0;
        struct tls_event *ev = tls_scratch.lookup(&zero);
        if (!ev)
            return 0;
        /* The verdict, once per connection: the server's accepted socket has a watched local port;
         * a client's is ephemeral, so curl, wrk or a proxy's upstream stop here from their first call. */
        struct tls_open *open = (struct tls_open *)ev->data;
        if (!socket_of(fd, open, &fresh.sk)) {
            count(TC_UNRESOLVED);
        } else {
            fresh.watched = TLS_WATCHED_PORT(open->local_port);
            walked = 1;
            client_key(open, &fresh.client);
        }
        tls_state.update(&skey, &fresh);
        if (!fresh.watched) {
            count(TC_IGNORED_CALLS);
            return 0;
        }
        mark_wire(&fresh.client);
        state = tls_state.lookup(&skey);
        if (!state)
            return 0;
    }
    if (!state->announced)
        announce(state, ssl, tgid, walked);
    return state;
}

/* The entry only keeps the call's arguments: a call that returns no data (WANT_READ) costs
 * nothing more. Everything else waits for the return (tls_return). */
static __always_inline int enter(struct pt_regs *ctx, u8 kind, u64 out_len, u32 rbio_offset, u32 num_offset)
{
    struct tls_call *slot = tls_calls.task_storage_get(bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!slot) {
        /* A thread's first call, whose storage the kernel could not make (out of memory, or
         * another task-storage call in progress on this CPU): the call's bytes are missed. */
        count(TC_UNTRACKED);
        return 0;
    }
    slot->ssl = PT_REGS_PARM1(ctx);
    slot->buf = PT_REGS_PARM2(ctx);
    slot->out_len = out_len;
    slot->rbio_offset = rbio_offset;
    slot->num_offset = num_offset;
    slot->kind = kind;
    return 0;
}

/* One set of entry programs per probed library: each passes its library's offsets. */
#define LIBRARY_PROBES(i) \
int tls_read_entry_##i(struct pt_regs *ctx) \
{ return enter(ctx, KIND_READ, 0, TLS_RBIO_OFFSET_##i, TLS_BIO_NUM_OFFSET_##i); } \
int tls_read_ex_entry_##i(struct pt_regs *ctx) \
{ return enter(ctx, KIND_READ, PT_REGS_PARM4(ctx), TLS_RBIO_OFFSET_##i, TLS_BIO_NUM_OFFSET_##i); } \
int tls_write_entry_##i(struct pt_regs *ctx) \
{ return enter(ctx, KIND_WRITE, 0, TLS_RBIO_OFFSET_##i, TLS_BIO_NUM_OFFSET_##i); } \
int tls_write_ex_entry_##i(struct pt_regs *ctx) \
{ return enter(ctx, KIND_WRITE, PT_REGS_PARM4(ctx), TLS_RBIO_OFFSET_##i, TLS_BIO_NUM_OFFSET_##i); }

LIBRARY_PROBES(0)
#if TLS_LIBRARIES > 1
LIBRARY_PROBES(1)
#endif
#if TLS_LIBRARIES > 2
LIBRARY_PROBES(2)
#endif
#if TLS_LIBRARIES > 3
LIBRARY_PROBES(3)
#endif
#if TLS_LIBRARIES > 4
LIBRARY_PROBES(4)
#endif
#if TLS_LIBRARIES > 5
LIBRARY_PROBES(5)
#endif
#if TLS_LIBRARIES > 6
LIBRARY_PROBES(6)
#endif
#if TLS_LIBRARIES > 7
LIBRARY_PROBES(7)
#endif

/* SSL_free(ssl): the connection's end, once. Entry only: nothing to wait for. */
int tls_free(struct pt_regs *ctx)
{
    u64 ssl = PT_REGS_PARM1(ctx);
    struct tls_state_key skey = {.ssl = ssl, .tgid = bpf_get_current_pid_tgid() >> 32};
    struct tls_state *state = tls_state.lookup(&skey);
    if (!state)
        return 0;
    finish(state, ssl, skey.tgid);
    tls_state.delete(&skey);
    return 0;
}

int tls_return(struct pt_regs *ctx)
{
    struct tls_call *found = tls_calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!found || !found->ssl)
        return 0;
    struct tls_call call = *found;
    found->ssl = 0;
    u64 id = bpf_get_current_pid_tgid();

    int ret = (int)PT_REGS_RC(ctx);
    if (ret <= 0)
        return 0;
    /* Judged before the _ex form's length is read: an unwatched call (a client's) stops at a
     * lookup, without that read (~0.25 us here). */
    struct tls_state *state = judge(call.ssl, id >> 32, call.kind, call.rbio_offset, call.num_offset);
    if (!state)
        return 0;
    u64 total = ret;
    if (call.out_len) {
        size_t done = 0;
        if (bpf_probe_read_user(&done, sizeof(done), (void *)call.out_len))
            return 0;
        total = done;
    }
    if (!total)
        return 0;
    count(TC_CALLS);
    u32 dir = call.kind == KIND_WRITE ? 1 : 0;
    u64 base = state->stream[dir];
    state->stream[dir] = base + total;
    if (!state->announced) {
        /* Its OPEN found no room in the ring: these bytes are a gap, the next call tries again. */
        state->lost[dir & 1] = 1;
        return 0;
    }
    /* The call's time: the probe's, or the wire's (see "Timing" above). Every write may be a
     * response's last; the first read after writes (or the connection's first) a request's first. */
    u64 ts = bpf_ktime_get_ns();
    u64 wire = 0;
    u8 timing = 0;
    if (call.kind == KIND_WRITE) {
        wire = wire_end(state, &timing);
        state->end_timing = timing;
    } else if (state->last != KIND_READ + 1) {
        count_end(state);
        wire = wire_start(state, &timing);
        count(TC_START_WIRE + timing - WIRE_EXACT);
    }
    state->last = call.kind + 1;
    u32 zero = 0;
    struct tls_event *ev = tls_scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->ts_ns = wire ? wire : ts;
    ev->ssl = call.ssl;
    ev->tgid = id >> 32;
    ev->fd = state->fd;
    ev->skipped = 0;
    ev->kind = call.kind;
    u64 offset = 0;
    /* Under pressure (the ring over TLS_TRIM_BYTES unread, or the small fallback ring over
     * TLS_FALLBACK_TRIM_BYTES, see output()) a call copies its first TLS_PREFIX bytes only: where
     * a message starts its head is there, and the rest goes by length (a body's bytes are only
     * counted). Without it, a few large bodies written faster than user
     * space can frame them (and hint their skip) would fill the ring and lose heads too. */
    u64 pending = ring_pending();
    u64 wake = wakeup_flag(pending);
    u64 chunk = TLS_CHUNK;
    s64 backlog = fallback_backlog();  /* once per call: see output() */
    int following = backlog > 0;
    int trim = pending >= TLS_TRIM_BYTES || backlog >= TLS_FALLBACK_TRIM_BYTES;
    if (trim)
        chunk = TLS_PREFIX;
    u64 conn = state->conn;
    struct tls_skip_key kkey = {.ssl = call.ssl, .tgid = id >> 32, .dir = dir};
    for (int i = 0; i < TLS_MAX_CHUNKS; i++) {
        if (offset >= total)
            break;
        struct tls_skip *skip = tls_skips.lookup(&kkey);
        if (skip && skip->conn == conn) {
            u32 rel = (u32)(base + offset) - skip->start;
            u32 span = skip->end - skip->start;
            if (rel < span) {
                u64 inside = span - rel;
                if (inside > total - offset)
                    inside = total - offset;
                count(TC_SKIPPED);
                ev->stream_off = base + offset;
                ev->len = 0;
                ev->skipped = inside;
                if (send(ev, state, dir, TLS_EVENT_HEADER, wake, &following))
                    return 0;
                offset += inside;
                continue;
            }
        }
        u64 n = total - offset;
        if (n > chunk)
            n = chunk;
        ev->stream_off = base + offset;
        ev->len = n;
        ev->skipped = 0;
        if (bpf_probe_read_user(ev->data, n & (TLS_CHUNK * 2 - 1), (void *)(call.buf + offset))) {
            count(TC_READ_ERRORS);
            state->lost[dir & 1] = 1;
            return 0;
        }
        if (send(ev, state, dir, TLS_EVENT_HEADER + n, wake, &following))
            return 0;
        offset += n;
        if (trim)
            break;
    }
    if (offset < total) {
        /* The rest by length only: user space counts it as body bytes it cannot read. */
        count(trim ? TC_TRIMMED : TC_TRUNCATED);
        u64 rest = total - offset;
        ev->stream_off = base + offset;
        ev->len = 0;
        ev->skipped = rest > 0xffffffff ? 0xffffffff : rest;
        send(ev, state, dir, TLS_EVENT_HEADER, wake, &following);
    }
    return 0;
}

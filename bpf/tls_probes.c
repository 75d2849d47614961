/*
 * tls_probes.c  The plaintext of TLS connections, read at OpenSSL's SSL_read
 *               and SSL_write, for the HTTP/1.x parser in user space.
 *
 * Loaded by exporter/capture/tls.py through the BPF loader helper process
 * (exporter/capture/bpf_loader.py, the only importer of BCC):
 *
 *     uprobe     SSL_read, SSL_read_ex, SSL_write, SSL_write_ex  (tls_*_entry)
 *     uretprobe  the same four symbols                            (tls_return)
 *     raw tracepoints sys_enter, sys_exit                  (tls_sys_enter, tls_sys_exit)
 *
 * on every libssl the exporter found (libssl.so.3, libssl.so.1.1, --libssl).
 * Needs uprobes (CONFIG_UPROBES), raw tracepoints and the BPF ring buffer
 * (Linux >= 5.8). The counter indices, the chunk size and the syscall numbers
 * come in as -D defines from tls.py, the one place they are named; this file
 * does not build on its own.
 *
 * Which socket an SSL* talks to: `struct ssl_st` is opaque and changes between
 * OpenSSL versions, and the kernel structs behind an fd must not be read here
 * (the headers BCC compiles with do not match the running kernel). Instead the
 * entry probe marks the thread, and the sys_enter raw tracepoint records the fd
 * of the read/write/recv/send family syscall the socket BIO makes inside the
 * call, on that thread. A raw tracepoint needs no tracefs (the per-syscall
 * tracepoints do, and reading their ids there needs more privilege).
 *
 * accept()/accept4() are followed too (sys_enter, then sys_exit on the same thread), so
 * that each event names the listening fd its connection was accepted from: user space
 * resolves that one when a short connection is gone before its first event is read.
 *
 * connect() marks its fd a client socket (`tls_clients`): the process is the
 * client side, never counted, and its SSL calls are dropped here from the first.
 * For the others, user space resolves (tgid, fd) to the socket's addresses from
 * /proc and writes a verdict into `tls_verdicts`: WATCH when the local port is a
 * watched port (the server's accepted socket), IGNORE otherwise (other services,
 * clients that connected before we looked). An ignored connection costs one or
 * two hash lookups per SSL call from then on: no thread marking, no copy, no
 * event. close(fd) drops both (the fd number will be reused) and tells user
 * space when it had heard of the fd.
 *
 * The ring: the reader is woken once TLS_WAKE_BYTES are unread, not per event
 * (it also reads every POLL_S), and past TLS_TRIM_BYTES unread a call copies
 * its first TLS_PREFIX bytes only; see tls.py for the sizes and why.
 *
 * Events (`struct tls_event`, 48-byte header then data) go through the
 * `tls_events` ring buffer. One SSL call's bytes are sent in chunks of at most
 * TLS_CHUNK bytes, up to TLS_MAX_CHUNKS of them; each chunk carries its offset
 * in its direction's byte stream, kept per SSL* in `tls_state`: the sequence
 * numbers of the segments user space builds. Bytes past the chunk budget are sent
 * by length only (counted `truncated`), and bytes the ring buffer could not take
 * (counted `lost`) become a gap of known length. The bytes read from user memory
 * never go past the length the call returned.
 *
 * Bodies: user space, which frames each message, names the stretches of a stream it will
 * only count (`tls_skips`, the wire path's body_skip); calls inside one send their length
 * in a header-only event instead of their bytes. A lost event marks its direction, and the
 * next event sent says so (TLS_FLAG_AFTER_LOSS): the gap will not fill, and user space
 * counts it as bytes of known length rather than waiting for them.
 *
 * Return values: SSL_read/SSL_write return an int (read as 32-bit signed, so
 * -1 stays -1); <= 0 is an error or a retry and carries no data. The _ex
 * variants return 1 on success with the length behind their fourth argument.
 *
 * Known limits: a thread blocked inside SSL_read when the probes are attached
 * is never seen returning from it (its bytes are missed; the parser resyncs at
 * the next message). Statically linked TLS libraries have no SSL_read symbol
 * here to probe.
 */
#include <uapi/linux/ptrace.h>

#define VERDICT_WATCH 1
#define VERDICT_IGNORE 2
#define VERDICT_QUIET 3  /* ignored by the kernel itself (see tls_listeners): user space never heard of it */

#define KIND_READ 0
#define KIND_WRITE 1
#define KIND_CLOSE 2

/* An SSL_* call in progress on one thread: what the return probe needs. */
struct tls_call {
    u64 ssl;
    u64 buf;
    u64 out_len;  /* size_t * of the _ex variants, 0 for SSL_read/SSL_write */
    s32 fd;       /* the fd the BIO used inside this call; -1: none seen */
    u8 kind;
    u8 pad[3];
};

struct tls_state_key {
    u64 ssl;
    u32 tgid;
    u32 pad;
};

/* Per SSL*: its socket and how far each direction's byte stream has gone. */
struct tls_state {
    u64 stream[2];  /* bytes read (KIND_READ) and written (KIND_WRITE) so far */
    s32 fd;         /* -1 until a syscall inside a call showed it */
    u8 lost[2];     /* per direction: bytes since the last event sent were lost */
    u8 pad[2];
};

/* Per socket and direction, a stretch of the byte stream (32-bit offsets, wrapping) that
 * only needs counting (a body of known length): calls inside it send their length only. */
struct tls_skip_key {
    u32 tgid;
    s32 fd;
    u32 dir;
};

struct tls_skip {
    u32 start;
    u32 end;
};

struct tls_sock_key {
    u32 tgid;
    s32 fd;
};

struct tls_event {
    u64 ts_ns;       /* bpf_ktime_get_ns() at the call's return: CLOCK_MONOTONIC */
    u64 ssl;
    u64 stream_off;  /* offset of data[0] in this direction's byte stream */
    u32 tgid;
    s32 fd;
    s32 listen_fd;   /* the listening socket this fd was accepted from; -1: not seen */
    u32 len;         /* bytes of data[] that follow */
    u32 skipped;     /* with len 0: bytes of the call past the chunk budget, not copied */
    u8 kind;
    u8 flags;        /* TLS_FLAG_AFTER_LOSS: bytes before stream_off were lost */
    u8 pad[2];
    u8 data[TLS_CHUNK * 2];  /* twice: the verifier bounds a length by a mask, so by 2 * TLS_CHUNK - 1 */
};

#define TLS_EVENT_HEADER 48
#define TLS_FLAG_AFTER_LOSS 1

/* LRU, as tls_accepting below: a thread that dies inside a call (or exits blocked in one)
 * never deletes its entry, and a full plain hash would stop new calls silently. */
BPF_TABLE("lru_hash", u32, struct tls_call, tls_calls, 16384);
/* accept()/accept4() in progress per thread: the listening fd; then what each accepted fd
 * came from. The listening socket outlives its connections, so user space can still
 * resolve its port when a short connection is already closed by the time its first
 * event is read. */
BPF_TABLE("lru_hash", u32, s32, tls_accepting, 16384);
/* How many threads are inside accept() now: sys_exit runs for every syscall on the host, and
 * while this is 0 (an nginx worker's accepts are short) one array read is all it costs. A thread
 * that never leaves its accept (killed before the exit tracepoint) only makes sys_exit look up. */
BPF_ARRAY(tls_accepts_open, s64, 1);
BPF_TABLE("lru_hash", struct tls_sock_key, s32, tls_accepted, 65536);
/* fds an SSL call returned data on: their close() is reported, so that user space never
 * takes the next socket with the same number for the old connection. */
BPF_TABLE("lru_hash", struct tls_sock_key, u8, tls_used, 65536);
BPF_TABLE("lru_hash", struct tls_state_key, struct tls_state, tls_state, 65536);
BPF_TABLE("lru_hash", struct tls_sock_key, u8, tls_verdicts, 65536);
/* Sockets their process connect()ed: it is the client side, never counted, so their SSL calls are
 * dropped here from the first one, with no event and no /proc lookup in user space (wrk's, curl's,
 * a proxy's upstream connections). A map of their own: connect() churn on the host (unix sockets
 * too) must not evict the verdicts user space set. */
BPF_TABLE("lru_hash", struct tls_sock_key, u8, tls_clients, 65536);
/* Listening sockets user space found on a port it does not watch (another TLS service on the host):
 * what they accept is dropped here from its first call, before any event. close() drops the entry,
 * so a reused fd number is asked about again. */
BPF_TABLE("lru_hash", struct tls_sock_key, u8, tls_listeners, 4096);
BPF_TABLE("lru_hash", struct tls_skip_key, struct tls_skip, tls_skips, 65536);
BPF_RINGBUF_OUTPUT(tls_events, TLS_RING_PAGES);
BPF_PERCPU_ARRAY(tls_counters, u64, TC_COUNT);
/* [RING_PRODUCED] bytes the probes put in tls_events, [RING_CONSUMED] user space's consumer
 * position, written after each read: the difference is the unread backlog. Mmapable: user space
 * writes its position with a store, no bpf(2) call (which --user, dropping CAP_BPF, would lose). */
#define RING_PRODUCED 0
#define RING_CONSUMED 1
BPF_F_TABLE("array", u32, u64, tls_ring_pos, 2, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(tls_scratch, struct tls_event, 1);

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

/* The ring's producer position moves by the record, its 8-byte header, and padding to 8. */
static __always_inline void ring_produced(u64 size)
{
    u32 slot = RING_PRODUCED;
    u64 *produced = tls_ring_pos.lookup(&slot);
    if (produced)
        __sync_fetch_and_add(produced, (size + 8 + 7) & ~7ULL);
}

/* Wake the reader only once a batch is worth it. Each wakeup is an irq_work, a self-IPI, which
 * on a virtual machine costs an exit (measured: ~5 us of run time per event with the default
 * adaptive wakeup); user space also reads the ring at least every POLL_S without being woken. */
static __always_inline u64 wakeup_flag(u64 pending)
{
    return pending >= TLS_WAKE_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Hand one event to user space; a failure marks the direction so the next event says so. */
static __always_inline int send(struct tls_event *ev, struct tls_state *state, u32 dir, u64 size, u64 wake)
{
    ev->flags = state->lost[dir & 1] ? TLS_FLAG_AFTER_LOSS : 0;
    size &= TLS_CHUNK * 2 - 1;
    if (tls_events.ringbuf_output(ev, size, wake)) {
        state->lost[dir & 1] = 1;
        count(TC_LOST);
        return -1;
    }
    ring_produced(size);
    state->lost[dir & 1] = 0;
    count(TC_EVENTS);
    return 0;
}

/* A socket user space said to ignore, or one its process connected from. */
static __always_inline int ignored(struct tls_sock_key *key)
{
    u8 *verdict = tls_verdicts.lookup(key);
    if (verdict)
        return *verdict != VERDICT_WATCH;
    return tls_clients.lookup(key) != 0;
}

static __always_inline int enter(struct pt_regs *ctx, u8 kind, u64 out_len)
{
    u64 id = bpf_get_current_pid_tgid();
    struct tls_state_key skey = {.ssl = PT_REGS_PARM1(ctx), .tgid = id >> 32};
    struct tls_state *state = tls_state.lookup(&skey);
    if (state && state->fd >= 0) {
        struct tls_sock_key vkey = {.tgid = id >> 32, .fd = state->fd};
        if (ignored(&vkey)) {
            count(TC_IGNORED_CALLS);
            return 0;
        }
    }
    struct tls_call call = {
        .ssl = PT_REGS_PARM1(ctx),
        .buf = PT_REGS_PARM2(ctx),
        .out_len = out_len,
        .fd = -1,
        .kind = kind,
    };
    u32 tid = id;
    tls_calls.update(&tid, &call);
    return 0;
}

int tls_read_entry(struct pt_regs *ctx) { return enter(ctx, KIND_READ, 0); }
int tls_read_ex_entry(struct pt_regs *ctx) { return enter(ctx, KIND_READ, PT_REGS_PARM4(ctx)); }
int tls_write_entry(struct pt_regs *ctx) { return enter(ctx, KIND_WRITE, 0); }
int tls_write_ex_entry(struct pt_regs *ctx) { return enter(ctx, KIND_WRITE, PT_REGS_PARM4(ctx)); }

int tls_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct tls_call *found = tls_calls.lookup(&tid);
    if (!found)
        return 0;
    struct tls_call call = *found;
    tls_calls.delete(&tid);

    int ret = (int)PT_REGS_RC(ctx);
    if (ret <= 0)
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

    struct tls_state_key skey = {.ssl = call.ssl, .tgid = id >> 32};
    struct tls_state *state = tls_state.lookup(&skey);
    if (!state) {
        struct tls_state fresh = {.fd = -1};
        tls_state.update(&skey, &fresh);
        state = tls_state.lookup(&skey);
        if (!state)
            return 0;
    }
    if (call.fd >= 0)
        state->fd = call.fd;
    u32 dir = call.kind == KIND_WRITE ? 1 : 0;
    u64 base = state->stream[dir];
    state->stream[dir] = base + total;
    s32 fd = state->fd;
    if (fd < 0) {
        /* Served from OpenSSL's buffer before any syscall of this SSL* was seen. */
        count(TC_NO_FD);
        return 0;
    }
    struct tls_sock_key vkey = {.tgid = id >> 32, .fd = fd};
    if (ignored(&vkey)) {
        count(TC_IGNORED_CALLS);
        return 0;
    }

    s32 *listener = tls_accepted.lookup(&vkey);
    if (listener && !tls_used.lookup(&vkey)) {
        /* Not heard of yet by user space: accepted from another service's listener? */
        struct tls_sock_key lkey = {.tgid = id >> 32, .fd = *listener};
        if (tls_listeners.lookup(&lkey)) {
            u8 quiet = VERDICT_QUIET;
            tls_verdicts.update(&vkey, &quiet);
            count(TC_IGNORED_CALLS);
            return 0;
        }
    }
    u32 zero = 0;
    struct tls_event *ev = tls_scratch.lookup(&zero);
    if (!ev)
        return 0;
    int fresh = !tls_used.lookup(&vkey);
    if (fresh) {
        u8 one = 1;
        tls_used.update(&vkey, &one);
    }
    ev->ts_ns = bpf_ktime_get_ns();
    ev->ssl = call.ssl;
    ev->tgid = id >> 32;
    ev->fd = fd;
    ev->listen_fd = listener ? *listener : -1;
    ev->skipped = 0;
    ev->kind = call.kind;
    u64 offset = 0;
    /* Under pressure (the ring over TLS_TRIM_BYTES unread) a call copies its first TLS_PREFIX
     * bytes only: where a message starts its head is there, and the rest goes by length (a
     * body's bytes are only counted). Without it, a few large bodies written faster than user
     * space can frame them (and hint their skip) would fill the ring and lose heads too. */
    u64 pending = ring_pending();
    u64 wake = wakeup_flag(pending);
    /* The first event of a socket user space has not heard of wakes it at once: it resolves the
     * socket through /proc, which needs the process alive (a batch read later may be too late). */
    if (fresh)
        wake = BPF_RB_FORCE_WAKEUP;
    u64 chunk = TLS_CHUNK;
    int trim = pending >= TLS_TRIM_BYTES;
    if (trim)
        chunk = TLS_PREFIX;
    struct tls_skip_key kkey = {.tgid = id >> 32, .fd = fd, .dir = dir};
    for (int i = 0; i < TLS_MAX_CHUNKS; i++) {
        if (offset >= total)
            break;
        struct tls_skip *skip = tls_skips.lookup(&kkey);
        if (skip) {
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
                if (send(ev, state, dir, TLS_EVENT_HEADER, wake))
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
        if (send(ev, state, dir, TLS_EVENT_HEADER + n, wake))
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
        send(ev, state, dir, TLS_EVENT_HEADER, wake);
    }
    return 0;
}

/* Every syscall on the host passes here: a map lookup for a marked thread is all it costs. */
int tls_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    long nr = ctx->args[1];
    if (nr == SYSNR_CLOSE) {
        u64 id = bpf_get_current_pid_tgid();
        struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
        long fd = 0;
        bpf_probe_read_kernel(&fd, sizeof(fd), &PT_REGS_PARM1(regs));
        struct tls_sock_key vkey = {.tgid = id >> 32, .fd = fd};
        s32 *listener = tls_accepted.lookup(&vkey);
        s32 listen_fd = -1;
        if (listener) {
            listen_fd = *listener;
            tls_accepted.delete(&vkey);
        }
        /* Reported when user space knows the fd (a verdict) or may still learn of it (its
         * events in the ring): either way the next socket with this number is another one. */
        int known = 0;
        u8 *verdict = tls_verdicts.lookup(&vkey);
        if (verdict) {
            known = *verdict != VERDICT_QUIET;
            tls_verdicts.delete(&vkey);
        }
        tls_listeners.delete(&vkey);
        if (tls_used.lookup(&vkey)) {
            tls_used.delete(&vkey);
            known = 1;
        }
        tls_clients.delete(&vkey);
        if (!known)
            return 0;
        struct tls_skip_key kkey = {.tgid = id >> 32, .fd = fd, .dir = KIND_READ};
        tls_skips.delete(&kkey);
        kkey.dir = KIND_WRITE;
        tls_skips.delete(&kkey);
        struct tls_event *ev;
        u32 zero = 0;
        ev = tls_scratch.lookup(&zero);
        if (!ev)
            return 0;
        ev->ts_ns = bpf_ktime_get_ns();
        ev->ssl = 0;
        ev->stream_off = 0;
        ev->tgid = id >> 32;
        ev->fd = fd;
        ev->listen_fd = listen_fd;
        ev->len = 0;
        ev->skipped = 0;
        ev->kind = KIND_CLOSE;
        ev->flags = 0;
        if (tls_events.ringbuf_output(ev, TLS_EVENT_HEADER, wakeup_flag(ring_pending()))) {
            count(TC_LOST);
        } else {
            ring_produced(TLS_EVENT_HEADER);
            count(TC_EVENTS);
        }
        return 0;
    }
    if (nr == SYSNR_CONNECT) {
        u64 id = bpf_get_current_pid_tgid();
        struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
        long fd = -1;
        bpf_probe_read_kernel(&fd, sizeof(fd), &PT_REGS_PARM1(regs));
        struct tls_sock_key vkey = {.tgid = id >> 32, .fd = fd};
        u8 one = 1;
        tls_clients.update(&vkey, &one);
        return 0;
    }
    if (nr == SYSNR_ACCEPT || nr == SYSNR_ACCEPT4) {
        struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
        long listen_fd = -1;
        bpf_probe_read_kernel(&listen_fd, sizeof(listen_fd), &PT_REGS_PARM1(regs));
        u32 tid = bpf_get_current_pid_tgid();
        s32 value = listen_fd;
        s32 *before = tls_accepting.lookup(&tid);
        tls_accepting.update(&tid, &value);
        u32 zero = 0;
        s64 *open = tls_accepts_open.lookup(&zero);
        if (open && !before)
            __sync_fetch_and_add(open, 1);
        return 0;
    }
    if (nr != SYSNR_READ && nr != SYSNR_WRITE && nr != SYSNR_READV && nr != SYSNR_WRITEV &&
        nr != SYSNR_RECVFROM && nr != SYSNR_SENDTO && nr != SYSNR_RECVMSG && nr != SYSNR_SENDMSG)
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct tls_call *call = tls_calls.lookup(&tid);
    if (!call)
        return 0;
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long fd = -1;
    bpf_probe_read_kernel(&fd, sizeof(fd), &PT_REGS_PARM1(regs));
    call->fd = fd;
    return 0;
}

/* The other half of accept tracking: the fd accept returned, tied to its listening fd. */
int tls_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    s64 *open = tls_accepts_open.lookup(&zero);
    if (!open || *open <= 0)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    s32 *listen_fd = tls_accepting.lookup(&tid);
    if (!listen_fd)
        return 0;
    s32 listener = *listen_fd;
    tls_accepting.delete(&tid);
    __sync_fetch_and_add(open, -1);
    long ret = ctx->args[1];
    if (ret < 0)
        return 0;
    struct tls_sock_key key = {.tgid = id >> 32, .fd = ret};
    tls_accepted.update(&key, &listener);
    return 0;
}

/*
 * The benchmark's compiled load generator: many Socket.IO clients in one thread, rooms,
 * a closed loop of messages with at most `window` per room not yet delivered to everyone.
 *
 * It does what bench/loadgen.py's connect_rooms + closed_loop do, speaking the same frames
 * as bench/wsclient.py (Engine.IO 4 over a raw WebSocket, Socket.IO 5 namespace CONNECT
 * with {"name": ...} as auth, EVENT "message" with an ack id), for a fraction of the CPU:
 * on a machine whose cores the load generator shares with the servers it measures, every
 * CPU-second it spends is one the servers do not get.
 *
 * Why it reads the way it does: one shared scratch buffer takes each read (up to 1 MiB), so
 * a burst of deliveries to one connection is parsed from one syscall; only a frame cut by
 * the end of a read is kept per connection. A delivery is counted from the frame's prefix
 * alone (`42/ns,["message"`), never parsed as JSON. Sockets are edge-triggered: a read that
 * returns less than it asked for has drained its socket, and the next data brings a new
 * event, so a ready socket costs one read and epoll never polls it again to ask.
 *
 * Input (stdin), one line per member, then `end`:
 *     M <room index> <host> <port> <engine.io path> <namespace>
 * It connects every member (at most --concurrency handshakes at a time), prints
 *     {"connected": N, "connect_s": S}
 * and waits for a line `go` on stdin (answering pings meanwhile). Then each room sends
 * --messages messages from its members in turn and the program prints one JSON line:
 * sent, delivered, expected, acks_failed, wall, complete, the deliveries of every room (and
 * with --per-member of every member) and its own CPU over the run.
 * Options: --messages K (200), --window W (2), --timeout S (180, the run), --connect-timeout
 * S (120, every member), --client-timeout S (10, one member's handshake), --go-timeout S
 * (300), --concurrency N (100 handshakes at a time), --per-member.
 * Every wait is bounded by a deadline and every loop by a count; a failure is one line on
 * stderr and a non-zero exit (1: connecting, 2: usage or input, 3: the run did not
 * complete; its JSON line is printed first). Room r's message i is sent by its member
 * i % size with the text "m<i> of room <r>", as loadgen.closed_loop sends it.
 *
 * Build: cc -O2 -std=c11 -o cloadgen loadgen.c   (Linux; no library beyond libc)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_MEMBERS 200000         /* input lines accepted */
#define MAX_FIELD 512              /* longest host, path or namespace */
#define SCRATCH_START (1u << 20)   /* the shared read buffer; grows for a larger frame */
#define MAX_FRAME (64u << 20)      /* a larger frame is a protocol error */
#define READS_PER_EVENT 16         /* reads of one ready socket before the next socket */
#define EVENTS 1024
#define STDIN_TAG UINT32_MAX

enum state { ST_IDLE, ST_CONNECTING, ST_UPGRADING, ST_OPENING, ST_JOINING, ST_READY, ST_DEAD };
enum phase { PH_CONNECT, PH_WAIT_GO, PH_RUN, PH_ACKS, PH_DONE };

typedef struct {
    char *host, *path, *ns;  /* interned per input line (small: strdup) */
    int port;
    int room, member;
    int fd;
    enum state state;
    double deadline;         /* of the handshake */
    unsigned char *left;     /* a frame cut by the end of a read */
    size_t left_len, left_cap;
    unsigned char *out;      /* bytes the socket did not take yet */
    size_t out_len, out_cap;
    int want_out;
    uint32_t next_ack;       /* ack ids 1, 2, ... */
    long delivered, base;    /* messages this member received; before the run */
    unsigned char *acked;    /* per ack id: answered */
    uint32_t acked_cap;
    char *msg_prefix, *ack_prefix, *ns_part;  /* 42/ns,["message"  43/ns,  /ns, */
    size_t msg_prefix_len, ack_prefix_len, ns_part_len;
} conn_t;

typedef struct {
    int *members;            /* conn indices, input order */
    int size, cap;
    long delivered, base;
    int sent;
    int done;
} room_t;

static struct {
    int messages, window, concurrency, per_member;
    double timeout, connect_timeout, client_timeout, go_timeout;
} opt = {200, 2, 100, 0, 180.0, 120.0, 10.0, 300.0};

static conn_t *conns;
static int nconns;
static room_t *rooms;
static int nrooms;
static int epfd;
static unsigned char *scratch;
static size_t scratch_cap;
static enum phase phase = PH_CONNECT;
static int started, ready, rooms_done;
static long sent_total, acks_ok, acks_bad, other_events, reads, frames, wakeups, ready_events;
static char first_error[MAX_FIELD * 3 + 600];
static uint64_t rng;

/* ------------------------------------------------------------------------------------- */
/* small helpers */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cloadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die(1, "out of memory (%zu bytes)", n);
    return q;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(xrealloc(NULL, n), s, n);
}

/* xorshift64*: masking keys for our own frames (RFC 6455 5.3 asks for keys a page's script
 * cannot predict; here nothing untrusted shares the connection), seeded from getrandom. */
static uint32_t rand32(void) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1DULL) >> 32);
}

static void seed(void) {
    if (getrandom(&rng, sizeof rng, 0) != sizeof rng) rng = (uint64_t)time(NULL) * 2654435761u;
    if (!rng) rng = 88172645463325252ULL;
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = t[v >> 18 & 63]; out[o++] = t[v >> 12 & 63];
        out[o++] = t[v >> 6 & 63]; out[o++] = t[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = t[v >> 18 & 63]; out[o++] = t[v >> 12 & 63]; out[o++] = '='; out[o++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = t[v >> 18 & 63]; out[o++] = t[v >> 12 & 63]; out[o++] = t[v >> 6 & 63];
        out[o++] = '=';
    }
    out[o] = 0;
}

static const char *who(const conn_t *c) {
    static char buf[MAX_FIELD * 2 + 96];
    snprintf(buf, sizeof buf, "room %d member %d (%s:%d %s %s)", c->room, c->member, c->host,
             c->port, c->path, c->ns);
    return buf;
}

/* A connection failed. While connecting, the whole program fails (as connect_rooms does);
 * during the run, the run stops: its room can no longer complete. */
static void fail(conn_t *c, const char *fmt, ...) {
    char why[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (phase == PH_CONNECT || phase == PH_WAIT_GO) die(1, "%s: %s", who(c), why);
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s: %s", who(c), why);
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = ST_DEAD;
}

/* ------------------------------------------------------------------------------------- */
/* writing */

static void watch(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET | (out ? EPOLLOUT : 0),
                             .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die(1, "epoll_ctl: %s", strerror(errno));
    c->want_out = out;
}

static void queue(conn_t *c, const unsigned char *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    if (!c->want_out) watch(c, 1);
}

/* Write what the socket takes now; keep the rest, in order, for EPOLLOUT. */
static void send_bytes(conn_t *c, const unsigned char *p, size_t n) {
    if (c->state == ST_DEAD) return;
    if (c->out_len) {
        queue(c, p, n);
        return;
    }
    ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            fail(c, "send: %s", strerror(errno));
            return;
        }
        w = 0;
    }
    if ((size_t)w < n) queue(c, p + w, n - (size_t)w);
}

static void flush_out(conn_t *c) {
    ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            fail(c, "send: %s", strerror(errno));
        return;
    }
    memmove(c->out, c->out + w, c->out_len - (size_t)w);
    c->out_len -= (size_t)w;
    if (!c->out_len) watch(c, 0);
}

/* One masked client frame (RFC 6455 5.2, 5.3): FIN, the opcode, the mask bit, the length,
 * a fresh 4-byte key, the payload XORed with it. */
static void send_frame(conn_t *c, int opcode, const char *payload, size_t n) {
    unsigned char stack[1024], *f = n + 14 <= sizeof stack ? stack : xrealloc(NULL, n + 14);
    size_t h = 0;
    f[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        f[h++] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (unsigned char)(n >> 8); f[h++] = (unsigned char)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) f[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    uint32_t k = rand32();
    unsigned char key[4] = {(unsigned char)(k >> 24), (unsigned char)(k >> 16),
                            (unsigned char)(k >> 8), (unsigned char)k};
    memcpy(f + h, key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = (unsigned char)payload[i] ^ key[i & 3];
    send_bytes(c, f, h + n);
    if (f != stack) free(f);
}

static void send_text(conn_t *c, const char *p, size_t n) { send_frame(c, 0x1, p, n); }

/* ------------------------------------------------------------------------------------- */
/* the closed loop */

static void room_check_done(room_t *r) {
    if (!r->done && r->delivered - r->base >= (long)opt.messages * r->size) {
        r->done = 1;
        rooms_done++;
    }
}

/* Send the room's next messages while fewer than `window` are not yet delivered to every
 * member: message i waits until messages up to i - window are everywhere. */
static void pump(room_t *r) {
    int guard = opt.window + 1;  /* at most a window's worth per call */
    while (phase == PH_RUN && r->sent < opt.messages && guard-- > 0 &&
           r->delivered - r->base >= (long)(r->sent - opt.window + 1) * r->size) {
        int i = r->sent;
        conn_t *c = &conns[r->members[i % r->size]];
        char buf[160];
        uint32_t id = c->next_ack++;
        if (id >= c->acked_cap) {
            uint32_t cap = c->acked_cap ? c->acked_cap * 2 : 64;
            while (cap <= id) cap *= 2;
            c->acked = xrealloc(c->acked, cap);
            memset(c->acked + c->acked_cap, 0, cap - c->acked_cap);
            c->acked_cap = cap;
        }
        int n = snprintf(buf, sizeof buf, "42%s%u[\"message\",{\"text\":\"m%d of room %d\"}]",
                         c->ns_part, id, i, c->room);
        send_text(c, buf, (size_t)n);
        r->sent++;
        sent_total++;
    }
}

static void on_delivery(conn_t *c) {
    room_t *r = &rooms[c->room];
    r->delivered++;
    c->delivered++;
    if (phase == PH_RUN) {
        room_check_done(r);
        pump(r);
    }
}

/* `43/ns,<id>[...]`: the ack of our message <id>; ok when its first argument has
 * "ok": true (bench/loadgen.py's _count_failed). */
static void on_ack(conn_t *c, const unsigned char *p, size_t n) {
    size_t i = c->ack_prefix_len;
    uint64_t id = 0;
    int digits = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9' && digits < 10) id = id * 10 + (p[i++] - '0'), digits++;
    if (!digits || id == 0 || id >= c->next_ack || c->acked[id]) return;  /* not one of ours */
    c->acked[id] = 1;
    int ok = 0;
    /* the first argument is an object: find its "ok" key, then true */
    if (i + 1 < n && p[i] == '[' && p[i + 1] == '{') {
        const unsigned char *k = memmem(p + i, n - i, "\"ok\"", 4);
        if (k) {
            size_t j = (size_t)(k - p) + 4;
            while (j < n && (p[j] == ' ' || p[j] == ':')) j++;
            ok = n - j >= 4 && memcmp(p + j, "true", 4) == 0;
        }
    }
    if (ok) acks_ok++;
    else acks_bad++;
}

/* ------------------------------------------------------------------------------------- */
/* reading: Engine.IO and Socket.IO packets */

static int starts(const unsigned char *p, size_t n, const char *s, size_t sn) {
    return n >= sn && memcmp(p, s, sn) == 0;
}

static void on_packet(conn_t *c, const unsigned char *p, size_t n) {
    if (starts(p, n, c->msg_prefix, c->msg_prefix_len)) {
        on_delivery(c);
        return;
    }
    if (!n) return;
    switch (p[0]) {
    case '2':  /* Engine.IO ping */
        send_text(c, "3", 1);
        return;
    case '0': {  /* Engine.IO open: connect to the namespace, with our name as auth */
        if (c->state != ST_OPENING) return;
        char buf[MAX_FIELD + 96];
        int len = snprintf(buf, sizeof buf, "40%s{\"name\": \"b%d-%d\"}", c->ns_part, c->room,
                           c->member);
        send_text(c, buf, (size_t)len);
        c->state = ST_JOINING;
        return;
    }
    case '1':
        fail(c, "the server closed the Engine.IO session");
        return;
    case '4':
        break;
    default:   /* pong, noop */
        return;
    }
    if (n < 2) return;
    int ours = n - 2 >= c->ns_part_len && memcmp(p + 2, c->ns_part, c->ns_part_len) == 0;
    switch (p[1]) {
    case '2':
        other_events++;  /* welcome, presence, ...: counted, never parsed */
        return;
    case '3':
        if (starts(p, n, c->ack_prefix, c->ack_prefix_len)) on_ack(c, p, n);
        return;
    case '0':
        if (ours && c->state == ST_JOINING) {
            c->state = ST_READY;
            ready++;
        }
        return;
    case '4':
        if (ours) fail(c, "connect refused: %.*s", (int)(n > 300 ? 300 : n), (const char *)p);
        return;
    case '1':
        if (ours) fail(c, "the server disconnected the namespace");
        return;
    default:
        return;
    }
}

static void on_frame(conn_t *c, unsigned b0, const unsigned char *p, size_t n) {
    frames++;
    if (b0 & 0x70) {
        fail(c, "a frame with RSV bits set (no extension was negotiated)");
        return;
    }
    switch (b0 & 0x0F) {
    case 0x1:
        if (!(b0 & 0x80)) fail(c, "a fragmented text frame (the servers send whole frames)");
        else on_packet(c, p, n);
        return;
    case 0x9:  /* WebSocket ping: pong with its payload */
        send_frame(c, 0xA, (const char *)p, n);
        return;
    case 0x8:
        fail(c, "the server closed the WebSocket (code %d)", n >= 2 ? p[0] << 8 | p[1] : 0);
        return;
    case 0xA:
        return;
    default:
        fail(c, "an unexpected frame (opcode %u)", b0 & 0x0F);
        return;
    }
}

/* The HTTP response to the upgrade; returns the bytes it used, 0 while incomplete. */
static size_t read_upgrade(conn_t *c, const unsigned char *p, size_t n) {
    const unsigned char *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) {
        if (n > 16384) fail(c, "an upgrade response of more than 16 KiB");
        return 0;
    }
    const unsigned char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
    size_t line = (size_t)(eol - p);
    if (!memmem(p, line, " 101 ", 5) && !(line >= 4 && memcmp(p + line - 4, " 101", 4) == 0)) {
        fail(c, "upgrade refused: %.*s", (int)(line > 200 ? 200 : line), (const char *)p);
        return 0;
    }
    c->state = ST_OPENING;
    return (size_t)(end - p) + 4;
}

/* Every whole frame of p[0..n); returns the bytes used. */
static size_t parse(conn_t *c, const unsigned char *p, size_t n) {
    size_t pos = 0;
    if (c->state == ST_UPGRADING) {
        pos = read_upgrade(c, p, n);
        if (!pos) return 0;
    }
    while (n - pos >= 2 && c->state != ST_DEAD) {
        unsigned b0 = p[pos], b1 = p[pos + 1];
        uint64_t len = b1 & 0x7F;
        size_t hl = 2;
        if (b1 & 0x80) {
            fail(c, "a masked frame from the server");
            break;
        }
        if (len == 126) {
            if (n - pos < 4) break;
            len = (uint64_t)p[pos + 2] << 8 | p[pos + 3];
            hl = 4;
        } else if (len == 127) {
            if (n - pos < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[pos + 2 + i];
            hl = 10;
        }
        if (len > MAX_FRAME) {
            fail(c, "a frame of %llu bytes", (unsigned long long)len);
            break;
        }
        if (n - pos < hl + len) break;
        on_frame(c, b0, p + pos + hl, (size_t)len);
        pos += hl + (size_t)len;
    }
    return pos;
}

static void on_readable(conn_t *c) {
    for (int round = 0; round < READS_PER_EVENT && c->state != ST_DEAD; round++) {
        size_t have = c->left_len;
        if (have * 2 > scratch_cap) {  /* a large frame in progress: make room for the rest */
            scratch_cap = have * 2;
            scratch = xrealloc(scratch, scratch_cap);
        }
        if (have) memcpy(scratch, c->left, have);
        ssize_t got = read(c->fd, scratch + have, scratch_cap - have);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
            fail(c, "read: %s", strerror(errno));
            return;
        }
        if (got == 0) {
            fail(c, "the server closed the connection");
            return;
        }
        reads++;
        size_t n = have + (size_t)got;
        size_t used = parse(c, scratch, n);
        if (c->state == ST_DEAD) return;
        size_t rest = n - used;
        if (rest > c->left_cap) {
            c->left_cap = rest * 2;
            c->left = xrealloc(c->left, c->left_cap);
        }
        memcpy(c->left, scratch + used, rest);
        c->left_len = rest;
        if ((size_t)got < scratch_cap - have) return;  /* the socket is drained */
    }
    /* still more to read: edge-triggered, no new event would come for it, so ask again */
    if (c->state != ST_DEAD) watch(c, c->want_out);
}

/* ------------------------------------------------------------------------------------- */
/* connecting */

static void start_connect(conn_t *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->port)};
    if (inet_pton(AF_INET, c->host, &sa.sin_addr) != 1) {
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
        if (getaddrinfo(c->host, NULL, &hints, &res) != 0 || !res)
            die(1, "%s: cannot resolve the host", who(c));
        sa.sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
        freeaddrinfo(res);
    }
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die(1, "socket: %s (raise the open-file limit?)", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  /* no Nagle delay */
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
        die(1, "%s: connect: %s", who(c), strerror(errno));
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET,
                             .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die(1, "epoll_ctl: %s", strerror(errno));
    c->want_out = 1;
    c->state = ST_CONNECTING;
    c->deadline = now() + opt.client_timeout;
    started++;
}

/* The TCP connect finished: send the upgrade request, as bench/wsclient.py does. */
static void on_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(c, "connect: %s", strerror(err));
        return;
    }
    unsigned char raw[16];
    for (int i = 0; i < 16; i += 4) {
        uint32_t r = rand32();
        memcpy(raw + i, &r, 4);
    }
    char key[32], req[MAX_FIELD * 2 + 400];
    base64(raw, 16, key);
    int n = snprintf(req, sizeof req,
                     "GET %s?EIO=4&transport=websocket HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", c->path, c->host, c->port, key);
    c->state = ST_UPGRADING;
    watch(c, 0);
    send_bytes(c, (const unsigned char *)req, (size_t)n);
}

static void check_handshakes(double t) {
    for (int i = 0; i < started; i++) {
        conn_t *c = &conns[i];
        if (c->state != ST_READY && c->state != ST_DEAD && c->state != ST_IDLE && t > c->deadline)
            die(1, "%s: no namespace CONNECT within %.1f s (state %d)", who(c), opt.client_timeout,
                c->state);
    }
}

/* ------------------------------------------------------------------------------------- */
/* input */

static char inbuf[1 << 16];
static size_t in_len;
static int stdin_eof;

/* The next line from stdin into `line` (without its newline); 1 when there was one, 0 when
 * only a part of a line is buffered. With `block`, reads until a line or EOF. */
static int next_line(char *line, size_t cap, int block) {
    for (int guard = 0; guard < 1 << 20; guard++) {
        char *nl = memchr(inbuf, '\n', in_len);
        if (nl) {
            size_t n = (size_t)(nl - inbuf);
            if (n >= cap) die(2, "an input line of more than %zu bytes", cap);
            memcpy(line, inbuf, n);
            line[n] = 0;
            memmove(inbuf, nl + 1, in_len - n - 1);
            in_len -= n + 1;
            return 1;
        }
        if (stdin_eof || (!block && guard > 0)) return 0;
        if (in_len == sizeof inbuf) die(2, "an input line of more than %zu bytes", sizeof inbuf);
        ssize_t got = read(0, inbuf + in_len, sizeof inbuf - in_len);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (got <= 0) stdin_eof = 1;
        else in_len += (size_t)got;
    }
    die(2, "reading stdin did not end");
    return 0;
}

static void add_member(int room, const char *host, int port, const char *path, const char *ns) {
    if (nconns >= MAX_MEMBERS) die(2, "more than %d members", MAX_MEMBERS);
    if (room < 0 || room >= 1000000) die(2, "a room index out of range: %d", room);
    if (port <= 0 || port > 65535) die(2, "a port out of range: %d", port);
    conns = xrealloc(conns, sizeof *conns * (size_t)(nconns + 1));
    conn_t *c = &conns[nconns++];
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->host = xstrdup(host);
    c->port = port;
    c->ns = xstrdup(ns);
    /* the path as wsclient.py sends it: with one trailing slash */
    size_t pl = strlen(path);
    while (pl && path[pl - 1] == '/') pl--;
    c->path = xrealloc(NULL, pl + 2);
    memcpy(c->path, path, pl);
    memcpy(c->path + pl, "/", 2);
    c->room = room;
    c->next_ack = 1;
    int main_ns = !strcmp(ns, "/") || !*ns;
    size_t nl = strlen(ns);
    c->ns_part = xrealloc(NULL, nl + 2);
    snprintf(c->ns_part, nl + 2, "%s%s", main_ns ? "" : ns, main_ns ? "" : ",");
    c->ns_part_len = strlen(c->ns_part);
    c->msg_prefix = xrealloc(NULL, c->ns_part_len + 16);
    c->msg_prefix_len = (size_t)snprintf(c->msg_prefix, c->ns_part_len + 16, "42%s[\"message\"",
                                         c->ns_part);
    c->ack_prefix = xrealloc(NULL, c->ns_part_len + 4);
    c->ack_prefix_len = (size_t)snprintf(c->ack_prefix, c->ns_part_len + 4, "43%s", c->ns_part);
    if (room >= nrooms) {
        rooms = xrealloc(rooms, sizeof *rooms * (size_t)(room + 1));
        memset(rooms + nrooms, 0, sizeof *rooms * (size_t)(room + 1 - nrooms));
        nrooms = room + 1;
    }
    room_t *r = &rooms[room];
    if (r->size == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->members = xrealloc(r->members, sizeof *r->members * (size_t)r->cap);
    }
    c->member = r->size;
    r->members[r->size++] = nconns - 1;
}

static void read_members(void) {
    char line[4 * MAX_FIELD];
    for (int count = 0; count <= MAX_MEMBERS; count++) {
        if (!next_line(line, sizeof line, 1)) die(2, "stdin ended before the line `end`");
        if (!strcmp(line, "end")) break;
        char host[MAX_FIELD], path[MAX_FIELD], ns[MAX_FIELD];
        int room, port;
        if (sscanf(line, "M %d %511s %d %511s %511s", &room, host, &port, path, ns) != 5)
            die(2, "not a member line: %.200s", line);
        add_member(room, host, port, path, ns);
    }
    if (!nconns) die(2, "no members given");
    for (int r = 0; r < nrooms; r++)
        if (!rooms[r].size) die(2, "room %d has no members (room indices must be 0..N-1)", r);
}

static double arg_num(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) die(2, "%s needs a value", argv[*i]);
    char *end;
    double v = strtod(argv[++*i], &end);
    if (*end || v < 0) die(2, "%s: not a number >= 0: %s", argv[*i - 1], argv[*i]);
    return v;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--messages")) opt.messages = (int)arg_num(argc, argv, &i);
        else if (!strcmp(a, "--window")) opt.window = (int)arg_num(argc, argv, &i);
        else if (!strcmp(a, "--timeout")) opt.timeout = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--connect-timeout")) opt.connect_timeout = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--client-timeout")) opt.client_timeout = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--go-timeout")) opt.go_timeout = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--per-member")) opt.per_member = 1;
        else if (!strcmp(a, "--concurrency")) opt.concurrency = (int)arg_num(argc, argv, &i);
        else die(2, "unknown argument %s (see the comment at the top of loadgen.c)", a);
    }
    if (opt.window < 1 || opt.concurrency < 1 || opt.messages > 100000000)
        die(2, "--window and --concurrency must be at least 1, --messages at most 1e8");
}

/* ------------------------------------------------------------------------------------- */
/* the event loop */

static double cpu_now(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void on_event(uint32_t tag, uint32_t events) {
    if (tag == STDIN_TAG) {
        char line[64];
        while (next_line(line, sizeof line, 0))
            if (!strcmp(line, "go") && phase == PH_WAIT_GO) phase = PH_RUN;
        if (stdin_eof && phase == PH_WAIT_GO) die(2, "stdin ended before the line `go`");
        if (stdin_eof) epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
        return;
    }
    conn_t *c = &conns[tag];
    if (c->state == ST_DEAD) return;
    if (c->state == ST_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
    if (c->state != ST_DEAD && (events & EPOLLOUT) && c->out_len) flush_out(c);
}

/* Wait for events until `until` returns 0 or `deadline` passes; returns 1 when it passed. */
static int loop(int (*until)(void), double deadline, int sweep_handshakes) {
    struct epoll_event evs[EVENTS];
    double next_sweep = 0;
    for (long iter = 0; iter < 1000000000L; iter++) {
        if (!until()) return 0;
        double t = now();
        if (t >= deadline) return 1;
        if (sweep_handshakes && t >= next_sweep) {
            check_handshakes(t);
            next_sweep = t + 0.1;
        }
        int ms = (int)((deadline - t) * 1000) + 1;
        if (ms > 100) ms = 100;
        int n = epoll_wait(epfd, evs, EVENTS, ms);
        if (n < 0 && errno != EINTR) die(1, "epoll_wait: %s", strerror(errno));
        if (n > 0) wakeups++, ready_events += n;
        for (int i = 0; i < n; i++) on_event(evs[i].data.u32, evs[i].events);
        if (phase == PH_RUN && first_error[0]) return 1;  /* a room can no longer complete */
    }
    die(1, "the event loop did not end");
    return 1;
}

static int connecting(void) {
    while (started < nconns && started - ready < opt.concurrency) start_connect(&conns[started]);
    return ready < nconns;
}
static int waiting_go(void) { return phase == PH_WAIT_GO; }
static int running(void) { return rooms_done < nrooms; }
static int acks_pending(void) { return acks_ok + acks_bad < sent_total; }

static void print_result(double wall, int complete, double cpu_user, double cpu_sys) {
    long delivered = 0, expected = 0;
    for (int r = 0; r < nrooms; r++) {
        delivered += rooms[r].delivered - rooms[r].base;
        expected += (long)opt.messages * rooms[r].size;
    }
    printf("{\"sent\": %ld, \"delivered\": %ld, \"expected\": %ld, \"acks_failed\": %ld, "
           "\"wall\": %.6f, \"complete\": %s, \"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, "
           "\"reads\": %ld, \"frames\": %ld, \"wakeups\": %ld, \"ready_events\": %ld, "
           "\"other_events\": %ld, \"error\": ",
           sent_total, delivered, expected, sent_total - acks_ok, wall,
           complete ? "true" : "false", cpu_user, cpu_sys, reads, frames, wakeups, ready_events,
           other_events);
    if (first_error[0]) {
        putchar('"');
        for (const char *s = first_error; *s; s++) {
            if (*s == '"' || *s == '\\') putchar('\\');
            putchar((unsigned char)*s < 0x20 ? ' ' : *s);
        }
        putchar('"');
    } else {
        fputs("null", stdout);
    }
    fputs(", \"delivered_per_room\": [", stdout);
    for (int r = 0; r < nrooms; r++)
        printf("%s%ld", r ? ", " : "", rooms[r].delivered - rooms[r].base);
    fputs("]", stdout);
    if (opt.per_member) {  /* --per-member: every member's deliveries, room by room */
        fputs(", \"delivered_per_member\": [", stdout);
        for (int r = 0; r < nrooms; r++) {
            fputs(r ? ", [" : "[", stdout);
            for (int j = 0; j < rooms[r].size; j++) {
                const conn_t *c = &conns[rooms[r].members[j]];
                printf("%s%ld", j ? ", " : "", c->delivered - c->base);
            }
            fputs("]", stdout);
        }
        fputs("]", stdout);
    }
    fputs("}\n", stdout);
    fflush(stdout);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    seed();
    read_members();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die(1, "epoll_create1: %s", strerror(errno));
    scratch_cap = SCRATCH_START;
    scratch = xrealloc(NULL, scratch_cap);

    double t0 = now();
    if (loop(connecting, t0 + opt.connect_timeout, 1))
        die(1, "%d of %d members connected within %.1f s", ready, nconns, opt.connect_timeout);
    printf("{\"connected\": %d, \"connect_s\": %.3f}\n", ready, now() - t0);
    fflush(stdout);

    phase = PH_WAIT_GO;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);  /* a pipe: polls; a regular file: always ready */
    on_event(STDIN_TAG, EPOLLIN);            /* `go` may be buffered already */
    if (phase == PH_WAIT_GO && loop(waiting_go, now() + opt.go_timeout, 0))
        die(2, "no line `go` on stdin within %.0f s", opt.go_timeout);

    double u0, s0, u1, s1;
    cpu_now(&u0, &s0);
    double start = now(), deadline = start + opt.timeout;
    for (int r = 0; r < nrooms; r++) rooms[r].base = rooms[r].delivered;
    for (int i = 0; i < nconns; i++) conns[i].base = conns[i].delivered;
    reads = frames = wakeups = ready_events = other_events = 0;  /* the run's own */
    for (int r = 0; r < nrooms; r++) {
        room_check_done(&rooms[r]);  /* --messages 0 */
        pump(&rooms[r]);
    }
    int timed_out = loop(running, deadline, 0);
    double wall = now() - start;
    phase = PH_ACKS;
    double ack_deadline = deadline - now() > 0.5 ? deadline : now() + 0.5;
    if (!first_error[0]) loop(acks_pending, ack_deadline, 0);
    cpu_now(&u1, &s1);
    int complete = !timed_out && rooms_done == nrooms;
    phase = PH_DONE;
    print_result(wall, complete, u1 - u0, s1 - s0);
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    if (!complete) {
        fprintf(stderr, "cloadgen: the run did not complete: %s\n",
                first_error[0] ? first_error : "the deadline passed first");
        return 3;
    }
    return 0;
}

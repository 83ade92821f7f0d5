/*
 * smolvmm guest agent, protocol 2: the host's control channel into the guest.
 *
 * Usage: smolvmm-agent /dev/hvcN (the agent's own virtio console port, made raw).
 *
 * Every message is a frame: a 12-byte little-endian header (u16 magic 0x5356, u16 type,
 * u32 request id, u32 payload length <= 65536) and the payload. smolvmm/agent_protocol.py
 * holds the same numbers and describes each payload; a request id names one call, so several
 * run at once: processes (fork/exec in their own session, pipes polled here), file uploads
 * (written to a temporary file renamed at the end) and downloads (sent a chunk per loop).
 * Output and downloads are sent only while the host has acknowledged all but WINDOW bytes
 * of them, so a host reader that falls behind stalls only its own call.
 *
 * On every resume the host sends SYNC: the agent sets CLOCK_REALTIME, credits fresh host
 * entropy and forces a CRNG reseed (clones never share random numbers), and gives network
 * interfaces their new MACs. SETUP hands over the environment, secrets, hostname and machine
 * id every process gets; SCRUB, sent before a snapshot, overwrites the secrets and every
 * buffer that held them, and has the pages of ended processes freed (zeroed). The agent is the
 * child subreaper of everything it starts, and reaps it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define VERSION 2
#define MAGIC 0x5356
#define HEADER 12
#define MAX_PAYLOAD 65536
#define CHUNK 32768
#define WINDOW (256 * 1024)
#define MAX_PROCS 64
#define MAX_FILES 16
#define MAX_ENV 256
#define ENTROPY_BYTES 32

enum {
    /* host to guest */
    T_HELLO = 1, T_SYNC = 2, T_SETUP = 3, T_SCRUB = 4, T_EXEC = 5, T_STDIN = 6, T_SIGNAL = 7,
    T_OUTPUT_ACK = 8, T_WRITE_OPEN = 9, T_WRITE_DATA = 10, T_READ_OPEN = 11, T_READ_ACK = 12,
    /* guest to host */
    T_READY = 64, T_OK = 65, T_ERROR = 66, T_STARTED = 67, T_STDOUT = 68, T_STDERR = 69,
    T_EXIT = 70, T_STDIN_ACK = 71, T_READ_DATA = 72,
};

struct proc {
    uint32_t id;
    pid_t pid;
    int in, out, err;     /* pipe ends, -1 once closed */
    char *pending;        /* stdin bytes not yet taken by the pipe */
    size_t pending_len, pending_cap;
    int close_stdin;      /* close once pending is written */
    size_t unacked[2];    /* stdout, stderr bytes sent but not acknowledged */
    int exited, status;
};

struct upload { uint32_t id; int fd; char *path, *temp; };
struct download { uint32_t id; int fd; size_t unacked; };

static int port;
static struct proc procs[MAX_PROCS];
static struct upload uploads[MAX_FILES];
static struct download downloads[MAX_FILES];
static unsigned char inbuf[HEADER + MAX_PAYLOAD];
static size_t inlen;
static unsigned char outbuf[HEADER + MAX_PAYLOAD];
static char *env_block, *secret_block;       /* NUL-separated K=V strings */
static size_t env_len, secret_len;
static int scrub_input;  /* clear inbuf's unused part once the frames in it are handled */

static void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static uint16_t get16(const unsigned char *p) { return p[0] | p[1] << 8; }
static uint32_t get32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static void write_all(const unsigned char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(port, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd p = {.fd = port, .events = POLLOUT};
                poll(&p, 1, 1000);
                continue;
            }
            return;
        }
        data += n;
        len -= (size_t)n;
    }
}

/* The payload is at outbuf + HEADER already, or is copied there from data. */
static void send_frame(uint16_t type, uint32_t id, const void *data, size_t len)
{
    put16(outbuf, MAGIC);
    put16(outbuf + 2, type);
    put32(outbuf + 4, id);
    put32(outbuf + 8, (uint32_t)len);
    if (data != NULL && data != outbuf + HEADER) memcpy(outbuf + HEADER, data, len);
    write_all(outbuf, HEADER + len);
}

static void send_error(uint32_t id, const char *what, int error)
{
    char message[512];
    int n = snprintf(message, sizeof message, "%s: %s", what, strerror(error));
    send_frame(T_ERROR, id, message, n < 0 ? 0 : (size_t)n >= sizeof message ? sizeof message - 1 : (size_t)n);
}

static void send_ok(uint32_t id) { send_frame(T_OK, id, NULL, 0); }

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int parse_hex(const char *hex, unsigned char *out, size_t bytes)
{
    for (size_t i = 0; i < bytes; i++) {
        int high = hex_value(hex[2 * i]), low = hex_value(hex[2 * i + 1]);
        if (high < 0 || low < 0) return -1;
        out[i] = (unsigned char)(high << 4 | low);
    }
    return hex[2 * bytes] == '\0' ? 0 : -1;
}

/* "eth0=525400123456": give eth0 that MAC address (virtio-net changes it live). */
static int set_mac(const char *assignment)
{
    struct ifreq request;
    const char *equals = strchr(assignment, '=');
    if (equals == NULL || (size_t)(equals - assignment) >= IFNAMSIZ) return -1;
    memset(&request, 0, sizeof request);
    memcpy(request.ifr_name, assignment, (size_t)(equals - assignment));
    request.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    if (parse_hex(equals + 1, (unsigned char *)request.ifr_hwaddr.sa_data, 6) != 0) return -1;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    int ok = ioctl(sock, SIOCSIFHWADDR, &request) == 0;
    close(sock);
    return ok ? 0 : -1;
}

/* Splits a payload of NUL-terminated strings; returns how many, or -1 if it is not such a list. */
static int split(char *data, size_t len, char **out, int max)
{
    int count = 0;
    size_t start = 0;
    if (len > 0 && data[len - 1] != '\0') return -1;
    for (size_t i = 0; i < len; i++)
        if (data[i] == '\0') {
            if (count == max) return -1;
            out[count++] = data + start;
            start = i + 1;
        }
    return count;
}

/* SYNC: i64 seconds, u32 nanoseconds, 32 bytes of entropy, then "ifname=mac" strings. */
static void do_sync(uint32_t id, unsigned char *payload, size_t len)
{
    struct {
        struct rand_pool_info info;
        unsigned char bytes[ENTROPY_BYTES];
    } entropy;
    if (len < 12 + ENTROPY_BYTES) { send_error(id, "sync", EINVAL); return; }
    struct timespec now = {.tv_sec = (time_t)((uint64_t)get32(payload) | (uint64_t)get32(payload + 4) << 32),
                           .tv_nsec = get32(payload + 8)};
    int ok = clock_settime(CLOCK_REALTIME, &now) == 0;
    memcpy(entropy.bytes, payload + 12, ENTROPY_BYTES);
    entropy.info.entropy_count = 8 * ENTROPY_BYTES;
    entropy.info.buf_size = ENTROPY_BYTES;
    int random = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (random < 0 || ioctl(random, RNDADDENTROPY, &entropy) != 0 || ioctl(random, RNDRESEEDCRNG) != 0) ok = 0;
    if (random >= 0) close(random);
    explicit_bzero(&entropy, sizeof entropy);
    char *macs[16];
    int count = split((char *)payload + 12 + ENTROPY_BYTES, len - 12 - ENTROPY_BYTES, macs, 16);
    for (int i = 0; i < count; i++)
        if (set_mac(macs[i]) != 0) ok = 0;
    if (ok && count >= 0) send_ok(id);
    else send_error(id, "sync", errno ? errno : EINVAL);
}

/* The pages of a process that has ended are freed, and zeroed (the guest runs with init_on_free=1),
 * only once no CPU's page batch holds them: a page the process faulted in on one CPU stays in that
 * CPU's batch after it exits on another, with what it last held (an expanded secret), until that CPU
 * next drains its batches. munmap drains the batches of the CPU it runs on: do one on every CPU. */
static void drain_page_batches(void)
{
    cpu_set_t all, one;
    if (sched_getaffinity(0, sizeof all, &all) != 0) return;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &all)) continue;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        if (sched_setaffinity(0, sizeof one, &one) != 0) continue;  /* returns once running there */
        void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page != MAP_FAILED) munmap(page, 4096);
    }
    sched_setaffinity(0, sizeof all, &all);
}

static void scrub(void)
{
    if (secret_block != NULL) explicit_bzero(secret_block, secret_len);
    free(secret_block);
    secret_block = NULL;
    secret_len = 0;
    explicit_bzero(outbuf, sizeof outbuf);
}

static char *copy_block(const char *data, size_t len)
{
    char *block = malloc(len + 1);
    if (block != NULL) memcpy(block, data, len);
    return block;
}

/* SETUP: u32 env bytes, u32 secret bytes, hostname\0, machine id\0, env strings, secret strings.
 * The secrets are copied out and the payload that held them overwritten. */
static void do_setup(uint32_t id, unsigned char *payload, size_t len)
{
    char *names[2];
    size_t env_bytes = len >= 8 ? get32(payload) : 0, secret_bytes = len >= 8 ? get32(payload + 4) : 0;
    char *rest = (char *)payload + 8;
    size_t rest_len = len >= 8 ? len - 8 : 0;
    if (len < 8 || env_bytes > rest_len || secret_bytes > rest_len - env_bytes
        || split(rest, rest_len - env_bytes - secret_bytes, names, 2) != 2) {
        explicit_bzero(payload, len);
        send_error(id, "setup", EINVAL);
        return;
    }
    char *head_end = rest + rest_len - env_bytes - secret_bytes;
    scrub();
    free(env_block);
    env_block = copy_block(head_end, env_bytes);
    env_len = env_block ? env_bytes : 0;
    secret_block = copy_block(head_end + env_bytes, secret_bytes);
    secret_len = secret_block ? secret_bytes : 0;
    explicit_bzero(head_end + env_bytes, secret_bytes);
    int error = 0;
    if (names[0][0] != '\0' && sethostname(names[0], strlen(names[0])) != 0) error = errno;
    if (names[1][0] != '\0') {
        int fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
        if (fd >= 0) {
            if (write(fd, names[1], strlen(names[1])) < 0 || write(fd, "\n", 1) < 0) error = errno;
            close(fd);
        }
    }
    if (error) send_error(id, "setup", error);
    else send_ok(id);
}

static int add_strings(char **envp, int count, const char *block, size_t len)
{
    for (size_t i = 0; i < len && count < MAX_ENV * 2; i += strlen(block + i) + 1) {
        const char *equals = strchr(block + i, '=');
        if (equals == NULL) continue;
        size_t key = (size_t)(equals - (block + i)) + 1;
        int j;
        for (j = 0; j < count; j++)
            if (strncmp(envp[j], block + i, key) == 0) break;
        envp[j] = (char *)block + i;  /* a later value replaces an earlier one */
        if (j == count) count++;
    }
    return count;
}

static struct proc *find_proc(uint32_t id)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i].pid > 0 && procs[i].id == id) return &procs[i];
    return NULL;
}

static void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* EXEC: u32 argc, u32 call env bytes, cwd\0, argv strings, env strings. */
static void do_exec(uint32_t id, unsigned char *payload, size_t len)
{
    static char *argv[1024];
    static char *envp[MAX_ENV * 2 + 1];
    if (len < 8) { send_error(id, "exec", EINVAL); return; }
    uint32_t argc = get32(payload), env_bytes = get32(payload + 4);
    char *rest = (char *)payload + 8;
    size_t rest_len = len - 8;
    if (argc == 0 || argc >= 1023 || env_bytes > rest_len) { send_error(id, "exec", EINVAL); return; }
    size_t head = rest_len - env_bytes;
    char *strings[1024];
    int count = split(rest, head, strings, 1024);
    if (count != (int)argc + 1 || (env_bytes > 0 && rest[rest_len - 1] != '\0')) { send_error(id, "exec", EINVAL); return; }
    for (uint32_t i = 0; i < argc; i++) argv[i] = strings[i + 1];
    argv[argc] = NULL;
    int n = add_strings(envp, 0, env_block, env_len);
    n = add_strings(envp, n, secret_block, secret_len);
    n = add_strings(envp, n, rest + head, env_bytes);
    envp[n] = NULL;

    struct proc *slot = NULL;
    for (int i = 0; i < MAX_PROCS && slot == NULL; i++)
        if (procs[i].pid == 0) slot = &procs[i];
    if (slot == NULL) { send_error(id, "exec", EAGAIN); return; }
    int in[2], out[2], err[2];
    if (pipe2(in, O_CLOEXEC) != 0) { send_error(id, "exec", errno); return; }
    if (pipe2(out, O_CLOEXEC) != 0) { send_error(id, "exec", errno); close(in[0]); close(in[1]); return; }
    if (pipe2(err, O_CLOEXEC) != 0) {
        send_error(id, "exec", errno);
        close(in[0]); close(in[1]); close(out[0]); close(out[1]);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();  /* its own session and process group: a kill reaches everything it started */
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        if (strings[0][0] != '\0' && chdir(strings[0]) != 0) {
            dprintf(2, "smolvmm-agent: cd %s: %s\n", strings[0], strerror(errno));
            _exit(127);
        }
        environ = envp;
        execvp(argv[0], argv);
        int error = errno;
        dprintf(2, "smolvmm-agent: %s: %s\n", argv[0], strerror(error));
        _exit(error == ENOENT ? 127 : 126);
    }
    close(in[0]);
    close(out[1]);
    close(err[1]);
    if (pid < 0) {
        send_error(id, "exec", errno);
        close(in[1]); close(out[0]); close(err[0]);
        return;
    }
    set_nonblocking(in[1]);
    set_nonblocking(out[0]);
    set_nonblocking(err[0]);
    memset(slot, 0, sizeof *slot);
    *slot = (struct proc){.id = id, .pid = pid, .in = in[1], .out = out[0], .err = err[0]};
    unsigned char started[4];
    put32(started, (uint32_t)pid);
    send_frame(T_STARTED, id, started, 4);
}

/* A signal reaches everything the process started: its process group. Until the child has made
   that group (setsid, right after fork) there is only the child, which started nothing yet. */
static void signal_proc(pid_t pid, int sig)
{
    if (kill(-pid, sig) != 0 && errno == ESRCH) kill(pid, sig);
}

static void close_stdin(struct proc *p)
{
    if (p->in >= 0) close(p->in);
    p->in = -1;
    if (p->pending_len > 0) {  /* the process closed its stdin: what it will never read counts as taken */
        unsigned char ack[4];
        put32(ack, (uint32_t)p->pending_len);
        send_frame(T_STDIN_ACK, p->id, ack, 4);
    }
    free(p->pending);
    p->pending = NULL;
    p->pending_len = p->pending_cap = 0;
}

static void do_stdin(uint32_t id, unsigned char *payload, size_t len)
{
    struct proc *p = find_proc(id);
    if (p == NULL) return;
    if (len == 0) {
        p->close_stdin = 1;
        if (p->pending_len == 0) close_stdin(p);
        return;
    }
    if (p->in < 0) {
        unsigned char ack[4];
        put32(ack, (uint32_t)len);
        send_frame(T_STDIN_ACK, id, ack, 4);
        return;
    }
    if (p->pending_len + len > p->pending_cap) {
        size_t cap = (p->pending_len + len) * 2;
        char *grown = realloc(p->pending, cap);
        if (grown == NULL) return;
        p->pending = grown;
        p->pending_cap = cap;
    }
    memcpy(p->pending + p->pending_len, payload, len);
    p->pending_len += len;
}

static void flush_stdin(struct proc *p)
{
    ssize_t n = write(p->in, p->pending, p->pending_len);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) close_stdin(p);
        return;
    }
    memmove(p->pending, p->pending + n, p->pending_len - (size_t)n);
    p->pending_len -= (size_t)n;
    unsigned char ack[4];
    put32(ack, (uint32_t)n);
    send_frame(T_STDIN_ACK, p->id, ack, 4);
    if (p->pending_len == 0 && p->close_stdin) close_stdin(p);
}

/* Once the process has exited and both its pipes are at end of file: report it, free the slot. */
static void maybe_finish(struct proc *p)
{
    if (!p->exited || p->out >= 0 || p->err >= 0) return;
    unsigned char result[8];
    int code = WIFEXITED(p->status) ? WEXITSTATUS(p->status) : 128 + WTERMSIG(p->status);
    put32(result, (uint32_t)code);
    put32(result + 4, WIFSIGNALED(p->status) ? (uint32_t)WTERMSIG(p->status) : 0);
    if (p->in >= 0) close(p->in);
    free(p->pending);
    uint32_t id = p->id;
    memset(p, 0, sizeof *p);
    send_frame(T_EXIT, id, result, 8);
}

static void read_output(struct proc *p, int stream)
{
    int *fd = stream == 0 ? &p->out : &p->err;
    ssize_t n = read(*fd, outbuf + HEADER, CHUNK);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        close(*fd);
        *fd = -1;
        maybe_finish(p);
        return;
    }
    p->unacked[stream] += (size_t)n;
    send_frame(stream == 0 ? T_STDOUT : T_STDERR, p->id, outbuf + HEADER, (size_t)n);
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (int i = 0; i < MAX_PROCS; i++)
            if (procs[i].pid == pid && !procs[i].exited) {
                procs[i].exited = 1;
                procs[i].status = status;
                maybe_finish(&procs[i]);
            }
}

/* WRITE_OPEN: u32 mode, path\0. The data goes to a temporary file renamed over path at the end. */
static void do_write_open(uint32_t id, unsigned char *payload, size_t len)
{
    struct upload *slot = NULL;
    char *path[1];
    if (len < 5 || split((char *)payload + 4, len - 4, path, 1) != 1 || path[0][0] == '\0') {
        send_error(id, "write", EINVAL);
        return;
    }
    for (int i = 0; i < MAX_FILES && slot == NULL; i++)
        if (uploads[i].path == NULL) slot = &uploads[i];
    if (slot == NULL) { send_error(id, path[0], EAGAIN); return; }
    char *temp = NULL;
    if (asprintf(&temp, "%s.smolvmm-%u", path[0], id) < 0) { send_error(id, path[0], ENOMEM); return; }
    struct stat st;
    if (stat(path[0], &st) == 0 && S_ISDIR(st.st_mode)) {
        send_error(id, path[0], EISDIR);
        free(temp);
        return;
    }
    int fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        send_error(id, path[0], errno);
        free(temp);
        return;
    }
    fchmod(fd, get32(payload) & 07777);
    *slot = (struct upload){.id = id, .fd = fd, .path = strdup(path[0]), .temp = temp};
}

static void end_upload(struct upload *u) { free(u->path); free(u->temp); memset(u, 0, sizeof *u); }

static void do_write_data(uint32_t id, unsigned char *payload, size_t len)
{
    struct upload *u = NULL;
    for (int i = 0; i < MAX_FILES && u == NULL; i++)
        if (uploads[i].path != NULL && uploads[i].id == id) u = &uploads[i];
    if (u == NULL) return;  /* it failed already: the host was told */
    if (len > 0) {
        size_t done = 0;
        while (done < len) {
            ssize_t n = write(u->fd, payload + done, len - done);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) {
                send_error(id, u->path, errno);
                close(u->fd);
                unlink(u->temp);
                end_upload(u);
                return;
            }
            done += (size_t)n;
        }
        return;
    }
    int error = close(u->fd) != 0 ? errno : rename(u->temp, u->path) != 0 ? errno : 0;
    if (error) {
        unlink(u->temp);
        send_error(id, u->path, error);
    } else {
        send_ok(id);
    }
    end_upload(u);
}

static void do_read_open(uint32_t id, unsigned char *payload, size_t len)
{
    char *path[1];
    struct download *slot = NULL;
    if (split((char *)payload, len, path, 1) != 1) { send_error(id, "read", EINVAL); return; }
    for (int i = 0; i < MAX_FILES && slot == NULL; i++)
        if (downloads[i].fd <= 0) slot = &downloads[i];
    if (slot == NULL) { send_error(id, path[0], EAGAIN); return; }
    int fd = open(path[0], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(fd);
        fd = -1;
        errno = EISDIR;
    }
    if (fd < 0) { send_error(id, path[0], errno); return; }
    *slot = (struct download){.id = id, .fd = fd};
}

static void send_download(struct download *d)
{
    ssize_t n = read(d->fd, outbuf + HEADER, CHUNK);
    if (n < 0 && errno == EINTR) return;
    if (n <= 0) {
        if (n < 0) send_error(d->id, "read", errno);
        else send_ok(d->id);
        close(d->fd);
        memset(d, 0, sizeof *d);
        return;
    }
    d->unacked += (size_t)n;
    send_frame(T_READ_DATA, d->id, outbuf + HEADER, (size_t)n);
}

static void handle(uint16_t type, uint32_t id, unsigned char *payload, size_t len)
{
    struct proc *p;
    switch (type) {
    case T_HELLO: {
        unsigned char version[4];
        put32(version, VERSION);
        send_frame(T_READY, id, version, 4);
        break;
    }
    case T_SYNC: do_sync(id, payload, len); break;
    case T_SETUP: do_setup(id, payload, len); break;
    case T_SCRUB: scrub(); drain_page_batches(); scrub_input = 1; send_ok(id); break;
    case T_EXEC: do_exec(id, payload, len); break;
    case T_STDIN: do_stdin(id, payload, len); break;
    case T_SIGNAL:
        if (len == 4 && (p = find_proc(id)) != NULL && !p->exited) signal_proc(p->pid, (int)get32(payload));
        break;
    case T_OUTPUT_ACK:
        if (len == 8 && (p = find_proc(id)) != NULL && get32(payload) < 2) {
            size_t *unacked = &p->unacked[get32(payload)];
            size_t n = get32(payload + 4);
            *unacked = n > *unacked ? 0 : *unacked - n;
        }
        break;
    case T_WRITE_OPEN: do_write_open(id, payload, len); break;
    case T_WRITE_DATA: do_write_data(id, payload, len); break;
    case T_READ_OPEN: do_read_open(id, payload, len); break;
    case T_READ_ACK:
        for (int i = 0; i < MAX_FILES; i++)
            if (len == 4 && downloads[i].fd > 0 && downloads[i].id == id) {
                size_t n = get32(payload);
                downloads[i].unacked = n > downloads[i].unacked ? 0 : downloads[i].unacked - n;
            }
        break;
    }
}

static void read_port(void)
{
    ssize_t n = read(port, inbuf + inlen, sizeof inbuf - inlen);
    if (n <= 0) return;
    inlen += (size_t)n;
    while (inlen >= HEADER) {
        uint32_t len = get32(inbuf + 8);
        if (get16(inbuf) != MAGIC || len > MAX_PAYLOAD) {  /* not a frame: drop what we have and resync */
            inlen = 0;
            return;
        }
        if (inlen < HEADER + len) break;
        handle(get16(inbuf + 2), get32(inbuf + 4), inbuf + HEADER, len);
        inlen -= HEADER + len;
        memmove(inbuf, inbuf + HEADER + len, inlen);
    }
    if (scrub_input) explicit_bzero(inbuf + inlen, sizeof inbuf - inlen);
    scrub_input = 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: smolvmm-agent /dev/hvcN\n");
        return 2;
    }
    port = open(argv[1], O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (port < 0) {
        perror(argv[1]);
        return 1;
    }
    struct termios raw;
    if (tcgetattr(port, &raw) == 0) {  /* an hvc port is a tty: no echo, no line editing */
        cfmakeraw(&raw);
        tcsetattr(port, TCSANOW, &raw);
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);  /* orphans of the processes it starts come here to be reaped */
    signal(SIGPIPE, SIG_IGN);
    sigset_t child;
    sigemptyset(&child);
    sigaddset(&child, SIGCHLD);
    sigprocmask(SIG_BLOCK, &child, NULL);
    int children = signalfd(-1, &child, SFD_NONBLOCK | SFD_CLOEXEC);
    unsigned char version[4];
    put32(version, VERSION);
    send_frame(T_READY, 0, version, 4);  /* says "up" to a host that booted this guest */

    struct pollfd fds[2 + 3 * MAX_PROCS];
    struct proc *owner[2 + 3 * MAX_PROCS];
    int role[2 + 3 * MAX_PROCS];
    for (;;) {
        int count = 0, busy = 0;
        fds[count++] = (struct pollfd){.fd = port, .events = POLLIN};
        fds[count++] = (struct pollfd){.fd = children, .events = POLLIN};
        for (int i = 0; i < MAX_PROCS; i++) {
            struct proc *p = &procs[i];
            if (p->pid == 0) continue;
            if (p->out >= 0 && p->unacked[0] < WINDOW) {
                owner[count] = p, role[count] = 0;
                fds[count++] = (struct pollfd){.fd = p->out, .events = POLLIN};
            }
            if (p->err >= 0 && p->unacked[1] < WINDOW) {
                owner[count] = p, role[count] = 1;
                fds[count++] = (struct pollfd){.fd = p->err, .events = POLLIN};
            }
            if (p->in >= 0 && p->pending_len > 0) {
                owner[count] = p, role[count] = 2;
                fds[count++] = (struct pollfd){.fd = p->in, .events = POLLOUT};
            }
        }
        for (int i = 0; i < MAX_FILES; i++)
            if (downloads[i].fd > 0 && downloads[i].unacked < WINDOW) busy = 1;
        if (poll(fds, (nfds_t)count, busy ? 0 : -1) < 0 && errno != EINTR) sleep(1);
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(children, &info, sizeof info) > 0) {}
            reap();
        }
        for (int i = 2; i < count; i++) {
            if (fds[i].revents == 0) continue;
            struct proc *p = owner[i];
            if (p->pid == 0) continue;  /* finished earlier in this round */
            if (role[i] == 2) flush_stdin(p);
            else if ((role[i] == 0 ? p->out : p->err) == fds[i].fd) read_output(p, role[i]);
        }
        for (int i = 0; i < MAX_FILES; i++)
            if (downloads[i].fd > 0 && downloads[i].unacked < WINDOW) send_download(&downloads[i]);
        if (fds[0].revents & POLLIN) read_port();
        else if (fds[0].revents & (POLLHUP | POLLERR)) usleep(100000);
    }
}

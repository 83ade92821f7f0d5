/* virtio-blk's request loop in C: the same checks and results as queue.py's parse_chain,
   block.py's parse_request and _execute, and cow.py's CowDisk, for IN and OUT requests (and the
   malformed and unsupported ones); a FLUSH or GET_ID is left in the ring for the Python device.
   smol_blk_serve also waits for the driver's notifications and decides its interrupts (queue.py's
   enable_notification and needs_interrupt), so that Python runs only to raise an interrupt.

   Everything the guest wrote (ring entries, descriptors, headers) is copied into locals once
   (read_once: volatile, so the compiler cannot load it again after the check) and checked there.
   Built by smolvmm/devices/virtio/blk_native.py. Its system calls are those of the Python path,
   which the jail's seccomp filter allows (preadv2, pwritev, poll, read). */
#ifndef _GNU_SOURCE /* for preadv2; Python's headers define it first */
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio's rings are little endian, and so is every host smolvmm runs on"
#endif

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define SECTOR 512
#define CLUSTER 4096
#define BITMAP_PAGE 4096
#define MAX_QUEUE 256
#define MAX_DATA (254ull << 20) /* block.py's MAX_DATA: seg_max x size_max */
#define MAX_IOV (MAX_QUEUE + 2) /* a chain's buffers, and a copy-up's head and tail */

/* cdef: what Python sees (blk_native.py hands the text from here to "cdef end" to cffi) */
struct smol_region { uint64_t gpa, size; uint8_t *host; };
typedef struct smol_blk {
    const struct smol_region *regions;
    uint32_t nregions;
    uint64_t desc_addr, avail_addr, used_addr;
    uint32_t size;
    int indirect;
    uint16_t next_avail, next_used, signalled_used;
    int event_idx;
    int notify_fd, stop_fd, wake_fd;
    int interrupt_due;
    int base_fd, overlay_fd, read_only;
    uint64_t disk_size, capacity_sectors, data_offset;
    uint8_t *bitmap, *dirty;
    int stop;
    uint32_t io_errors;
    int io_errno;
    char error[200];
} smol_blk;
int smol_blk_serve(smol_blk *b);
/* cdef end */

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct chain { struct iovec readable[MAX_QUEUE], writable[MAX_QUEUE]; uint32_t nreadable, nwritable; };

/* The QueueError text, as printf formats it; returns -1. */
__attribute__((format(printf, 2, 3))) static int fail(smol_blk *b, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(b->error, sizeof b->error, format, args);
    va_end(args);
    return -1;
}

/* GuestMemory.view: the region holding gpa (or ending at it, for an empty range) must hold it all. */
static uint8_t *guest(const smol_blk *b, uint64_t gpa, uint64_t len) {
    for (uint32_t i = 0; i < b->nregions; i++) {
        const struct smol_region *r = &b->regions[i];
        uint64_t end = r->gpa + r->size;
        if ((r->gpa <= gpa && gpa < end) || (len == 0 && gpa == end)) {
            if (len > end - gpa) return NULL;
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

static void read_once(void *into, const uint8_t *guest_bytes, size_t n) {
    const volatile uint8_t *from = guest_bytes;
    uint8_t *to = into;
    for (size_t i = 0; i < n; i++) to[i] = from[i];
}

/* parse_chain, with its messages. */
static int walk(smol_blk *b, uint16_t head, struct chain *c) {
    c->nreadable = c->nwritable = 0;
    if (head >= b->size) return fail(b, "descriptor head %u is beyond the queue size %u", head, b->size);
    const uint8_t *table = guest(b, b->desc_addr, (uint64_t)b->size * 16);
    if (!table)
        return fail(b, "descriptor table 0x%" PRIx64 "+0x%" PRIx64 " is outside guest RAM", b->desc_addr,
                    (uint64_t)b->size * 16);
    uint64_t table_size = b->size, index = head;
    uint32_t ttl = b->size;
    int in_indirect = 0;
    for (;;) {
        uint8_t raw[16];
        struct desc d;
        read_once(raw, table + index * 16, 16);
        memcpy(&d.addr, raw, 8);
        memcpy(&d.len, raw + 8, 4);
        memcpy(&d.flags, raw + 12, 2);
        memcpy(&d.next, raw + 14, 2);
        if (d.flags & DESC_F_INDIRECT) {
            if (in_indirect) return fail(b, "nested indirect descriptor table");
            if (!b->indirect) return fail(b, "indirect descriptor without VIRTIO_F_INDIRECT_DESC");
            if (d.flags & DESC_F_NEXT) return fail(b, "indirect descriptor also has NEXT set");
            if (d.len == 0 || d.len % 16) return fail(b, "indirect table length %u is not a multiple of 16", d.len);
            table = guest(b, d.addr, d.len);
            if (!table) return fail(b, "indirect table 0x%" PRIx64 "+0x%x is outside guest RAM", d.addr, d.len);
            table_size = d.len / 16;
            index = 0;
            in_indirect = 1;
            continue;
        }
        if (ttl == 0) return fail(b, "descriptor chain is longer than the queue size %u (a loop?)", b->size);
        ttl--;
        uint8_t *host = guest(b, d.addr, d.len);
        if (!host) return fail(b, "buffer 0x%" PRIx64 "+0x%x is outside guest RAM", d.addr, d.len);
        struct iovec v = {host, d.len};
        if (d.flags & DESC_F_WRITE) {
            c->writable[c->nwritable++] = v;
        } else if (c->nwritable) {
            return fail(b, "device-readable descriptor after a device-writable one");
        } else {
            c->readable[c->nreadable++] = v;
        }
        if (!(d.flags & DESC_F_NEXT)) return 0;
        if (d.next >= table_size)
            return fail(b, "next descriptor %u is beyond its table (%" PRIu64 ")", d.next, table_size);
        index = d.next;
    }
}

static uint64_t iov_length(const struct iovec *v, uint32_t n) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) total += v[i].iov_len;
    return total;
}

/* buffers.slice_views: the pieces of v[0..n) covering bytes start .. start+length, appended to out. */
static uint32_t slice(const struct iovec *v, uint32_t n, uint64_t start, uint64_t length, struct iovec *out,
                      uint32_t used) {
    for (uint32_t i = 0; i < n && length; i++) {
        if (start >= v[i].iov_len) { start -= v[i].iov_len; continue; }
        uint64_t part = v[i].iov_len - start;
        if (part > length) part = length;
        out[used].iov_base = (uint8_t *)v[i].iov_base + start;
        out[used].iov_len = part;
        used++;
        length -= part;
        start = 0;
    }
    return used;
}

/* All of v[0..n) at offset, through preadv2 or pwritev, however short each call comes back;
   a call that moves nothing (the image ended early, or a full device) is EIO. */
static int transfer_all(int fd, struct iovec *v, uint32_t n, uint64_t offset, int write) {
    uint64_t left = iov_length(v, n);
    while (left) {
        ssize_t done = write ? pwritev(fd, v, (int)n, (off_t)offset) : preadv2(fd, v, (int)n, (off_t)offset, 0);
        if (done < 0 && errno == EINTR) continue;
        if (done < 0) return -1;
        if (done == 0) { errno = EIO; return -1; }
        offset += (uint64_t)done;
        left -= (uint64_t)done;
        while (n && (uint64_t)done >= v->iov_len) { done -= (ssize_t)v->iov_len; v++; n--; }
        if (n) { v->iov_base = (uint8_t *)v->iov_base + done; v->iov_len -= (size_t)done; }
    }
    return 0;
}

static int mapped(const smol_blk *b, uint64_t cluster) { return b->bitmap[cluster >> 3] >> (cluster & 7) & 1; }

/* The end of the run of clusters that share ``start``'s placement (CowDisk._runs), at most ``end``. */
static uint64_t run_end(const smol_blk *b, uint64_t start, uint64_t end, int *in_overlay) {
    if (b->overlay_fd < 0) { *in_overlay = 0; return end; }
    uint64_t cluster = start / CLUSTER;
    *in_overlay = mapped(b, cluster);
    uint64_t stop = (cluster + 1) * CLUSTER;
    while (stop < end && mapped(b, stop / CLUSTER) == *in_overlay) stop += CLUSTER;
    return stop < end ? stop : end;
}

static int read_disk(smol_blk *b, const struct iovec *data, uint32_t n, uint64_t offset, uint64_t length) {
    struct iovec piece[MAX_IOV];
    for (uint64_t start = offset; start < offset + length;) {
        int in_overlay;
        uint64_t stop = run_end(b, start, offset + length, &in_overlay);
        uint32_t count = slice(data, n, start - offset, stop - start, piece, 0);
        int fd = in_overlay ? b->overlay_fd : b->base_fd;
        if (transfer_all(fd, piece, count, in_overlay ? b->data_offset + start : start, 0)) return -1;
        start = stop;
    }
    return 0;
}

static int pread_all(int fd, uint8_t *into, uint64_t length, uint64_t offset) {
    struct iovec v = {into, length};
    return length ? transfer_all(fd, &v, 1, offset, 0) : 0;
}

/* CowDisk.write_from: into the overlay, a cluster met for the first time copied up whole. */
static int write_disk(smol_blk *b, const struct iovec *data, uint32_t n, uint64_t offset, uint64_t length) {
    struct iovec piece[MAX_IOV];
    uint8_t head[CLUSTER], tail[CLUSTER];
    for (uint64_t start = offset; start < offset + length;) {
        int in_overlay;
        uint64_t stop = run_end(b, start, offset + length, &in_overlay);
        if (in_overlay) {
            uint32_t count = slice(data, n, start - offset, stop - start, piece, 0);
            if (transfer_all(b->overlay_fd, piece, count, b->data_offset + start, 1)) return -1;
        } else {
            uint64_t first = start / CLUSTER * CLUSTER;
            uint64_t last = (stop + CLUSTER - 1) / CLUSTER * CLUSTER;
            if (last > b->disk_size) last = b->disk_size;
            if (last < stop) { errno = EIO; return -1; } /* past the disk: execute() checked, never trusted */
            if (pread_all(b->base_fd, head, start - first, first)) return -1;
            if (pread_all(b->base_fd, tail, last - stop, stop)) return -1;
            piece[0] = (struct iovec){head, start - first};
            uint32_t count = slice(data, n, start - offset, stop - start, piece, 1);
            piece[count++] = (struct iovec){tail, last - stop};
            if (transfer_all(b->overlay_fd, piece, count, b->data_offset + first, 1)) return -1;
            for (uint64_t cluster = first / CLUSTER; cluster < (last + CLUSTER - 1) / CLUSTER; cluster++) {
                b->bitmap[cluster >> 3] |= (uint8_t)(1 << (cluster & 7));
                b->dirty[(cluster >> 3) / BITMAP_PAGE] = 1;
            }
        }
        start = stop;
    }
    return 0;
}

/* parse_request and _execute: the status for the request, and the data bytes it gave the guest.
   Returns 1 (and does nothing) for the requests the Python device serves. */
static int execute(smol_blk *b, struct chain *c, uint8_t *status, uint32_t *written) {
    struct iovec data[MAX_QUEUE];
    uint32_t ndata = 0;
    uint8_t header[16];
    uint64_t got = 0;
    *written = 0;
    for (uint32_t i = 0; i < c->nreadable && got < 16; i++) {
        uint64_t part = c->readable[i].iov_len < 16 - got ? c->readable[i].iov_len : 16 - got;
        read_once(header + got, c->readable[i].iov_base, part);
        got += part;
    }
    if (got < 16) { *status = S_IOERR; return 0; }
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    if (type == T_FLUSH || type == T_GET_ID) return 1;
    if (type != T_IN && type != T_OUT) { *status = S_UNSUPP; return 0; }
    if (type == T_IN) { /* the device-writable bytes but the status byte */
        for (uint32_t i = 0; i < c->nwritable; i++)
            if (c->writable[i].iov_len) data[ndata++] = c->writable[i];
        data[ndata - 1].iov_len--;
    } else {
        ndata = slice(c->readable, c->nreadable, 16, iov_length(c->readable, c->nreadable), data, 0);
    }
    uint64_t length = iov_length(data, ndata);
    if (length % SECTOR || length > MAX_DATA || sector > b->capacity_sectors ||
        length > (b->capacity_sectors - sector) * SECTOR) {
        *status = S_IOERR;
        return 0;
    }
    if (type == T_OUT && b->read_only) { *status = S_IOERR; return 0; }
    int failed = type == T_IN ? read_disk(b, data, ndata, sector * SECTOR, length)
                              : write_disk(b, data, ndata, sector * SECTOR, length);
    if (failed) {
        b->io_errors++;
        b->io_errno = errno;
        *status = S_IOERR;
        return 0;
    }
    *status = S_OK;
    *written = type == T_IN ? (uint32_t)length : 0;
    return 0;
}

/* The available and used rings in host memory; -1 when they are not sound (``error`` says why). */
static int rings(smol_blk *b, uint8_t **avail, uint8_t **used) {
    /* Queue.validate checked all this when the queue became ready, and the addresses cannot change
       until a reset (mmio.py); checked again, as nothing from the guest is trusted here. */
    if (b->size == 0 || b->size > MAX_QUEUE || (b->size & (b->size - 1)))
        return fail(b, "queue size is not a power of two <= 256");
    if (b->desc_addr % 16 || b->avail_addr % 2 || b->used_addr % 4) return fail(b, "the rings are misaligned");
    *avail = guest(b, b->avail_addr, 6 + 2 * (uint64_t)b->size);
    *used = guest(b, b->used_addr, 6 + 8 * (uint64_t)b->size);
    if (!*avail || !*used) return fail(b, "the rings are outside guest RAM");
    return 0;
}

/* Serve up to a queue's worth of available requests from the rings ``rings`` found: 0 when the
   ring is empty, the batch is done or ``stop`` was set; 1 when the next request is one for the
   Python device (left in the ring); -1 when the ring is malformed (``error`` says how). */
static int run(smol_blk *b, uint8_t *avail, uint8_t *used) {
    for (uint32_t round = 0; round < b->size && !__atomic_load_n(&b->stop, __ATOMIC_RELAXED); round++) {
        uint16_t index = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
        uint16_t count = (uint16_t)(index - b->next_avail);
        if (count > b->size)
            return fail(b, "available index ran %u entries ahead of a %u-entry queue", count, b->size);
        if (count == 0) return 0;
        uint16_t head;
        read_once(&head, avail + 4 + 2 * (b->next_avail % b->size), 2);
        struct chain c;
        if (walk(b, head, &c)) { b->next_avail++; return -1; }
        uint8_t *status = NULL;
        for (uint32_t i = c.nwritable; i-- > 0;)
            if (c.writable[i].iov_len) { status = (uint8_t *)c.writable[i].iov_base + c.writable[i].iov_len - 1; break; }
        if (!status) { b->next_avail++; return fail(b, "block request has no status byte"); }
        uint8_t result;
        uint32_t written;
        if (execute(b, &c, &result, &written)) return 1;
        b->next_avail++;
        *status = result;
        if (__atomic_load_n(&b->stop, __ATOMIC_RELAXED)) return 0; /* a reset: the driver has forgotten this ring */
        uint8_t *element = used + 4 + 8 * (b->next_used % b->size);
        uint32_t id = head, length = written + 1;
        memcpy(element, &id, 4);
        memcpy(element + 4, &length, 4);
        b->next_used++;
        __atomic_store_n((uint16_t *)(used + 2), b->next_used, __ATOMIC_RELEASE);
    }
    return 0;
}

/* Queue.needs_interrupt: whether the driver wants an interrupt for the chains used since the last
   one (VIRTQ_USED_F_NO_NOTIFY's counterpart, or EVENT_IDX's used_event). */
static int needs_interrupt(smol_blk *b, const uint8_t *avail) {
    uint16_t old = b->signalled_used;
    b->signalled_used = b->next_used;
    if (old == b->next_used) return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (b->event_idx) {
        uint16_t used_event;
        read_once(&used_event, avail + 4 + 2 * b->size, 2);
        return (uint16_t)(b->next_used - used_event - 1) < (uint16_t)(b->next_used - old);
    }
    uint16_t flags;
    read_once(&flags, avail, 2);
    return !(flags & 1);
}

/* Serve the queue until Python is needed: sleeps on notify_fd while the ring is empty (having asked
   for a notification as Queue.enable_notification does), serves what the driver makes available,
   and returns 2 when an interrupt is due (interrupt_due set), 1 when the next request is one for
   the Python device (interrupt_due says whether one is due too), 0 once stop_fd or wake_fd is
   readable or ``stop`` is set, -1 when the ring is malformed (``error`` says how). */
int smol_blk_serve(smol_blk *b) {
    uint8_t *avail = NULL, *used = NULL; /* set by rings(); gcc cannot see that through fail() */
    b->interrupt_due = 0;
    if (rings(b, &avail, &used)) return -1;
    for (;;) {
        if (__atomic_load_n(&b->stop, __ATOMIC_RELAXED)) return 0;
        if (b->event_idx) { /* avail_event: notify when the driver goes past what was taken */
            uint16_t event = b->next_avail;
            memcpy(used + 4 + 8 * b->size, &event, 2);
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int empty = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE) == b->next_avail;
        /* Asleep when the ring is empty; between batches, a look at stop_fd without waiting. */
        struct pollfd fds[3] = {{b->stop_fd, POLLIN, 0}, {b->wake_fd, POLLIN, 0}, {b->notify_fd, POLLIN, 0}};
        int ready = poll(fds, 3, empty ? -1 : 0);
        if (ready < 0 && errno != EINTR) return fail(b, "waiting for the driver failed: %s", strerror(errno));
        if (ready > 0 && (fds[0].revents || fds[1].revents)) return 0;
        if (ready > 0 && fds[2].revents) {
            uint64_t count;
            if (read(b->notify_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                return fail(b, "reading the notification failed: %s", strerror(errno));
        }
        if (empty) continue;
        int outcome = run(b, avail, used);
        if (outcome < 0) return -1;
        b->interrupt_due = needs_interrupt(b, avail);
        if (outcome == 1) return 1;
        if (b->interrupt_due) return 2;
    }
}

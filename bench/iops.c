/* Random 4 KiB direct reads or writes at a fixed queue depth, through Linux AIO: the guest side of
 * bench_guest.py's IOPS measure (the default guest has busybox only; this is built static).
 *
 * usage: iops DEVICE read|write DEPTH COUNT
 * Issues COUNT requests at offsets spread over the whole device, DEPTH of them in flight at a time,
 * and prints "COUNT ios in SECONDS s" (the guest's clock; the bench times it on the host too).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_DEPTH 256

static aio_context_t context;
static struct iocb requests[MAX_DEPTH];
static uint64_t seed = 0x9e3779b97f4a7c15u;

static uint64_t next_random(void) {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

static int fail(const char *what) {
    perror(what);
    return 1;
}

/* Submit every request in list[0..count), however many each io_submit takes. */
static int submit(struct iocb **list, long count) {
    while (count > 0) {
        long taken = syscall(SYS_io_submit, context, count, list);
        if (taken <= 0)
            return -1;
        list += taken;
        count -= taken;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5 || (strcmp(argv[2], "read") && strcmp(argv[2], "write"))) {
        fprintf(stderr, "usage: iops DEVICE read|write DEPTH COUNT\n");
        return 2;
    }
    int writing = strcmp(argv[2], "write") == 0;
    long depth = atol(argv[3]), count = atol(argv[4]);
    if (depth < 1 || depth > MAX_DEPTH || count < depth) {
        fprintf(stderr, "iops: DEPTH must be 1-%d and COUNT at least DEPTH\n", MAX_DEPTH);
        return 2;
    }
    int fd = open(argv[1], (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        return fail(argv[1]);
    off_t blocks = lseek(fd, 0, SEEK_END) / BLOCK;
    if (blocks < 1)
        return fail("device size");
    char *buffers;
    if (posix_memalign((void **)&buffers, BLOCK, depth * BLOCK))
        return fail("posix_memalign");
    memset(buffers, 0x5a, depth * BLOCK);
    if (syscall(SYS_io_setup, depth, &context))
        return fail("io_setup");

    struct iocb *list[MAX_DEPTH];
    struct io_event events[MAX_DEPTH];
    struct timespec began, ended;
    clock_gettime(CLOCK_MONOTONIC, &began);
    for (long slot = 0; slot < depth; slot++) {
        struct iocb *request = &requests[slot];
        request->aio_fildes = fd;
        request->aio_lio_opcode = writing ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        request->aio_buf = (uint64_t)(uintptr_t)(buffers + slot * BLOCK);
        request->aio_nbytes = BLOCK;
        request->aio_offset = (next_random() % blocks) * BLOCK;
        list[slot] = request;
    }
    if (submit(list, depth))
        return fail("io_submit");
    long submitted = depth, done = 0;
    while (done < count) {
        long got = syscall(SYS_io_getevents, context, 1, depth, events, NULL);
        if (got < 0)
            return fail("io_getevents");
        long again = 0;
        for (long i = 0; i < got; i++) {
            struct iocb *request = (struct iocb *)(uintptr_t)events[i].obj;
            if (events[i].res != BLOCK) {
                fprintf(stderr, "iops: a request ended with %lld\n", (long long)events[i].res);
                return 1;
            }
            done++;
            if (submitted < count) {
                request->aio_offset = (next_random() % blocks) * BLOCK;
                list[again++] = request;
                submitted++;
            }
        }
        if (submit(list, again))
            return fail("io_submit");
    }
    clock_gettime(CLOCK_MONOTONIC, &ended);
    double seconds = (ended.tv_sec - began.tv_sec) + (ended.tv_nsec - began.tv_nsec) / 1e9;
    printf("%ld ios in %.3f s\n", done, seconds);
    return 0;
}

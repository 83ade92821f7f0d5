/* Direct reads or writes at a fixed queue depth, through Linux AIO: the guest side of bench_guest.py's
 * disk measures (the default guest has busybox only; this is built static).
 *
 * usage: iops DEVICE read|write DEPTH COUNT [random|sequential [KIB]]
 * Issues COUNT requests of KIB KiB (default 4), DEPTH of them in flight at a time, at offsets spread
 * over the whole device (random, the default) or one after another from its start, wrapping at its
 * end (sequential); prints "COUNT ios in SECONDS s" (the guest's clock; the bench times it on the
 * host too).
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

#define PAGE 4096
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

static long block = 4096;
static off_t blocks, next_block;
static int sequential;

/* Where the next request goes. */
static off_t next_offset(void) {
    if (!sequential)
        return (off_t)(next_random() % blocks) * block;
    off_t at = next_block * block;
    next_block = (next_block + 1) % blocks;
    return at;
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
    if (argc < 5 || argc > 7 || (strcmp(argv[2], "read") && strcmp(argv[2], "write")) ||
        (argc > 5 && strcmp(argv[5], "random") && strcmp(argv[5], "sequential"))) {
        fprintf(stderr, "usage: iops DEVICE read|write DEPTH COUNT [random|sequential [KIB]]\n");
        return 2;
    }
    sequential = argc > 5 && strcmp(argv[5], "sequential") == 0;
    if (argc > 6)
        block = atol(argv[6]) * 1024;
    if (block < PAGE || block % PAGE || block > (64L << 20)) {
        fprintf(stderr, "iops: KIB must be a multiple of 4, at most 65536\n");
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
    blocks = lseek(fd, 0, SEEK_END) / block;
    if (blocks < 1)
        return fail("device size");
    char *buffers;
    if (posix_memalign((void **)&buffers, PAGE, depth * block))
        return fail("posix_memalign");
    memset(buffers, 0x5a, depth * block);
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
        request->aio_buf = (uint64_t)(uintptr_t)(buffers + slot * block);
        request->aio_nbytes = block;
        request->aio_offset = next_offset();
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
            if (events[i].res != block) {
                fprintf(stderr, "iops: a request ended with %lld\n", (long long)events[i].res);
                return 1;
            }
            done++;
            if (submitted < count) {
                request->aio_offset = next_offset();
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

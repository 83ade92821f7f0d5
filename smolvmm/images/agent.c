/*
 * smolvmm guest agent: keeps a resumed guest's wall clock and RNG right.
 *
 * A bundle resumes at the instant it was saved, and every instance resumes the same RNG
 * state. On each resume the monitor writes one line to the agent's virtio console port:
 *
 *     sync <unix seconds> <nanoseconds> <64 hex digits of fresh host entropy> [<ifname>=<12 hex digits>]...\n
 *
 * and the agent sets CLOCK_REALTIME, credits the entropy to the kernel's input pool
 * (RNDADDENTROPY), forces the CRNG to reseed from it (RNDRESEEDCRNG), gives each named network
 * interface its new MAC address (a clone asked for its own), and answers "ok\n".
 * Usage: smolvmm-agent /dev/hvcN
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define ENTROPY_BYTES 32

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

static int sync_guest(char *line)
{
    long long seconds;
    long nanoseconds;
    char hex[2 * ENTROPY_BYTES + 1];
    struct {
        struct rand_pool_info info;
        unsigned char bytes[ENTROPY_BYTES];
    } entropy;

    int consumed = 0;
    if (sscanf(line, "sync %lld %ld %64s%n", &seconds, &nanoseconds, hex, &consumed) != 3)
        return -1;
    if (parse_hex(hex, entropy.bytes, ENTROPY_BYTES) != 0) return -1;
    struct timespec now = {.tv_sec = seconds, .tv_nsec = nanoseconds};
    if (clock_settime(CLOCK_REALTIME, &now) != 0) return -1;
    int random = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (random < 0) return -1;
    entropy.info.entropy_count = 8 * ENTROPY_BYTES;
    entropy.info.buf_size = ENTROPY_BYTES;
    int ok = ioctl(random, RNDADDENTROPY, &entropy) == 0 && ioctl(random, RNDRESEEDCRNG) == 0;
    close(random);
    for (char *token = strtok(line + consumed, " "); token != NULL; token = strtok(NULL, " "))
        if (set_mac(token) != 0) ok = 0;
    return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: smolvmm-agent /dev/hvcN\n");
        return 2;
    }
    int port = open(argv[1], O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (port < 0) {
        perror(argv[1]);
        return 1;
    }
    struct termios raw;
    if (tcgetattr(port, &raw) == 0) {  /* an hvc port is a tty: no echo, no line editing */
        cfmakeraw(&raw);
        tcsetattr(port, TCSANOW, &raw);
    }
    char line[256];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(port, line + used, sizeof line - 1 - used);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            sleep(1);
            continue;
        }
        used += (size_t)n;
        char *end;
        while ((end = memchr(line, '\n', used)) != NULL) {
            *end = '\0';
            const char *answer = sync_guest(line) == 0 ? "ok\n" : "error\n";
            if (write(port, answer, strlen(answer)) < 0) break;
            used -= (size_t)(end + 1 - line);
            memmove(line, end + 1, used);
        }
        if (used == sizeof line - 1) used = 0;  /* an over-long line is dropped */
    }
}

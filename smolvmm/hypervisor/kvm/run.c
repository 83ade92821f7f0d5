/* The vCPU loop's native part (vcpu.py): KVM_RUN again and again while each exit is an access to
 * a register backed by a shared word (host/words.py), served here without Python or its lock;
 * any other exit returns to Python. A 4-byte read of a READ word's address returns the word; a
 * 4-byte write to a CLEAR word's address clears the bits written (virtio-mmio's InterruptStatus
 * and InterruptACK, two exits per interrupt the guest takes). */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* cdef: */
struct smol_word_register {
    uint64_t gpa;
    uint32_t *word;
    int clears; /* 0: reads return the word; 1: writes clear the bits written */
};
int smol_vcpu_run(int fd, void *run, const struct smol_word_register *registers, int count);
/* cdef end */

/* The exit reason for Python, or -errno when KVM_RUN failed (EINTR: interrupted). */
int smol_vcpu_run(int fd, void *page, const struct smol_word_register *registers, int count)
{
    struct kvm_run *run = page;
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.len != 4)
            return (int)run->exit_reason;
        const struct smol_word_register *r = registers;
        const struct smol_word_register *end = registers + count;
        while (r < end && (r->gpa != run->mmio.phys_addr || r->clears != !!run->mmio.is_write))
            r++;
        if (r == end)
            return (int)run->exit_reason;
        uint32_t value;
        if (r->clears) {
            memcpy(&value, run->mmio.data, sizeof value);
            __atomic_fetch_and(r->word, ~value, __ATOMIC_SEQ_CST);
        } else {
            value = __atomic_load_n(r->word, __ATOMIC_SEQ_CST);
            memcpy(run->mmio.data, &value, sizeof value);
        }
    }
}

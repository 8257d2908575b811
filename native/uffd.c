/* SPDX-License-Identifier: MIT
 *
 * uffd.c - copy-on-write of whole huge-page blocks in user space, with a
 * userfaultfd write-protect handler. See thpguard.h ("copy regions") for
 * the contract and docs/copy.rst for the mechanism, costs and limits.
 *
 * One handler thread per process owns every registered region. At fork
 * the parent write-protects its regions before fork() returns (prepare
 * handler); the child, whose VMAs lose the registration (no
 * UFFD_FEATURE_EVENT_FORK), makes a userfaultfd of its own, registers and
 * protects the same regions and starts its own handler thread, all in the
 * at-fork child handler, before any of its code runs. A write to a
 * protected PMD-mapped block then faults before the kernel splits it; the
 * handler copies the block into a pre-faulted huge page from a pool and
 * puts that page in place (UFFDIO_MOVE, or mremap where there is no
 * UFFDIO_MOVE), which wakes every thread waiting on the block.
 */
#define _GNU_SOURCE
#include "thpguard.h"
#include "thpguard_testing.h"
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif

/* uapi linux/userfaultfd.h, defined here because build hosts may have older
 * headers (Debian 12's lack UFFDIO_MOVE, 6.8). */
#define U_API 0xAAULL
#define U_USER_MODE_ONLY 1
#define U_FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#define U_FEATURE_MOVE (1ULL << 16)
#define U_MODE_MISSING (1ULL << 0)
#define U_MODE_WP (1ULL << 1)
#define U_WP_MODE_WP (1ULL << 0)
#define U_WP_MODE_DONTWAKE (1ULL << 1)
#define U_EVENT_PAGEFAULT 0x12
#define U_PF_WRITE (1ULL << 0)
#define U_PF_WP (1ULL << 1)
#define U_IOC_WRITEPROTECT 0x06

struct u_api { uint64_t api, features, ioctls; };
struct u_range { uint64_t start, len; };
struct u_register { struct u_range range; uint64_t mode, ioctls; };
struct u_writeprotect { struct u_range range; uint64_t mode; };
struct u_zeropage { struct u_range range; uint64_t mode; int64_t zeropage; };
struct u_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct u_move { uint64_t dst, src, len, mode; int64_t move; };
struct u_msg {
    uint8_t event, reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags, address; uint32_t ptid; } pagefault;
        struct { uint64_t reserved[3]; } reserved;
    } arg;
} __attribute__((packed));

#define U_IOC_API _IOWR(0xAA, 0x3F, struct u_api)
#define U_IOC_REGISTER _IOWR(0xAA, 0x00, struct u_register)
#define U_IOC_UNREGISTER _IOR(0xAA, 0x01, struct u_range)
#define U_IOC_WAKE _IOR(0xAA, 0x02, struct u_range)
#define U_IOC_COPY _IOWR(0xAA, 0x03, struct u_copy)
#define U_IOC_ZEROPAGE _IOWR(0xAA, 0x04, struct u_zeropage)
#define U_IOC_MOVE _IOWR(0xAA, 0x05, struct u_move)
#define U_IOC_WP _IOWR(0xAA, 0x06, struct u_writeprotect)
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)

#define PM_MMAP_EXCLUSIVE (1ULL << 56)
#define PM_PRESENT (1ULL << 63)

struct copy_region {
    uintptr_t addr;
    size_t len;
};

/* Everything below belongs to this process; the at-fork child handler
 * rebuilds it in the child. life_lock (taken first) serialises starting
 * and stopping the handler; op_lock guards the state the handler uses. */
static pthread_mutex_t life_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t op_lock = PTHREAD_MUTEX_INITIALIZER;
static struct copy_region regions[TG_MAX_COPY_REGIONS];
static size_t n_regions;
static int uffd = -1;
static int pagemap_fd = -1;
static int method;            /* TG_COPY_MOVE, TG_COPY_REMAP, TG_COPY_COLLAPSE */
static int forced_method;     /* tg_copy_set_method; 0: best available */
static size_t block = 2UL << 20;
static int handler_running;
static pthread_t handler_tid;
static int stop_fd = -1;      /* eventfd: wakes the handler; it exits if stopping */
static int stopping;          /* set under op_lock before stop_fd is written */
static _Atomic int arm_errno;
/* 1 once the handler thread reaches its poll loop (a futex word): a child's
 * at-fork handler waits for it, at most child_ready_wait_us, so the child's
 * first write does not wait for a thread that has never run; and in a
 * build with AddressSanitizer every fork's prepare handler waits for it, at
 * most FORK_READY_WAIT_US, so no child is forked while the thread is still
 * starting (tg__copy_prepare). */
static _Atomic int handler_ready;
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TG_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(TG_ASAN)
/* Long: the start includes the pool's prefill, and the hang recurred once
 * at load 8 with a 1 s bound; a fork that goes ahead too early can hang
 * its child. */
#define FORK_READY_WAIT_US 30000000u
#else
#define FORK_READY_WAIT_US 0u  /* glibc's malloc and thread start are fork-safe */
#endif
static unsigned child_ready_wait_us = 50000;
static unsigned refill_delay_ms = 1;
static cpu_set_t handler_mask;
static int pinned_first_run;

/* Pre-faulted huge pages, taken by the handler and refilled by it when no
 * fault is waiting, so the fault path neither allocates nor zeroes. Only
 * the handler thread touches the pool while it runs (the child's at-fork
 * handler before it starts, stop_handler after it ended). One
 * mapping (MADV_DONTFORK: children make their own), one slot per block.
 * At most pool_target blocks are kept, and never more than the registered
 * regions have blocks; a child's new handler thread fills child_prefill of
 * them first thing, before it polls (the at-fork handler waits for that,
 * at most child_ready_wait_us), and the rest once the child has taken a
 * block (pool_active). */
static char *pool;
static size_t pool_slots;
static unsigned char pool_ready[TG_COPY_POOL_MAX];
static size_t pool_target = 4;
static size_t registered_blocks;
static size_t child_prefill = 1;
static size_t prefill_pending;  /* blocks a child's handler fills before it polls */
static int pool_active;       /* 0 in a child until it first takes a block */

static struct tg_copy_stats stats;
#define COUNT(field) __atomic_fetch_add(&stats.field, 1, __ATOMIC_RELAXED)

static size_t page_size(void)
{
    static size_t page;
    if (!page)
        page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A userfaultfd that also handles faults taken in kernel mode (read() into
 * the region): the syscall needs CAP_SYS_PTRACE or
 * vm.unprivileged_userfaultfd=1; /dev/userfaultfd (5.11) needs only access
 * to the device. Never UFFD_USER_MODE_ONLY: kernel-mode writes would get
 * EFAULT. */
static int open_uffd(int *how)
{
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
        if (how)
            *how = 1;
        return (int)fd;
    }
    int saved = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        int dev_err = errno;
        close(dev);
        if (fd >= 0) {
            if (how)
                *how = 2;
            return (int)fd;
        }
        (void)dev_err;  /* the syscall's errno says more (EPERM, ENOSYS) */
    }
    errno = saved;
    return -1;
}

static int uffd_api(int fd, uint64_t *features)
{
    struct u_api api = {.api = U_API,
                        .features = U_FEATURE_PAGEFAULT_FLAG_WP};
    if (ioctl(fd, U_IOC_API, &api) != 0)
        return -1;
    *features = api.features;
    return 0;
}

int tg_copy_probe(struct tg_copy_probe *out)
{
    memset(out, 0, sizeof(*out));
    int fd = open_uffd(&out->source);
    if (fd < 0) {
        out->stage = TG_PROBE_OPEN;
        out->err = errno;
        /* Would a user-mode-only fd have worked? Then say so: it is refused
         * because kernel-mode writes into the region would fail. */
        long um = syscall(SYS_userfaultfd, O_CLOEXEC | U_USER_MODE_ONLY);
        if (um >= 0) {
            out->user_mode_only = 1;
            close((int)um);
        }
        return 0;
    }
    uint64_t features = 0;
    if (uffd_api(fd, &features) != 0) {
        out->stage = TG_PROBE_API;
        out->err = errno;
        close(fd);
        return 0;
    }
    out->features = features;
    out->has_move = (features & U_FEATURE_MOVE) != 0;
    /* Write-protect on anonymous memory (5.7), tried on a real huge block. */
    size_t len = block;
    void *addr;
    if (tg_map_aligned(len, len, &addr) != 0) {
        out->stage = TG_PROBE_WP;
        out->err = errno;
        close(fd);
        return 0;
    }
    madvise(addr, len, TG_MADV_HUGEPAGE);
    *(volatile char *)addr = 1;
    struct u_register reg = {.range = {(uintptr_t)addr, len},
                             .mode = U_MODE_WP | U_MODE_MISSING};
    struct u_writeprotect wp = {.range = {(uintptr_t)addr, len}, .mode = U_WP_MODE_WP};
    if (ioctl(fd, U_IOC_REGISTER, &reg) != 0 || ioctl(fd, U_IOC_WP, &wp) != 0) {
        out->stage = TG_PROBE_WP;
        out->err = errno;
    } else {
        out->stage = TG_PROBE_OK;
        out->has_move = out->has_move && (reg.ioctls & (1ULL << 0x05)) != 0;
        /* The handler tells a whole huge block from a split one with
         * PAGEMAP_SCAN (6.7); without it every write would fall back. */
        int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        struct tg_page_region vec[1];
        size_t n;
        uint64_t walk_end;
        if (pm < 0 || tg_pagemap_scan(pm, (uintptr_t)addr, (uintptr_t)addr + len,
                                      TG_PAGE_IS_HUGE, vec, 1, &n, &walk_end) != 0) {
            out->stage = TG_PROBE_SCAN;
            out->err = errno;
        }
        if (pm >= 0)
            close(pm);
    }
    close(fd);  /* drops the registration and the protection */
    munmap(addr, len);
    return 0;
}

/* ---- pool ---------------------------------------------------------------- */

static int block_is_huge(uintptr_t addr)
{
    uint64_t huge = 0, present = 0;
    if (pagemap_fd < 0 || tg_huge_bytes(pagemap_fd, addr, addr + block, &huge, &present) != 0)
        return 0;
    return huge == block;
}

/* How many blocks the pool can hold for the registered regions. */
static size_t pool_cap(void)
{
    return registered_blocks < pool_target ? registered_blocks : pool_target;
}

/* How many blocks the handler keeps ready now: none in a child that has
 * not written yet (its prefilled block waits for the first write; a child
 * that only reads, or execs, zeroes no more). */
static size_t pool_want(void)
{
    return pool_active ? pool_cap() : 0;
}

static size_t pool_count(void)
{
    size_t n = 0;
    for (size_t i = 0; pool && i < pool_slots; i++)
        n += pool_ready[i];
    return n;
}

static void pool_free(void)
{
    if (pool)
        munmap(pool - page_size(), pool_slots * block + page_size());  /* with its marker */
    pool = NULL;
    pool_slots = 0;
    memset(pool_ready, 0, sizeof(pool_ready));
}

/* Name the page below the pool (TG_COPY_POOL_MARKER): the pool is 8 MiB
 * of advised, PMD-mapped anonymous memory that an operator would otherwise
 * take for a leak. Without a memfd (no fd left) the page stays a plain
 * inaccessible one: only the label is lost. */
static void pool_mark(char *below, size_t pool_len)
{
    /* By hand, not snprintf: the fault path gets here when the pool is
     * empty, and must not take a lock (locale, malloc) fork could leave held. */
    char name[64] = TG_COPY_POOL_MARKER, digits[24];
    size_t n = 0, at = sizeof(TG_COPY_POOL_MARKER) - 1;
    do
        digits[n++] = (char)('0' + pool_len % 10);
    while ((pool_len /= 10) != 0);
    while (n)
        name[at++] = digits[--n];
    name[at] = '\0';
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd >= 0) {
        mmap(below, page_size(), PROT_NONE, MAP_SHARED | MAP_FIXED, fd, 0);
        close(fd);
    } else {
        mprotect(below, page_size(), PROT_NONE);
    }
    /* Children make their own pool: the marker stays with this one. */
    madvise(below, page_size(), TG_MADV_DONTFORK);
}

static int pool_map(void)
{
    /* One block more than the pool, aligned: the pool starts a block in,
     * and the last page of the block below it is the marker. */
    size_t len = pool_target * block;
    char *p;
    if (tg_map_aligned(len + block, block, (void **)&p) != 0)
        return -1;
    munmap(p, block - page_size());
    pool_mark(p + block - page_size(), len);
    p += block;
    madvise(p, len, TG_MADV_HUGEPAGE);
    madvise(p, len, TG_MADV_DONTFORK);
    pool = p;
    pool_slots = pool_target;
    memset(pool_ready, 0, sizeof(pool_ready));
    return 0;
}

/* Fault one empty slot in as a huge page (zeroed by the kernel here, off the
 * fault path). 1 if a slot was filled, 0 if none was empty. */
static int pool_refill_one(void)
{
    if (!pool && pool_map() != 0)
        return 0;
    for (size_t i = 0; i < pool_slots; i++) {
        if (pool_ready[i])
            continue;
        char *slot = pool + i * block;
        if (method == TG_COPY_REMAP) {
            /* The slot was moved away by mremap: map it again. */
            void *p = mmap(slot, block, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (p == MAP_FAILED)
                return 0;
            madvise(slot, block, TG_MADV_HUGEPAGE);
            madvise(slot, block, TG_MADV_DONTFORK);
        }
        if (tg_populate_write(slot, block, 4096) != 0)
            return 0;
        if (!block_is_huge((uintptr_t)slot)) {
            /* Fragmented memory: compact and try once more. */
            madvise(slot, block, TG_MADV_COLLAPSE);
            if (!block_is_huge((uintptr_t)slot)) {
                madvise(slot, block, MADV_DONTNEED);
                return 0;
            }
        }
        pool_ready[i] = 1;
        return 1;
    }
    return 0;
}

static int pool_full(void)
{
    return pool_count() >= pool_want();
}

/* A ready slot, or NULL: then one is made in the fault path (counted). */
static char *pool_take(size_t *slot_out)
{
    pool_active = 1;
    for (int pass = 0; pass < 2; pass++) {
        if (pool) {
            for (size_t i = 0; i < pool_slots; i++) {
                if (pool_ready[i]) {
                    *slot_out = i;
                    return pool + i * block;
                }
            }
        }
        if (pass == 0) {
            COUNT(inline_allocs);
            if (!pool_refill_one())
                return NULL;
        }
    }
    return NULL;
}

/* ---- regions ------------------------------------------------------------- */

static struct copy_region *find_region(uintptr_t addr)
{
    for (size_t i = 0; i < n_regions; i++)
        if (addr >= regions[i].addr && addr < regions[i].addr + regions[i].len)
            return &regions[i];
    return NULL;
}

static int register_range(int fd, uintptr_t addr, size_t len)
{
    struct u_register reg = {.range = {addr, len}, .mode = U_MODE_WP};
    if (method == TG_COPY_MOVE)
        /* UFFDIO_MOVE needs the block empty for a moment: a reader then
         * must wait for the handler instead of mapping the zero page. */
        reg.mode |= U_MODE_MISSING;
    return ioctl(fd, U_IOC_REGISTER, &reg);
}

static int protect_range(int fd, uintptr_t addr, size_t len, int on)
{
    struct u_writeprotect wp = {.range = {addr, len}, .mode = on ? U_WP_MODE_WP : 0};
    return ioctl(fd, U_IOC_WP, &wp);
}

/* Protect the PMD-mapped parts of [addr, addr+len) only: a split block
 * stays unprotected (its writes copy 4 KiB, as it is split already), since
 * MADV_COLLAPSE refuses a range with write-protected small pages (EINVAL)
 * and the guard could not repair it. Empty parts take missing faults. */
static int protect_huge(int fd, int pm, uintptr_t addr, size_t len)
{
    struct tg_page_region vec[64];
    uintptr_t at = addr, end = addr + len;
    int rc = 0;
    while (at < end) {
        size_t n;
        uint64_t walk_end;
        if (pm < 0 || tg_pagemap_scan(pm, at, end, TG_PAGE_IS_HUGE, vec, 64, &n, &walk_end) != 0)
            return protect_range(fd, at, end - at, 1);
        for (size_t i = 0; i < n; i++)
            if ((vec[i].categories & TG_PAGE_IS_HUGE)
                && protect_range(fd, vec[i].start, vec[i].end - vec[i].start, 1) != 0)
                rc = -1;
        if (walk_end <= at)
            break;
        at = walk_end;
    }
    return rc;
}

static void wake_range(uintptr_t addr, size_t len)
{
    struct u_range r = {addr, len};
    ioctl(uffd, U_IOC_WAKE, &r);
}

/* ---- fault handling (handler thread, op_lock held) ----------------------- */

/* The kernel's own COW for this block: unprotect and wake. The writer's
 * fault then splits the block, as without thpguard; the guard repairs. */
static void fall_back(uintptr_t blk)
{
    COUNT(cow_fallbacks);
    protect_range(uffd, blk, block, 0);
}

static int block_exclusive(uintptr_t blk)
{
    uint64_t entry = 0;
    if (pagemap_fd < 0
        || pread(pagemap_fd, &entry, sizeof(entry), (off_t)(blk / 4096 * 8)) != sizeof(entry))
        return 0;
    return (entry & PM_PRESENT) && (entry & PM_MMAP_EXCLUSIVE);
}

static uint64_t block_categories(uintptr_t blk, uint64_t *huge, uint64_t *written)
{
    struct tg_page_region vec[8];
    size_t n = 0;
    uint64_t walk_end, present = 0;
    *huge = *written = 0;
    if (tg_pagemap_scan(pagemap_fd, blk, blk + block,
                        TG_PAGE_IS_PRESENT | TG_PAGE_IS_HUGE | TG_PAGE_IS_WRITTEN,
                        vec, 8, &n, &walk_end) != 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t bytes = vec[i].end - vec[i].start;
        if (vec[i].categories & TG_PAGE_IS_PRESENT)
            present += bytes;
        if (vec[i].categories & TG_PAGE_IS_HUGE)
            *huge += bytes;
        if (vec[i].categories & TG_PAGE_IS_WRITTEN)
            *written += bytes;
    }
    return present;
}

static void resolve_write(uintptr_t blk)
{
    uint64_t huge, written;
    uint64_t present = block_categories(blk, &huge, &written);
    if (present == block && written == block) {
        /* Another waiter's fault on this block was resolved already. */
        wake_range(blk, block);
        return;
    }
    if (present != block || huge != block) {
        /* Split or partly empty (MADV_DONTNEED of part of it): there is no
         * whole huge page to copy. */
        fall_back(blk);
        return;
    }
    if (block_exclusive(blk)) {
        /* The other side has its own copy or is gone: the kernel reuses
         * the page on this write, without a copy or a split. */
        COUNT(reuses);
        protect_range(uffd, blk, block, 0);
        return;
    }
    uint64_t t0 = now_ns();
    if (tg_fault_take(TG_FAULT_COPY_BLOCK)) {
        fall_back(blk);
        return;
    }
    if (method == TG_COPY_COLLAPSE) {
        /* Measured alternative: the kernel copies into a new huge page. */
        struct u_writeprotect wp = {.range = {blk, block}, .mode = U_WP_MODE_DONTWAKE};
        ioctl(uffd, U_IOC_WP, &wp);
        /* One written byte makes the kernel split the block (4 KiB copied);
         * the collapse then copies the rest into a new huge page. */
        __atomic_fetch_add((volatile char *)blk, 0, __ATOMIC_RELAXED);
        if (madvise((void *)blk, block, TG_MADV_COLLAPSE) != 0)
            COUNT(cow_fallbacks);
        else
            COUNT(copies);
        wake_range(blk, block);
        __atomic_fetch_add(&stats.copy_ns, now_ns() - t0, __ATOMIC_RELAXED);
        return;
    }
    size_t slot;
    char *fresh = pool_take(&slot);
    if (!fresh) {
        fall_back(blk);
        return;
    }
    memcpy(fresh, (void *)blk, block);
    if (method == TG_COPY_REMAP) {
        void *moved = mremap(fresh, block, block, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)blk);
        pool_ready[slot] = 0;
        if (moved == MAP_FAILED) {
            fall_back(blk);
            return;
        }
        /* The block is a VMA of its own now, without the registration. */
        register_range(uffd, blk, block);
        wake_range(blk, block);
    } else {
        /* A reader in the gap takes a missing fault and waits for the move
         * (registered MODE_MISSING); writers are waiting already. */
        madvise((void *)blk, block, MADV_DONTNEED);
        struct u_move mv = {.dst = blk, .src = (uintptr_t)fresh, .len = block};
        int rc = ioctl(uffd, U_IOC_MOVE, &mv);
        pool_ready[slot] = 0;
        if (rc != 0) {
            /* The data is in `fresh` still (a move moves all or nothing of
             * a huge page): put it back in small pages, which the guard can
             * collapse later. */
            struct u_copy cp = {.dst = blk, .src = (uintptr_t)fresh, .len = block};
            ioctl(uffd, U_IOC_COPY, &cp);
            madvise(fresh, block, MADV_DONTNEED);
            COUNT(cow_fallbacks);
            wake_range(blk, block);
            return;
        }
    }
    COUNT(copies);
    __atomic_fetch_add(&stats.copy_ns, now_ns() - t0, __ATOMIC_RELAXED);
}

/* A read or write of memory that is not there (never touched, or dropped
 * with MADV_DONTNEED): a zeroed huge page if the whole block is empty. */
static void resolve_missing(uintptr_t addr)
{
    uintptr_t blk = addr & ~(uintptr_t)(block - 1);
    uint64_t huge, written;
    uint64_t present = block_categories(blk, &huge, &written);
    if (present == 0) {
        size_t slot;
        char *fresh = pool_take(&slot);
        if (fresh) {
            struct u_move mv = {.dst = blk, .src = (uintptr_t)fresh, .len = block};
            int rc = ioctl(uffd, U_IOC_MOVE, &mv);
            if (rc == 0 || errno != EEXIST) {
                pool_ready[slot] = 0;
                if (rc == 0) {
                    COUNT(missing_fills);
                    return;
                }
            }
        }
    }
    struct u_zeropage zp = {.range = {addr & ~(uintptr_t)4095, 4096}};
    if (ioctl(uffd, U_IOC_ZEROPAGE, &zp) != 0)
        wake_range(addr & ~(uintptr_t)4095, 4096);
}

static void handle(const struct u_msg *msg)
{
    if (msg->event != U_EVENT_PAGEFAULT)
        return;
    uintptr_t addr = (uintptr_t)msg->arg.pagefault.address;
    uintptr_t blk = addr & ~(uintptr_t)(block - 1);
    pthread_mutex_lock(&op_lock);
    if (!find_region(addr)) {
        /* Closed meanwhile: unregistering woke the waiter already. */
        pthread_mutex_unlock(&op_lock);
        return;
    }
    if (msg->arg.pagefault.flags & U_PF_WP) {
        COUNT(wp_faults);
        resolve_write(blk);
    } else {
        COUNT(missing_faults);
        resolve_missing(addr);
    }
    pthread_mutex_unlock(&op_lock);
}

static void *handler_main(void *arg)
{
    (void)arg;
    struct u_msg msgs[16];
    /* uffd and stop_fd stay open until this thread has been joined. */
    int fd = uffd;
    struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    int refill_failed = 0, after_fault = 0;
    /* A child's first blocks, before the first poll: with the at-fork
     * handler waiting for this thread, before the child's code runs. */
    for (; prefill_pending && pool_count() < pool_cap(); prefill_pending--)
        if (!pool_refill_one())
            break;
    prefill_pending = 0;
    for (;;) {
        pthread_mutex_lock(&op_lock);
        int idle_work = !stopping && !pool_full();
        pthread_mutex_unlock(&op_lock);
        if (!atomic_load(&handler_ready)) {
            atomic_store(&handler_ready, 1);
            syscall(SYS_futex, &handler_ready, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            if (pinned_first_run) {
                pinned_first_run = 0;
                pthread_setaffinity_np(pthread_self(), sizeof(handler_mask), &handler_mask);
            }
        }
        /* A refill that failed (no huge page to be had) is tried again
         * 100 ms later, not in a busy loop. Right after a fault the refill
         * waits refill_delay_ms for the next fault: the writer just woken
         * runs first, instead of waiting for a CPU while this thread
         * zeroes a block (milliseconds on a busy host). */
        int n = poll(pfd, 2, !idle_work ? -1 : refill_failed ? 100
                             : after_fault ? (int)refill_delay_ms : 0);
        if (n == 0)
            after_fault = 0;
        if (n < 0 && errno != EINTR)
            break;
        if (n > 0 && (pfd[1].revents & POLLIN)) {
            uint64_t count;
            if (read(stop_fd, &count, sizeof(count)) < 0)
                count = 0;  /* EAGAIN: another wake-up drained it */
            pthread_mutex_lock(&op_lock);
            int stop = stopping;
            pthread_mutex_unlock(&op_lock);
            if (stop)
                break;  /* the last region closed: tg_copy_unregister joins us */
            continue;   /* a region was added: the pool may hold more now */
        }
        if (n == 0 && idle_work) {
            /* Without op_lock: only this thread touches the pool while it
             * runs, and a fork (whose prepare handler takes op_lock) must
             * not wait for a refill, which can take milliseconds when the
             * CPUs are busy and this thread is not scheduled. */
            refill_failed = !pool_refill_one();
            continue;
        }
        if (n <= 0 || !(pfd[0].revents & POLLIN))
            continue;
        ssize_t got = read(fd, msgs, sizeof(msgs));
        if (got < 0)
            continue;
        for (ssize_t i = 0; i < got / (ssize_t)sizeof(msgs[0]); i++)
            handle(&msgs[i]);
        after_fault = 1;
    }
    return NULL;
}

static int start_handler(int pin)
{
    stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stop_fd < 0)
        return -1;
    stopping = 0;
    atomic_store(&handler_ready, 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    /* A child's new thread first runs on this thread's CPU, which this
     * thread leaves free as it waits for it (wait_handler_ready): placed
     * elsewhere on a busy host, the new thread waited for a CPU there
     * (measured at load 8 on 2 CPUs, 100 forks: 90th percentile of the wait
     * 6.7 ms, against 0.46 ms so). It takes back this thread's CPU mask
     * once it is ready. Only when this thread waits: else the new one
     * would wait for it to block. */
    if (pin && sched_getaffinity(0, sizeof(handler_mask), &handler_mask) == 0) {
        int cpu = sched_getcpu();
        cpu_set_t one;
        CPU_ZERO(&one);
        if (cpu >= 0) {
            CPU_SET(cpu, &one);
            if (pthread_attr_setaffinity_np(&attr, sizeof(one), &one) == 0)
                pinned_first_run = 1;
        }
    }
    sigset_t all, old;
    sigfillset(&all);
    /* Signals go to the application's threads, never to the handler. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&handler_tid, &attr, handler_main, NULL);
    if (rc != 0 && pinned_first_run) {
        /* The placement is an optimisation, never a condition: where the
         * affinity cannot be set (a seccomp filter, a cpuset), start the
         * thread without it. */
        pinned_first_run = 0;
        pthread_attr_destroy(&attr);
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 << 10);
        rc = pthread_create(&handler_tid, &attr, handler_main, NULL);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        close(stop_fd);
        stop_fd = -1;
        pinned_first_run = 0;
        errno = rc;
        return -1;
    }
    handler_running = 1;
    return 0;
}

static int choose_method(uint64_t features, uint64_t register_ioctls)
{
    (void)register_ioctls;
    if (forced_method)
        return forced_method;
    return (features & U_FEATURE_MOVE) ? TG_COPY_MOVE : TG_COPY_REMAP;
}

/* Make this process's userfaultfd, pagemap fd and handler (op_lock held). */
static int ensure_handler(void)
{
    if (uffd >= 0 && handler_running)
        return 0;
    uint64_t features;
    int fd = open_uffd(NULL);
    if (fd < 0)
        return -1;
    if (uffd_api(fd, &features) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    method = choose_method(features, 0);
    if (method == TG_COPY_MOVE && !(features & U_FEATURE_MOVE)) {
        close(fd);
        errno = EOPNOTSUPP;
        return -1;
    }
    if (pagemap_fd < 0)
        pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap_fd < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    uffd = fd;
    pool_active = 1;  /* the process that made the region fills its pool now */
    if (start_handler(0) != 0) {
        int saved = errno;
        close(fd);
        uffd = -1;
        errno = saved;
        return -1;
    }
    return 0;
}

int tg_copy_register(void *addr, size_t len, size_t block_size)
{
    uintptr_t a = (uintptr_t)addr;
    if (len == 0 || block_size == 0 || (block_size & (block_size - 1)) != 0
        || (a & (block_size - 1)) != 0 || (len & (block_size - 1)) != 0) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&life_lock);
    pthread_mutex_lock(&op_lock);
    int rc = -1;
    if (n_regions && block_size != block) {
        errno = EINVAL;
    } else if (n_regions == TG_MAX_COPY_REGIONS) {
        errno = ENOSPC;
    } else if (find_region(a) || find_region(a + len - 1)) {
        errno = EEXIST;
    } else {
        block = block_size;
        if (ensure_handler() == 0 && register_range(uffd, a, len) == 0) {
            regions[n_regions].addr = a;
            regions[n_regions].len = len;
            n_regions++;
            registered_blocks += len / block;
            rc = 0;
            /* Wake a handler that sleeps with a full pool: its cap grew. */
            uint64_t one = 1;
            if (stop_fd >= 0 && write(stop_fd, &one, sizeof(one)) != sizeof(one))
                rc = 0;  /* the counter is saturated: a wake-up is pending anyway */
        }
    }
    pthread_mutex_unlock(&op_lock);
    pthread_mutex_unlock(&life_lock);
    return rc;
}

/* The last region closed: stop the handler thread, close the userfaultfd
 * and give the pool back (life_lock held, op_lock not). The next
 * tg_copy_register starts them again. */
static void stop_handler(void)
{
    pthread_mutex_lock(&op_lock);
    int running = handler_running && n_regions == 0;
    if (running) {
        stopping = 1;
        uint64_t one = 1;
        if (write(stop_fd, &one, sizeof(one)) != sizeof(one))
            running = 0;  /* cannot happen with a fresh eventfd; keep it */
    }
    pthread_mutex_unlock(&op_lock);
    if (!running)
        return;
    pthread_join(handler_tid, NULL);
    pthread_mutex_lock(&op_lock);
    handler_running = 0;
    stopping = 0;
    close(stop_fd);
    stop_fd = -1;
    close(uffd);
    uffd = -1;
    close(pagemap_fd);
    pagemap_fd = -1;
    pool_free();
    pthread_mutex_unlock(&op_lock);
}

int tg_copy_unregister(void *addr)
{
    uintptr_t a = (uintptr_t)addr;
    int rc = -1;
    /* Waits for a copy in progress on this region: the caller may unmap. */
    pthread_mutex_lock(&life_lock);
    pthread_mutex_lock(&op_lock);
    errno = ENOENT;
    for (size_t i = 0; i < n_regions; i++) {
        if (regions[i].addr != a)
            continue;
        struct u_range r = {a, regions[i].len};
        /* Wakes every thread waiting on the range; their faults retry
         * without us. Fails only if the range is unmapped already. */
        ioctl(uffd, U_IOC_UNREGISTER, &r);
        registered_blocks -= regions[i].len / block;
        regions[i] = regions[--n_regions];
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&op_lock);
    if (rc == 0 && n_regions == 0)
        stop_handler();
    pthread_mutex_unlock(&life_lock);
    return rc;
}

int tg_copy_arm(void)
{
    int rc = 0;
    pthread_mutex_lock(&op_lock);
    for (size_t i = 0; i < n_regions; i++)
        if (protect_huge(uffd, pagemap_fd, regions[i].addr, regions[i].len) != 0)
            rc = -1;
    pthread_mutex_unlock(&op_lock);
    return rc;
}

int tg_copy_stats(struct tg_copy_stats *out)
{
    pthread_mutex_lock(&op_lock);
    *out = stats;
    out->regions = n_regions;
    out->method = n_regions || uffd >= 0 ? method : 0;
    out->arm_errno = atomic_load(&arm_errno);
    out->pool_ready = 0;
    for (size_t i = 0; pool && i < pool_slots; i++)
        out->pool_ready += pool_ready[i];
    pthread_mutex_unlock(&op_lock);
    return 0;
}

int tg_copy_set_method(int m)
{
    if (m < 0 || m > TG_COPY_COLLAPSE) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&op_lock);
    int rc = 0;
    if (uffd >= 0) {
        errno = EBUSY;  /* regions are registered for the current method */
        rc = -1;
    } else {
        forced_method = m;
    }
    pthread_mutex_unlock(&op_lock);
    return rc;
}

int tg_copy_set_pool(size_t blocks)
{
    if (blocks == 0 || blocks > TG_COPY_POOL_MAX) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&op_lock);
    int rc = 0;
    if (pool) {
        errno = EBUSY;
        rc = -1;
    } else {
        pool_target = blocks;
    }
    pthread_mutex_unlock(&op_lock);
    return rc;
}

int tg_copy_set_child_prefill(size_t blocks)
{
    if (blocks > TG_COPY_POOL_MAX) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&op_lock);
    child_prefill = blocks;
    pthread_mutex_unlock(&op_lock);
    return 0;
}

/* Called by tg_collapse before MADV_COLLAPSE: the kernel refuses small
 * pages that carry the write-protect marker (EINVAL), which a block split
 * while protected (a partial mprotect or MADV_DONTNEED) keeps until each
 * page is written. A split block needs no protection (a write to it copies
 * 4 KiB whatever happens), so the marker goes first. */
void tg__copy_unprotect_split(uintptr_t addr, size_t len)
{
    pthread_mutex_lock(&op_lock);
    for (size_t i = 0; uffd >= 0 && i < n_regions; i++) {
        uintptr_t lo = regions[i].addr > addr ? regions[i].addr : addr;
        uintptr_t end = regions[i].addr + regions[i].len;
        uintptr_t hi = end < addr + len ? end : addr + len;
        for (uintptr_t blk = lo & ~(uintptr_t)(block - 1); blk < hi; blk += block)
            if (!block_is_huge(blk))
                protect_range(uffd, blk, block, 0);
    }
    pthread_mutex_unlock(&op_lock);
}

int tg_copy_set_child_ready_wait(unsigned microseconds)
{
    pthread_mutex_lock(&op_lock);
    child_ready_wait_us = microseconds;
    pthread_mutex_unlock(&op_lock);
    return 0;
}

int tg_copy_set_refill_delay(unsigned milliseconds)
{
    if (milliseconds > 1000) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&op_lock);
    refill_delay_ms = milliseconds;
    pthread_mutex_unlock(&op_lock);
    return 0;
}

/* ---- fork (called from thpguard.c's pthread_atfork handlers) ------------- */

/* Wait (a futex, no sleep) until the new handler thread polls, at most
 * `limit_us`. Its first run (stack, TLS, a CPU to run on) and the child's
 * first pool block then happen before the child's code, not inside the
 * child's first write fault. On timeout the child goes on: its first
 * write then waits for the thread. */
static void wait_handler_ready(unsigned limit_us)
{
    uint64_t deadline = now_ns() + (uint64_t)limit_us * 1000;
    while (!atomic_load(&handler_ready)) {
        uint64_t t = now_ns();
        if (t >= deadline)
            return;
        struct timespec left = {.tv_sec = (time_t)((deadline - t) / 1000000000ULL),
                                .tv_nsec = (long)((deadline - t) % 1000000000ULL)};
        syscall(SYS_futex, &handler_ready, FUTEX_WAIT_PRIVATE, 0, &left, NULL, 0);
    }
}

void tg__copy_prepare(void)
{
    /* Waits for a copy in progress; held until fork() returns, so the
     * handler cannot change a block while the child gets its page tables.
     * life_lock first: a fork never sees the handler half stopped. */
    pthread_mutex_lock(&life_lock);
    pthread_mutex_lock(&op_lock);
    if (FORK_READY_WAIT_US && handler_running && !atomic_load(&handler_ready)) {
        /* The handler thread is still starting (stack, TLS), and
         * AddressSanitizer's runtime (GCC 12's has no fork handlers) may
         * hold its allocator's lock there: a child forked now inherits it
         * held, and the child's first thread start hangs (seen in the
         * sanitized test_uwsgi_workers_are_repaired[fork-from-c]: uWSGI
         * forks its workers from C right after the app made its first copy
         * region). Let it reach its first poll. It takes op_lock on the
         * way, so op_lock is let go meanwhile (life_lock, kept, stops an
         * unregister from stopping it). After FORK_READY_WAIT_US the fork
         * goes ahead. Not in other builds: glibc makes malloc and a
         * thread's start safe across fork, and the wait would make the
         * first fork after a first copy region wait for a CPU for the new
         * thread on a busy host (8.6x a later fork at load 6). */
        pthread_mutex_unlock(&op_lock);
        wait_handler_ready(FORK_READY_WAIT_US);
        pthread_mutex_lock(&op_lock);
    }
    if (uffd < 0)
        return;
    for (size_t i = 0; i < n_regions; i++)
        if (protect_huge(uffd, pagemap_fd, regions[i].addr, regions[i].len) != 0)
            atomic_store(&arm_errno, errno);
}

void tg__copy_parent(void)
{
    pthread_mutex_unlock(&op_lock);
    pthread_mutex_unlock(&life_lock);
}

void tg__copy_child(void)
{
    uint64_t t0 = now_ns();
    /* The lock was taken by the forking thread, which is this one: a fresh
     * lock is the same thing without relying on the owner check. */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    op_lock = fresh;
    life_lock = fresh;
    pool_active = 0;
    if (pagemap_fd >= 0)
        close(pagemap_fd);  /* reads the parent's mm, not ours */
    pagemap_fd = -1;
    if (uffd < 0)
        return;
    /* The parent's fds, pool and handler are the parent's (a write to its
     * stop_fd would stop the parent's handler). */
    close(uffd);
    uffd = -1;
    if (stop_fd >= 0)
        close(stop_fd);
    stop_fd = -1;
    stopping = 0;
    handler_running = 0;
    pool = NULL;  /* MADV_DONTFORK: not mapped here */
    pool_slots = 0;
    memset(pool_ready, 0, sizeof(pool_ready));
    memset(&stats, 0, sizeof(stats));
    atomic_store(&arm_errno, 0);
    if (n_regions == 0)
        return;
    if (tg_fault_take(TG_FAULT_COPY_ARM)) {
        atomic_store(&arm_errno, errno);
        return;
    }
    int fd = open_uffd(NULL);
    uint64_t features;
    if (fd < 0 || uffd_api(fd, &features) != 0) {
        atomic_store(&arm_errno, errno ? errno : EIO);
        if (fd >= 0)
            close(fd);
        return;
    }
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uffd = fd;
    for (size_t i = 0; i < n_regions; i++) {
        if (register_range(fd, regions[i].addr, regions[i].len) != 0
            || protect_huge(fd, pagemap_fd, regions[i].addr, regions[i].len) != 0) {
            atomic_store(&arm_errno, errno);
            break;
        }
    }
    /* A first write right after fork finds a block ready: the new handler
     * fills it before it polls (zeroing 2 MiB, milliseconds on memory not
     * touched lately), then the rest of the pool after the first write. */
    prefill_pending = child_prefill;
    if (pagemap_fd < 0 || atomic_load(&arm_errno) || start_handler(child_ready_wait_us != 0) != 0) {
        if (!atomic_load(&arm_errno))
            atomic_store(&arm_errno, errno ? errno : EIO);
        /* Without a handler a protected write would wait forever: closing
         * the fd drops every registration and protection. */
        close(fd);
        uffd = -1;
        return;
    }
    uint64_t t1 = now_ns();
    if (child_ready_wait_us)
        wait_handler_ready(child_ready_wait_us);
    stats.ready_wait_ns = now_ns() - t1;
    stats.arm_ns = now_ns() - t0;
}

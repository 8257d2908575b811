/* SPDX-License-Identifier: MIT
 *
 * thpguard.c - the native core: mapping, madvise, PAGEMAP_SCAN, chunked
 * MADV_COLLAPSE, copy-and-remap, at-fork bookkeeping and fault injection.
 * See thpguard.h for the contract.
 */
#define _GNU_SOURCE
#include "thpguard.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif
#ifndef PR_SET_THP_DISABLE
#define PR_SET_THP_DISABLE 41
#define PR_GET_THP_DISABLE 42
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif

/* uapi linux/fs.h (6.7); defined here because build hosts may have older
 * kernel headers (Debian 12's lack it). */
struct tg_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
#define TG_PAGEMAP_SCAN _IOWR('f', 16, struct tg_pm_scan_arg)

/* ---- fault injection ---------------------------------------------------- */

static _Atomic int fault_errno[TG_FAULT_NOPS];
static _Atomic int fault_count[TG_FAULT_NOPS];
static _Thread_local int fault_suspended;

void tg_fault_suspend(int suspend)
{
    fault_suspended = suspend;
}

int tg_fault_inject(int op, int err, int count)
{
    if (op < 0 || op >= TG_FAULT_NOPS || err < 0 || count < 0) {
        errno = EINVAL;
        return -1;
    }
    atomic_store(&fault_errno[op], err);
    atomic_store(&fault_count[op], count);
    return 0;
}

void tg_fault_clear(void)
{
    for (int op = 0; op < TG_FAULT_NOPS; op++)
        atomic_store(&fault_count[op], 0);
}

/* 1 (with errno set) when an injected fault consumes this call of `op`. */
static int fault_take(int op)
{
    if (fault_suspended)
        return 0;
    int n = atomic_load(&fault_count[op]);
    while (n > 0) {
        if (atomic_compare_exchange_weak(&fault_count[op], &n, n - 1)) {
            errno = atomic_load(&fault_errno[op]);
            return 1;
        }
    }
    return 0;
}

int tg_fault_take(int op)
{
    if (op < 0 || op >= TG_FAULT_NOPS)
        return 0;
    return fault_take(op) ? errno : 0;
}

/* ---- mapping ------------------------------------------------------------ */

int tg_map_aligned(size_t size, size_t align, void **out)
{
    if (size == 0 || align == 0 || (align & (align - 1)) != 0
        || size > SIZE_MAX - align) {
        errno = EINVAL;
        return -1;
    }
    /* munmap of the tail needs a page-aligned start: round the size up. */
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (size > SIZE_MAX - align - page) {
        errno = ENOMEM;
        return -1;
    }
    size = (size + page - 1) & ~(page - 1);
    if (fault_take(TG_FAULT_MAP))
        return -1;
    size_t span = size + align;
    char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return -1;
    uintptr_t base = ((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1);
    size_t head = base - (uintptr_t)raw;
    size_t tail = span - head - size;
    if (head)
        munmap(raw, head);
    if (tail)
        munmap((char *)base + size, tail);
    *out = (void *)base;
    return 0;
}

int tg_unmap(void *addr, size_t size)
{
    return munmap(addr, size);
}

int tg_madvise(void *addr, size_t len, int advice)
{
    return madvise(addr, len, advice);
}

int tg_advice_known(int advice, int *known)
{
    /* Any page-aligned address will do: with length 0 the kernel validates
     * the advice and returns before looking at the range. */
    static char probe[1] __attribute__((aligned(4096)));
    if (madvise(probe, 0, advice) == 0) {
        *known = 1;
        return 0;
    }
    if (errno == EINVAL) {
        *known = 0;
        return 0;
    }
    return -1;
}

int tg_populate_write(void *addr, size_t len, size_t page_size)
{
    if (page_size == 0) {
        errno = EINVAL;
        return -1;
    }
    if (madvise(addr, len, TG_MADV_POPULATE_WRITE) == 0)
        return 0;
    int saved = errno, known = 1;
    /* EINVAL from a kernel older than 5.14 means the advice is unknown;
     * any other failure is real. */
    if (saved != EINVAL || tg_advice_known(TG_MADV_POPULATE_WRITE, &known) != 0
        || known) {
        errno = saved;
        return -1;
    }
    for (size_t off = 0; off < len; off += page_size)
        __atomic_fetch_add((unsigned char *)addr + off, 0, __ATOMIC_RELAXED);
    return 0;
}

/* ---- split detection ---------------------------------------------------- */

int tg_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end,
                    uint64_t return_mask, struct tg_page_region *vec,
                    size_t vec_len, size_t *n_out, uint64_t *walk_end)
{
    if (fault_take(TG_FAULT_SCAN))
        return -1;
    struct tg_pm_scan_arg arg;
    memset(&arg, 0, sizeof(arg));
    arg.size = sizeof(arg);
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vec_len;
    arg.return_mask = return_mask;
    int n = ioctl(pagemap_fd, TG_PAGEMAP_SCAN, &arg);
    if (n < 0)
        return -1;
    *n_out = (size_t)n;
    *walk_end = arg.walk_end;
    return 0;
}

int tg_huge_bytes(int pagemap_fd, uint64_t start, uint64_t end,
                  uint64_t *huge, uint64_t *present)
{
    struct tg_page_region vec[64];
    uint64_t at = start;
    *huge = 0;
    *present = 0;
    while (at < end) {
        size_t n;
        uint64_t walk_end;
        if (tg_pagemap_scan(pagemap_fd, at, end,
                            TG_PAGE_IS_PRESENT | TG_PAGE_IS_HUGE,
                            vec, 64, &n, &walk_end) != 0)
            return -1;
        for (size_t i = 0; i < n; i++) {
            uint64_t bytes = vec[i].end - vec[i].start;
            if (vec[i].categories & TG_PAGE_IS_PRESENT)
                *present += bytes;
            if (vec[i].categories & TG_PAGE_IS_HUGE)
                *huge += bytes;
        }
        if (walk_end <= at)
            break;
        at = walk_end;
    }
    return 0;
}

/* ---- repair ------------------------------------------------------------- */

int tg_collapse(void *addr, size_t len, size_t chunk, unsigned max_retries,
                int *chunk_errno, size_t n_chunks)
{
    if (chunk == 0) {
        errno = EINVAL;
        return -1;
    }
    int last_err = 0;
    size_t i = 0;
    for (size_t off = 0; off < len; off += chunk, i++) {
        size_t this_len = len - off < chunk ? len - off : chunk;
        int err = 0;
        for (unsigned attempt = 0;; attempt++) {
            int rc;
            if (fault_take(TG_FAULT_COLLAPSE))
                rc = -1;
            else
                rc = madvise((char *)addr + off, this_len, TG_MADV_COLLAPSE);
            if (rc == 0) {
                err = 0;
                break;
            }
            err = errno;
            /* EAGAIN: a page was transiently pinned, locked or off the LRU
             * (mm/khugepaged.c SCAN_PAGE_* results); worth another try. */
            if (err != EAGAIN || attempt >= max_retries)
                break;
            sched_yield();
        }
        if (chunk_errno && i < n_chunks)
            chunk_errno[i] = err;
        if (err)
            last_err = err;
    }
    if (last_err) {
        errno = last_err;
        return -1;
    }
    return 0;
}

int tg_pidfd_open(pid_t pid, int *fd)
{
    long rc = syscall(SYS_pidfd_open, pid, 0);
    if (rc < 0)
        return -1;
    *fd = (int)rc;
    return 0;
}

int tg_process_madvise(int pidfd, const uint64_t *addrs, const uint64_t *lens,
                       size_t n, int advice, size_t *advised)
{
    struct iovec iov[64];
    size_t total = 0, done = 0;
    /* Batches of 64 stay under UIO_MAXIOV (1024) with a small stack; n == 0
     * still makes one call, which probes whether the syscall exists. */
    do {
        size_t batch = n - done < 64 ? n - done : 64;
        for (size_t i = 0; i < batch; i++) {
            iov[i].iov_base = (void *)(uintptr_t)addrs[done + i];
            iov[i].iov_len = (size_t)lens[done + i];
        }
        long rc = syscall(SYS_process_madvise, pidfd, iov, batch, advice, 0);
        if (rc < 0) {
            *advised = total;
            return -1;
        }
        total += (size_t)rc;
        done += batch;
    } while (done < n);
    *advised = total;
    return 0;
}

/* ---- fork policies ------------------------------------------------------ */

int tg_copy_remap(void *addr, size_t len, size_t align)
{
    void *fresh;
    if (tg_map_aligned(len, align, &fresh) != 0)
        return -1;
    /* Advise before the first touch so the faults below allocate PMD THPs. */
    madvise(fresh, len, TG_MADV_HUGEPAGE);
    memcpy(fresh, addr, len);
    void *moved = MAP_FAILED;
    if (!fault_take(TG_FAULT_MREMAP))
        moved = mremap(fresh, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, addr);
    if (moved == MAP_FAILED) {
        int saved = errno;
        munmap(fresh, len);
        errno = saved;
        return -1;
    }
    return 0;
}

struct placeholder {
    void *addr;
    size_t len;
};

static pthread_mutex_t placeholder_lock = PTHREAD_MUTEX_INITIALIZER;
static struct placeholder placeholders[TG_MAX_PLACEHOLDERS];
static size_t n_placeholders;

int tg_placeholder_add(void *addr, size_t len)
{
    int rc = 0;
    pthread_mutex_lock(&placeholder_lock);
    if (n_placeholders == TG_MAX_PLACEHOLDERS) {
        errno = ENOSPC;
        rc = -1;
    } else {
        placeholders[n_placeholders].addr = addr;
        placeholders[n_placeholders].len = len;
        n_placeholders++;
    }
    pthread_mutex_unlock(&placeholder_lock);
    return rc;
}

int tg_placeholder_remove(void *addr)
{
    int rc = -1;
    pthread_mutex_lock(&placeholder_lock);
    for (size_t i = 0; i < n_placeholders; i++) {
        if (placeholders[i].addr == addr) {
            placeholders[i] = placeholders[--n_placeholders];
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&placeholder_lock);
    if (rc)
        errno = ENOENT;
    return rc;
}

static _Atomic uint64_t fork_generation;

static void atfork_prepare(void)
{
    pthread_mutex_lock(&placeholder_lock);
    tg__copy_prepare();
}

static void atfork_parent(void)
{
    tg__copy_parent();
    pthread_mutex_unlock(&placeholder_lock);
}

static void atfork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
    /* Only async-signal-safe work here: mmap is a plain syscall. */
    for (size_t i = 0; i < n_placeholders; i++)
        mmap(placeholders[i].addr, placeholders[i].len, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    pthread_mutex_unlock(&placeholder_lock);
    /* Before any code of the child runs: its regions lost the parent's
     * userfaultfd registration (no UFFD_FEATURE_EVENT_FORK). */
    tg__copy_child();
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_rc;

static void atfork_register(void)
{
    atfork_rc = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

int tg_atfork_install(void)
{
    pthread_once(&atfork_once, atfork_register);
    if (atfork_rc != 0) {
        errno = atfork_rc;
        return -1;
    }
    return 0;
}

uint64_t tg_fork_generation(void)
{
    return atomic_load(&fork_generation);
}

static _Atomic uint64_t handled_generation;

int tg_fork_claim(void)
{
    uint64_t now = atomic_load(&fork_generation);
    uint64_t seen = atomic_load(&handled_generation);
    while (seen != now) {
        if (atomic_compare_exchange_weak(&handled_generation, &seen, now))
            return 1;
    }
    return 0;
}

/* ---- process switches --------------------------------------------------- */

int tg_thp_disable_get(int *value)
{
    int rc = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    if (rc < 0)
        return -1;
    *value = rc;
    return 0;
}

int tg_thp_disable_set(int disable, unsigned long flags)
{
    return prctl(PR_SET_THP_DISABLE, (unsigned long)disable, flags, 0, 0);
}

/* SPDX-License-Identifier: MIT
 *
 * thpguard.c - the native core: mapping, madvise, PAGEMAP_SCAN, chunked
 * MADV_COLLAPSE, copy-and-remap, at-fork bookkeeping and fault injection.
 * See thpguard.h for the contract.
 */
#define _GNU_SOURCE
#include "thpguard.h"
#include "thpguard_testing.h"
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
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

size_t tg_pmd_size(void)
{
    unsigned long size = 2UL << 20;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "re");
    if (f) {
        if (fscanf(f, "%lu", &size) != 1 || size == 0 || (size & (size - 1)))
            size = 2UL << 20;
        fclose(f);
    }
    return size;
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
                            TG_PAGE_IS_PRESENT | TG_PAGE_IS_HUGE | TG_PAGE_IS_PFNZERO,
                            vec, 64, &n, &walk_end) != 0)
            return -1;
        for (size_t i = 0; i < n; i++) {
            uint64_t bytes = vec[i].end - vec[i].start;
            uint64_t cats = vec[i].categories;
            if (cats & TG_PAGE_IS_PRESENT)
                *present += bytes;
            if ((cats & TG_PAGE_IS_HUGE) && (cats & TG_PAGE_IS_PRESENT)
                && !(cats & TG_PAGE_IS_PFNZERO))
                *huge += bytes;
        }
        if (walk_end <= at)
            break;
        at = walk_end;
    }
    return 0;
}

struct block_acc {
    uint64_t at;     /* start of the block being accumulated, or UINT64_MAX */
    uint64_t data;   /* bytes holding data in small pages */
    int huge;        /* PMD-mapped with data */
    int zero;        /* zero pages only so far */
};

static void block_close(struct block_acc *b, uint64_t pmd, struct tg_block_counts *out)
{
    if (b->at == UINT64_MAX)
        return;
    if (b->huge)
        out->huge++;
    else if (b->data >= pmd)
        out->split++;
    else if (b->data)
        out->partial++;
    else if (b->zero)
        out->zero++;
    b->at = UINT64_MAX;
}

int tg_block_counts(int pagemap_fd, uint64_t start, uint64_t end, uint64_t pmd,
                    struct tg_block_counts *out)
{
    struct tg_page_region vec[64];
    struct block_acc b = { UINT64_MAX, 0, 0, 0 };
    if (pmd == 0 || (pmd & (pmd - 1)) || end < start) {
        errno = EINVAL;
        return -1;
    }
    memset(out, 0, sizeof(*out));
    uint64_t first = (start + pmd - 1) & ~(pmd - 1);
    uint64_t last = end & ~(pmd - 1);
    uint64_t at = start;
    while (at < end) {
        size_t n;
        uint64_t walk_end;
        if (tg_pagemap_scan(pagemap_fd, at, end,
                            TG_PAGE_IS_PRESENT | TG_PAGE_IS_SWAPPED | TG_PAGE_IS_HUGE
                            | TG_PAGE_IS_PFNZERO,
                            vec, 64, &n, &walk_end) != 0)
            return -1;
        for (size_t i = 0; i < n; i++) {
            uint64_t cats = vec[i].categories;
            int zero = (cats & TG_PAGE_IS_PFNZERO) != 0;
            int huge = (cats & TG_PAGE_IS_HUGE) && (cats & TG_PAGE_IS_PRESENT) && !zero;
            int data = (cats & (TG_PAGE_IS_PRESENT | TG_PAGE_IS_SWAPPED)) && !zero;
            if (cats & TG_PAGE_IS_PRESENT)
                out->present_bytes += vec[i].end - vec[i].start;
            if (huge)
                out->huge_bytes += vec[i].end - vec[i].start;
            uint64_t lo = vec[i].start < first ? first : vec[i].start;
            uint64_t hi = vec[i].end > last ? last : vec[i].end;
            while (lo < hi) {
                uint64_t block = lo & ~(pmd - 1);
                uint64_t upto = block + pmd < hi ? block + pmd : hi;
                if (block != b.at) {
                    block_close(&b, pmd, out);
                    b.at = block;
                    b.data = 0;
                    b.huge = b.zero = 0;
                }
                if (huge)
                    b.huge = 1;
                else if (data)
                    b.data += upto - lo;
                else if (zero)
                    b.zero = 1;
                lo = upto;
            }
        }
        if (walk_end <= at)
            break;
        at = walk_end;
    }
    block_close(&b, pmd, out);
    uint64_t blocks = last > first ? (last - first) / pmd : 0;
    out->absent = blocks - out->huge - out->zero - out->split - out->partial;
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
    tg__copy_unprotect_split((uintptr_t)addr, len);
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

/* Copy len bytes at addr into fresh and move fresh over addr; on failure
 * fresh is unmapped and addr left untouched. */
static int copy_over(void *fresh, void *addr, size_t len)
{
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

int tg_copy_remap(void *addr, size_t len, size_t align)
{
    void *fresh;
    if (tg_map_aligned(len, align, &fresh) != 0)
        return -1;
    /* Advise before the first touch so the faults below allocate PMD THPs. */
    madvise(fresh, len, TG_MADV_HUGEPAGE);
    return copy_over(fresh, addr, len);
}

int tg_map_unmergeable(void *addr, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (len == 0 || ((uintptr_t)addr & (page - 1)) || (len & (page - 1))
        || len > SIZE_MAX - page) {
        errno = EINVAL;
        return -1;
    }
    /* A write fault gives the VMA its anon_vma (a read of the zero page does
     * not); without one, mremap resets the offset to the new address
     * (copy_vma()). The fault goes to one extra page past the range, in a
     * PMD of its own (the temporary area starts PMD-aligned), and only the
     * range is moved: the region's VMA shares the anon_vma and keeps its
     * offset, yet none of its blocks carries a page table. A page table
     * under a block (left by faulting and discarding a page inside it, and
     * carried over by mremap) makes every later fault there 4 KiB. */
    char *fresh;
    if (tg_map_aligned(len + page, tg_pmd_size(), (void **)&fresh) != 0)
        return -1;
    char *extra = fresh + len;
    if (madvise(extra, page, TG_MADV_POPULATE_WRITE) != 0)
        *(volatile char *)extra = 0;  /* before Linux 5.14 */
    if (mremap(fresh, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, addr) == MAP_FAILED) {
        int saved = errno;
        munmap(fresh, len + page);
        errno = saved;
        return -1;
    }
    munmap(extra, page);
    return 0;
}

int tg_map_flags(void *addr, size_t len, int extra_flags, void **out)
{
    if (len == 0 || (extra_flags & MAP_NORESERVE)) {
        errno = EINVAL;
        return -1;
    }
    if (fault_take(TG_FAULT_MAP))
        return -1;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | extra_flags | (addr ? MAP_FIXED : 0);
    void *p = mmap(addr, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    *out = p;
    return 0;
}

int tg_copy_remap_flags(void *addr, size_t len, int extra_flags)
{
    void *fresh;
    if (tg_map_flags(NULL, len, extra_flags, &fresh) != 0)
        return -1;
    return copy_over(fresh, addr, len);
}

struct placeholder {
    void *addr;
    size_t len;
    char name[TG_PLACEHOLDER_NAME_MAX];
};

static pthread_mutex_t placeholder_lock = PTHREAD_MUTEX_INITIALIZER;
static struct placeholder placeholders[TG_MAX_PLACEHOLDERS];
static size_t n_placeholders;

/* -- the SIGSEGV explainer -------------------------------------------------
 * A view made before fork() over a `private` region points, in the child,
 * at the PROT_NONE placeholder: touching it is a SIGSEGV by design. While
 * placeholders exist this handler names the region, the policy and what to
 * use instead, then lets the default action (or the previous handler) run.
 * Everything below runs in a signal handler: write(2), sigaction(2) and
 * plain loads only, no locks and no stdio. */

static struct sigaction segv_previous;
static int segv_installed;
static void segv_explain(int sig, siginfo_t *info, void *uctx);

struct msgbuf {
    char text[640];
    size_t len;
};

static void msg_str(struct msgbuf *m, const char *s)
{
    while (*s && m->len < sizeof m->text)
        m->text[m->len++] = *s++;
}

static void msg_num(struct msgbuf *m, uintptr_t v, unsigned base)
{
    char digits[32];
    size_t n = 0;
    if (base == 16)
        msg_str(m, "0x");
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v && n < sizeof digits);
    while (n && m->len < sizeof m->text)
        m->text[m->len++] = digits[--n];
}

static void segv_chain(int sig, siginfo_t *info, void *uctx)
{
    struct sigaction *prev = &segv_previous;
    if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction != segv_explain) {
        prev->sa_sigaction(sig, info, uctx);
    } else if (prev->sa_handler == SIG_IGN && info->si_code <= 0) {
        return; /* a sent SIGSEGV, ignored; a fault cannot be ignored (it would recur) */
    } else if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler != SIG_DFL
               && prev->sa_handler != SIG_IGN) {
        /* SIG_IGN is (void (*)(int))1: a fault under it takes the default action below. */
        prev->sa_handler(sig);
    } else {
        /* Default action: put it back; a fault re-executes the instruction
         * and dies of it (with the right core), a sent signal is re-raised. */
        signal(sig, SIG_DFL);
        if (info->si_code <= 0)
            raise(sig);
    }
}

static void segv_explain(int sig, siginfo_t *info, void *uctx)
{
    int saved = errno;
    uintptr_t at = (uintptr_t)info->si_addr;
    size_t n = n_placeholders;
    for (size_t i = 0; info->si_code > 0 && i < n && i < TG_MAX_PLACEHOLDERS; i++) {
        uintptr_t start = (uintptr_t)placeholders[i].addr;
        if (at < start || at - start >= placeholders[i].len)
            continue;
        struct msgbuf m = {.len = 0};
        msg_str(&m, "thpguard: process ");
        msg_num(&m, (uintptr_t)getpid(), 10);
        msg_str(&m, " touched the thpguard region ");
        if (placeholders[i].name[0]) {
            msg_str(&m, "'");
            msg_str(&m, placeholders[i].name);
            msg_str(&m, "' ");
        }
        msg_str(&m, "at ");
        msg_num(&m, start, 16);
        msg_str(&m, "-");
        msg_num(&m, start + placeholders[i].len, 16);
        msg_str(&m, " (fault at ");
        msg_num(&m, at, 16);
        msg_str(&m, "). Its fork policy is 'private' (MADV_DONTFORK): a child of fork() "
                    "gets only an inaccessible placeholder there, so a memoryview or array "
                    "made before fork() cannot be used in the child. For data a child reads, "
                    "allocate the region with fork='share' (or 'copy'); for a zeroed "
                    "per-process buffer, fork='wipe'. The default action of SIGSEGV follows.\n");
        const char *p = m.text;
        size_t left = m.len;
        while (left) {
            ssize_t w = write(2, p, left);
            if (w <= 0)
                break;
            p += w;
            left -= (size_t)w;
        }
        /* Returning re-executes the access, which then takes the default action. */
        signal(SIGSEGV, SIG_DFL);
        errno = saved;
        return;
    }
    errno = saved;
    segv_chain(sig, info, uctx);
}

/* What SIGSEGV does now: 1 our handler, 0 the default or ignored, -1 another handler. */
static int segv_current(void)
{
    struct sigaction now;
    if (sigaction(SIGSEGV, NULL, &now) != 0)
        return -1;
    if (now.sa_flags & SA_SIGINFO)
        return now.sa_sigaction == segv_explain ? 1 : -1;
    return (now.sa_handler == SIG_DFL || now.sa_handler == SIG_IGN) ? 0 : -1;
}

/* Called with placeholder_lock held. */
static void segv_update(void)
{
    int current = segv_current();
    /* Installed again when the disposition was reset behind our back (a
     * crash handler that restored the default); never over a handler that
     * took our place, since it may chain to us. */
    if (n_placeholders && (!segv_installed || current == 0)) {
        if (current == 1)
            return;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = segv_explain;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &segv_previous) == 0)
            segv_installed = 1;
    } else if (!n_placeholders && segv_installed) {
        /* Someone installed a handler after ours: leave the chain alone, and
         * stay installed, since it may chain to us; installing again over it
         * would make it our previous handler and its previous us, a loop. */
        if (current == 1)
            sigaction(SIGSEGV, &segv_previous, NULL);
        if (current != -1)
            segv_installed = 0;
    }
}

int tg_placeholder_add(void *addr, size_t len, const char *name)
{
    int rc = 0;
    pthread_mutex_lock(&placeholder_lock);
    if (n_placeholders == TG_MAX_PLACEHOLDERS) {
        errno = ENOSPC;
        rc = -1;
    } else {
        struct placeholder *p = &placeholders[n_placeholders];
        p->addr = addr;
        p->len = len;
        p->name[0] = '\0';
        if (name)
            strncat(p->name, name, sizeof p->name - 1);
        n_placeholders++;
        segv_update();
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
    segv_update();
    pthread_mutex_unlock(&placeholder_lock);
    if (rc)
        errno = ENOENT;
    return rc;
}

int tg_map_marker(void *addr, size_t len, int fd)
{
    void *p = mmap(addr, len, PROT_NONE, MAP_SHARED | MAP_FIXED, fd, 0);
    return p == MAP_FAILED ? -1 : 0;
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

/* SPDX-License-Identifier: MIT
 *
 * thpguard.h - the C contract of thpguard's native core.
 *
 * Plain C, usable without Python. Every function that can fail returns 0 on
 * success or -1 with errno set; results come back through out-parameters.
 * Addresses and lengths are in bytes. Nothing here allocates on the C heap
 * except where said. The fault-injection hook for tests is declared in
 * thpguard_testing.h, not here: it is not part of this contract.
 */
#ifndef THPGUARD_H
#define THPGUARD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* madvise advice values, defined here so old libc headers do not matter. */
#define TG_MADV_DONTFORK        10
#define TG_MADV_DOFORK          11
#define TG_MADV_HUGEPAGE        14
#define TG_MADV_NOHUGEPAGE      15
#define TG_MADV_WIPEONFORK      18
#define TG_MADV_KEEPONFORK      19
#define TG_MADV_POPULATE_READ   22
#define TG_MADV_POPULATE_WRITE  23
#define TG_MADV_COLLAPSE        25
/* The proposed per-VMA direct-COW flag (not merged upstream, May 2026). */
#define TG_MADV_THP_COW         257

/* PAGEMAP_SCAN categories (uapi linux/fs.h, Linux 6.7). */
#define TG_PAGE_IS_WPALLOWED    (1ULL << 0)
#define TG_PAGE_IS_WRITTEN      (1ULL << 1)
#define TG_PAGE_IS_FILE         (1ULL << 2)
#define TG_PAGE_IS_PRESENT      (1ULL << 3)
#define TG_PAGE_IS_SWAPPED      (1ULL << 4)
#define TG_PAGE_IS_PFNZERO      (1ULL << 5)
#define TG_PAGE_IS_HUGE         (1ULL << 6)

/* One result of a PAGEMAP_SCAN: [start, end) with the same categories. */
struct tg_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

/* ---- mapping ---------------------------------------------------------- */

/* Map `size` bytes of private anonymous memory at an address aligned to
 * `align` (a power of two, at least the page size). */
int tg_map_aligned(size_t size, size_t align, void **out);

int tg_unmap(void *addr, size_t size);

/* The PMD huge page size in bytes, from
 * /sys/kernel/mm/transparent_hugepage/hpage_pmd_size; 2 MiB (x86-64) where
 * the file is missing or unreadable (kernels before 4.16, no THP). */
size_t tg_pmd_size(void);

int tg_madvise(void *addr, size_t len, int advice);

/* 1 in *known if the kernel knows `advice` (madvise with length 0 returns
 * 0 for a known advice and EINVAL for an unknown one), else 0. Changes
 * nothing. */
int tg_advice_known(int advice, int *known);

/* Fault in [addr, addr+len) for writing without changing its contents:
 * MADV_POPULATE_WRITE (5.14), else an atomic add of zero to one byte per
 * `page_size` bytes. Never use it on a range shared after fork: it splits
 * every PMD there. */
int tg_populate_write(void *addr, size_t len, size_t page_size);

/* ---- split detection -------------------------------------------------- */

/* One PAGEMAP_SCAN ioctl (6.7) on `pagemap_fd` over [start, end), reporting
 * the categories in `return_mask`. Up to `vec_len` results land in `vec`;
 * *n_out is their number and *walk_end where the walk stopped (== end when
 * the whole range was walked). Fails with ENOTTY on older kernels. */
int tg_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end,
                    uint64_t return_mask, struct tg_page_region *vec,
                    size_t vec_len, size_t *n_out, uint64_t *walk_end);

/* Bytes of [start, end) that are PMD-mapped (PAGE_IS_HUGE), present and hold
 * data: the huge zero page (PAGE_IS_PFNZERO) and non-present PMD entries are
 * not huge (the same rule as the Python block model, thpguard/blocks.py).
 * *present counts every present byte, zero pages included. */
int tg_huge_bytes(int pagemap_fd, uint64_t start, uint64_t end,
                  uint64_t *huge, uint64_t *present);

/* How many whole PMD-size blocks of a range are of each kind, by the block
 * model of thpguard (docs/architecture.rst, thpguard/blocks.py): huge
 * (PMD-mapped, present, holding data), zero (the huge zero page or zero
 * pages only: no data), split (every base page holds data, present or
 * swapped, but not PMD-mapped), partial (some base pages hold data), absent
 * (no data). Bytes count as in tg_huge_bytes. */
struct tg_block_counts {
    uint64_t huge_bytes;
    uint64_t present_bytes;
    uint64_t huge;
    uint64_t zero;
    uint64_t split;
    uint64_t partial;
    uint64_t absent;
};

/* Classify the whole `pmd`-size blocks of [start, end) into *out. */
int tg_block_counts(int pagemap_fd, uint64_t start, uint64_t end, uint64_t pmd,
                    struct tg_block_counts *out);

/* ---- repair ----------------------------------------------------------- */

/* MADV_COLLAPSE (6.1) over [addr, addr+len) in chunks of `chunk` bytes (a
 * multiple of the PMD size), so mmap_lock is never held for the whole
 * range. EAGAIN is retried up to `max_retries` times per chunk. The errno
 * of each chunk (0 when it collapsed) goes to chunk_errno[i] for the first
 * `n_chunks` chunks (may be NULL). Returns 0 when every chunk succeeded,
 * else -1 with errno of the last failure; earlier chunks may have been
 * collapsed all the same, so rescan rather than trust the return code. */
int tg_collapse(void *addr, size_t len, size_t chunk, unsigned max_retries,
                int *chunk_errno, size_t n_chunks);

int tg_pidfd_open(pid_t pid, int *fd);

/* process_madvise(2) (5.10; MADV_COLLAPSE on another process from 6.1,
 * needing CAP_SYS_NICE and ptrace read access). `addrs`/`lens` give `n`
 * ranges; *advised is the number of bytes advised. */
int tg_process_madvise(int pidfd, const uint64_t *addrs, const uint64_t *lens,
                       size_t n, int advice, size_t *advised);

/* ---- fork policies ---------------------------------------------------- */

/* Replace [addr, addr+len) by a private copy in fresh huge-page-advised
 * memory aligned to `align`, moved over the old range with one
 * mremap(MREMAP_FIXED), so the range stays one VMA and no longer shares
 * pages with another process. On failure the old range is untouched. */
int tg_copy_remap(void *addr, size_t len, size_t align);

/* Replace the (mapped, fresh) range [addr, addr+len) by a private anonymous
 * mapping that a mapping placed next to it later never merges with: it is
 * made elsewhere, given its anon_vma by one write fault (the page is dropped
 * again) and moved over addr with mremap(MREMAP_FIXED), which keeps the page
 * offset of a VMA that has an anon_vma (Linux copy_vma()). Anonymous VMAs
 * merge only where their page offsets continue each other, and a fresh
 * mapping's offset is its address's, so memory that outside code maps into
 * a hole of the range stays a VMA of its own, even with the same flags.
 * Pieces of the range split off by mprotect() or mlock() keep continuing
 * offsets and merge back. On failure addr is untouched. */
int tg_map_unmergeable(void *addr, size_t len);

/* hugetlb: MAP_HUGETLB and the page size as log2 << TG_MAP_HUGE_SHIFT. */
#define TG_MAP_HUGETLB    0x40000
#define TG_MAP_HUGE_SHIFT 26

/* Map len bytes private anonymous with extra mmap flags (TG_MAP_HUGETLB |
 * log2(size) << TG_MAP_HUGE_SHIFT), always with a reservation: never
 * MAP_NORESERVE. A non-NULL addr maps there with MAP_FIXED. */
int tg_map_flags(void *addr, size_t len, int extra_flags, void **out);

/* Copy [addr, addr+len) into a fresh mapping made with extra_flags and
 * move it over the old range (mremap), as tg_copy_remap does for THP. */
int tg_copy_remap_flags(void *addr, size_t len, int extra_flags);

/* Keep [addr, addr+len) reserved (PROT_NONE) in every child that fork()
 * creates, for ranges marked MADV_DONTFORK: otherwise the child's next
 * mmap could land in the hole and be unmapped later by the parent's
 * bookkeeping. Done in a pthread_atfork child handler, so forks that bypass
 * Python are covered too. Up to TG_MAX_PLACEHOLDERS ranges. */
#define TG_MAX_PLACEHOLDERS 4096
/* While any placeholder exists, a SIGSEGV handler is installed that, for a
 * fault inside a placeholder, writes to fd 2 which region it is (`name`,
 * up to TG_PLACEHOLDER_NAME_MAX - 1 bytes kept; NULL or "" for none, and
 * its range), its policy and what to use instead, then lets SIGSEGV take
 * its default action. Faults elsewhere go to the handler that was there
 * before. The last tg_placeholder_remove() puts that handler back. */
#define TG_PLACEHOLDER_NAME_MAX 64

/* Map `len` bytes of `fd` (a memfd) at `addr`, PROT_NONE, replacing what the
 * caller mapped there (MAP_FIXED: only on a range the caller owns). Used to
 * put a named, inaccessible marker page in front of a region, so that other
 * tools can find the region and its name in /proc/PID/maps on any kernel. */
int tg_map_marker(void *addr, size_t len, int fd);
int tg_placeholder_add(void *addr, size_t len, const char *name);
int tg_placeholder_remove(void *addr);

/* Install the pthread_atfork handlers (idempotent). */
int tg_atfork_install(void);

/* Number of fork() calls this process is the child of, counted by the
 * atfork child handler: a change tells a process it is a new child even
 * when the fork bypassed Python. */
uint64_t tg_fork_generation(void);

/* 1 exactly once per new fork generation, for the one caller that should
 * do this process's after-fork work; 0 otherwise. Lock-free, so it is safe
 * however the fork happened and whichever thread asks first. */
int tg_fork_claim(void);

/* ---- copy regions: whole-block copy on write (uffd.c) ----------------- */

/* A `copy` region stays PMD-mapped in every process across fork(): the
 * first write to a 2 MiB block shared with another process copies the
 * whole block into a new huge page instead of letting the kernel split it.
 * A userfaultfd handler thread per process does it (Linux 5.7+ for
 * write-protect on anonymous memory; UFFDIO_MOVE from 6.8, else mremap).
 * Needs a userfaultfd that handles kernel-mode faults: CAP_SYS_PTRACE,
 * vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd.
 * Install the at-fork handlers (tg_atfork_install) before the first fork:
 * they arm the parent before fork() returns and the child before any of
 * its code runs. */
#define TG_MAX_COPY_REGIONS 1024
#define TG_COPY_POOL_MAX 64

/* The handler's pool of pre-faulted huge pages has a one-page marker just
 * below it: an inaccessible mapping of a memfd named
 * TG_COPY_POOL_MARKER "BYTES" (the pool's length), so /proc/PID/maps and
 * `thpguard status` tell the pool from a leak. */
#define TG_COPY_POOL_MARKER "thpguard-copy-pool:"

/* How a block is put in place. */
enum tg_copy_method {
    TG_COPY_MOVE = 1,       /* zap the block, UFFDIO_MOVE the copy in (6.8) */
    TG_COPY_REMAP = 2,      /* mremap the copy over the block (a VMA each) */
    TG_COPY_COLLAPSE = 3    /* unprotect, dirty a byte, MADV_COLLAPSE */
};

/* Where tg_copy_probe stopped. */
enum tg_probe_stage {
    TG_PROBE_OK = 0,
    TG_PROBE_OPEN = 1,      /* no userfaultfd that handles kernel faults */
    TG_PROBE_API = 2,       /* UFFDIO_API refused write-protect (< 5.7) */
    TG_PROBE_WP = 3,        /* registering or protecting a THP block failed */
    TG_PROBE_SCAN = 4       /* no PAGEMAP_SCAN (6.7) to tell whole blocks */
};

struct tg_copy_probe {
    int stage;              /* enum tg_probe_stage */
    int err;                /* errno at that stage */
    int source;             /* 1: userfaultfd(2); 2: /dev/userfaultfd */
    int user_mode_only;     /* 1: only a UFFD_USER_MODE_ONLY fd (refused) */
    int has_move;           /* UFFDIO_MOVE available */
    uint64_t features;      /* UFFDIO_API features the kernel offers */
};

struct tg_copy_stats {
    uint64_t wp_faults;     /* write faults on protected blocks */
    uint64_t missing_faults;/* faults on empty memory in a region */
    uint64_t copies;        /* blocks copied into a new huge page */
    uint64_t reuses;        /* blocks no longer shared: unprotected only */
    uint64_t missing_fills; /* empty blocks filled with a zeroed huge page */
    uint64_t cow_fallbacks; /* blocks left to the kernel's COW (they split) */
    uint64_t inline_allocs; /* pool empty: a block was faulted in the fault */
    uint64_t copy_ns;       /* time spent copying, in nanoseconds */
    uint64_t regions;       /* registered regions */
    uint64_t pool_ready;    /* pre-faulted blocks waiting */
    int method;             /* enum tg_copy_method; 0 before the first use */
    int arm_errno;          /* last failure arming this process, 0 if none */
    uint64_t arm_ns;        /* a child: its at-fork handler's time, in ns */
    uint64_t ready_wait_ns; /* of which waiting for its handler thread */
};

/* Can this process use copy regions? Fills *out and returns 0; the verdict
 * is out->stage (TG_PROBE_OK or where it failed, errno in out->err). */
int tg_copy_probe(struct tg_copy_probe *out);

/* Register [addr, addr+len) (aligned to `block_size`, the PMD size) with
 * this process's handler, starting it on first use. The region is
 * protected at each fork. EEXIST: overlaps a region; ENOSPC: too many. */
int tg_copy_register(void *addr, size_t len, size_t block_size);

/* Unregister the region starting at addr (ENOENT if none). Waits for a
 * copy in progress and wakes every thread waiting on the region, so the
 * caller may unmap it afterwards. */
int tg_copy_unregister(void *addr);

/* Write-protect every registered region now (the at-fork prepare handler
 * does it on each fork). */
int tg_copy_arm(void);

int tg_copy_stats(struct tg_copy_stats *out);

/* Force a method (benchmarks) before the first tg_copy_register; 0 picks
 * the best the kernel offers. EBUSY once a handler runs. */
int tg_copy_set_method(int method);

/* Pre-faulted blocks kept ready (1..TG_COPY_POOL_MAX, default 4), before
 * the first fault. */
int tg_copy_set_pool(size_t blocks);

/* Pool blocks a child's handler thread fills before it first polls, which
 * the at-fork handler waits for (tg_copy_set_child_ready_wait)
 * (0..TG_COPY_POOL_MAX, default 1; never more than the pool keeps); it
 * fills the rest after the child's first write. */
int tg_copy_set_child_prefill(size_t blocks);

/* How long a child's at-fork handler waits, at most, for its new handler
 * thread to fill the child's first pool blocks (tg_copy_set_child_prefill)
 * and poll before the child's code runs, in microseconds (default 50000;
 * 0: no wait, the filling overlaps the child's code and its first write
 * waits for what is left of it). */
int tg_copy_set_child_ready_wait(unsigned microseconds);

/* How long the handler waits after a fault before it refills the pool, in
 * milliseconds (0..1000, default 1; 0: at once), so the writer it woke
 * gets a CPU first. */
int tg_copy_set_refill_delay(unsigned milliseconds);

/* ---- process switches ------------------------------------------------- */

/* Raw prctl(PR_GET_THP_DISABLE) result. */
int tg_thp_disable_get(int *value);

/* prctl(PR_SET_THP_DISABLE, disable, flags, 0, 0). */
int tg_thp_disable_set(int disable, unsigned long flags);

#ifdef __cplusplus
}
#endif

#endif /* THPGUARD_H */

/* The declarations cffi exposes to Python: thpguard.h and the test hook of
 * thpguard_testing.h. build_cffi.py compiles every prototype here again
 * after including the headers and pins the struct layouts with static
 * assertions, so any drift between the two fails the build. */
#define TG_MADV_DONTFORK ...
#define TG_MADV_DOFORK ...
#define TG_MADV_HUGEPAGE ...
#define TG_MADV_NOHUGEPAGE ...
#define TG_MADV_WIPEONFORK ...
#define TG_PLACEHOLDER_NAME_MAX ...
#define TG_MADV_KEEPONFORK ...
#define TG_MADV_POPULATE_READ ...
#define TG_MADV_POPULATE_WRITE ...
#define TG_MADV_COLLAPSE ...
#define TG_MADV_THP_COW ...
#define TG_PAGE_IS_PRESENT ...
#define TG_PAGE_IS_SWAPPED ...
#define TG_PAGE_IS_PFNZERO ...
#define TG_PAGE_IS_HUGE ...
#define TG_MAX_PLACEHOLDERS ...
#define TG_MAX_COPY_REGIONS ...
#define TG_COPY_POOL_MAX ...
#define TG_MAP_HUGETLB ...
#define TG_MAP_HUGE_SHIFT ...

typedef int... pid_t;

struct tg_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

enum tg_fault_op {
    TG_FAULT_COLLAPSE,
    TG_FAULT_MAP,
    TG_FAULT_SCAN,
    TG_FAULT_MREMAP,
    TG_FAULT_COPY_BLOCK,
    TG_FAULT_COPY_ARM,
    TG_FAULT_NOPS,
    ...
};

enum tg_copy_method {
    TG_COPY_MOVE,
    TG_COPY_REMAP,
    TG_COPY_COLLAPSE,
    ...
};

enum tg_probe_stage {
    TG_PROBE_OK,
    TG_PROBE_OPEN,
    TG_PROBE_API,
    TG_PROBE_WP,
    TG_PROBE_SCAN,
    ...
};

struct tg_copy_probe {
    int stage;
    int err;
    int source;
    int user_mode_only;
    int has_move;
    uint64_t features;
    ...;
};

struct tg_copy_stats {
    uint64_t wp_faults;
    uint64_t missing_faults;
    uint64_t copies;
    uint64_t reuses;
    uint64_t missing_fills;
    uint64_t cow_fallbacks;
    uint64_t inline_allocs;
    uint64_t copy_ns;
    uint64_t regions;
    uint64_t pool_ready;
    int method;
    int arm_errno;
    uint64_t arm_ns;
    uint64_t ready_wait_ns;
    ...;
};

int tg_map_aligned(size_t size, size_t align, void **out);
int tg_unmap(void *addr, size_t size);
int tg_madvise(void *addr, size_t len, int advice);
int tg_advice_known(int advice, int *known);
int tg_populate_write(void *addr, size_t len, size_t page_size);
int tg_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end,
                    uint64_t return_mask, struct tg_page_region *vec,
                    size_t vec_len, size_t *n_out, uint64_t *walk_end);
int tg_huge_bytes(int pagemap_fd, uint64_t start, uint64_t end,
                  uint64_t *huge, uint64_t *present);

struct tg_block_counts {
    uint64_t huge_bytes;
    uint64_t present_bytes;
    uint64_t huge;
    uint64_t zero;
    uint64_t split;
    uint64_t partial;
    uint64_t absent;
};

int tg_block_counts(int pagemap_fd, uint64_t start, uint64_t end, uint64_t pmd,
                    struct tg_block_counts *out);
int tg_collapse(void *addr, size_t len, size_t chunk, unsigned max_retries,
                int *chunk_errno, size_t n_chunks);
int tg_pidfd_open(pid_t pid, int *fd);
int tg_process_madvise(int pidfd, const uint64_t *addrs, const uint64_t *lens,
                       size_t n, int advice, size_t *advised);
int tg_copy_remap(void *addr, size_t len, size_t align);
int tg_map_flags(void *addr, size_t len, int extra_flags, void **out);
int tg_map_unmergeable(void *addr, size_t len);
int tg_copy_remap_flags(void *addr, size_t len, int extra_flags);
int tg_placeholder_add(void *addr, size_t len, const char *name);
int tg_placeholder_remove(void *addr);
int tg_map_marker(void *addr, size_t len, int fd);
int tg_atfork_install(void);
uint64_t tg_fork_generation(void);
int tg_fork_claim(void);
int tg_copy_probe(struct tg_copy_probe *out);
int tg_copy_register(void *addr, size_t len, size_t block_size);
int tg_copy_unregister(void *addr);
int tg_copy_arm(void);
int tg_copy_stats(struct tg_copy_stats *out);
int tg_copy_set_method(int method);
int tg_copy_set_pool(size_t blocks);
int tg_copy_set_child_prefill(size_t blocks);
int tg_copy_set_child_ready_wait(unsigned microseconds);
int tg_copy_set_refill_delay(unsigned milliseconds);
int tg_thp_disable_get(int *value);
int tg_thp_disable_set(int disable, unsigned long flags);
int tg_fault_inject(int op, int err, int count);
void tg_fault_clear(void);
void tg_fault_suspend(int suspend);
int tg_fault_take(int op);

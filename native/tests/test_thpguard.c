/* test_thpguard.c - tests of the C library on its own, against the kernel.
 *
 * Each check compares what the library did with what the kernel reports
 * (PAGEMAP_SCAN). Exit 0: all passed; 1: a check failed; 77: skipped,
 * because this host cannot give transparent huge pages to an advised
 * region (THP "never", or a kernel without PAGEMAP_SCAN/MADV_COLLAPSE).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "thpguard.h"
#include "thpguard_testing.h"

#define SKIP 77

static int failures;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            failures++;                                               \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                             \
            fputc('\n', stderr);                                      \
        }                                                             \
    } while (0)

static size_t pmd;


static uint64_t huge_bytes(void *addr, size_t len)
{
    uint64_t huge = 0, present = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || tg_huge_bytes(fd, (uintptr_t)addr, (uintptr_t)addr + len,
                                &huge, &present) != 0) {
        fprintf(stderr, "PAGEMAP_SCAN failed: %s\n", strerror(errno));
        exit(1);
    }
    close(fd);
    return huge;
}

static void *huge_region(size_t len)
{
    void *addr = NULL;
    if (tg_map_aligned(len, pmd, &addr) != 0
        || tg_madvise(addr, len, TG_MADV_HUGEPAGE) != 0
        || tg_populate_write(addr, len, (size_t)sysconf(_SC_PAGESIZE)) != 0) {
        fprintf(stderr, "cannot map a huge region: %s\n", strerror(errno));
        exit(1);
    }
    return addr;
}

/* Skip (77) unless an advised, populated region is PMD-mapped and the
 * kernel has PAGEMAP_SCAN (6.7) and MADV_COLLAPSE (6.1). */
static void require_thp(void)
{
    int known = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t huge, present;
    struct tg_page_region vec[1];
    size_t n;
    uint64_t walk_end;
    if (fd < 0 || tg_pagemap_scan(fd, 0, 4096, TG_PAGE_IS_HUGE, vec, 1, &n, &walk_end) != 0) {
        printf("SKIP: no PAGEMAP_SCAN (Linux 6.7+)\n");
        exit(SKIP);
    }
    if (tg_advice_known(TG_MADV_COLLAPSE, &known) != 0 || !known) {
        printf("SKIP: no MADV_COLLAPSE (Linux 6.1+)\n");
        exit(SKIP);
    }
    void *addr = huge_region(pmd);
    if (tg_huge_bytes(fd, (uintptr_t)addr, (uintptr_t)addr + pmd, &huge, &present) != 0
        || huge != pmd) {
        printf("SKIP: an advised region is not PMD-mapped (THP disabled?)\n");
        exit(SKIP);
    }
    tg_unmap(addr, pmd);
    close(fd);
}

static void test_bad_arguments(void)
{
    void *addr;
    errno = 0;
    CHECK(tg_map_aligned(0, pmd, &addr) == -1 && errno == EINVAL, "size 0");
    errno = 0;
    CHECK(tg_map_aligned(pmd, 3 * 4096, &addr) == -1 && errno == EINVAL, "align not a power of two");
    errno = 0;
    CHECK(tg_collapse(NULL, pmd, 0, 0, NULL, 0) == -1 && errno == EINVAL, "chunk 0");
    errno = 0;
    CHECK(tg_fault_inject(TG_FAULT_NOPS, EIO, 1) == -1 && errno == EINVAL, "unknown fault op");
    int known = 1;
    CHECK(tg_advice_known(-1, &known) == 0 && known == 0, "advice -1 unknown");
    CHECK(tg_advice_known(TG_MADV_HUGEPAGE, &known) == 0 && known == 1, "MADV_HUGEPAGE known");
}

static void test_map_aligned(void)
{
    void *addr;
    CHECK(tg_map_aligned(3 * pmd, pmd, &addr) == 0, "%s", strerror(errno));
    CHECK(((uintptr_t)addr & (pmd - 1)) == 0, "address %p not aligned", addr);
    memset(addr, 0xab, 3 * pmd);
    CHECK(tg_unmap(addr, 3 * pmd) == 0, "%s", strerror(errno));
}

static void test_populate_is_huge(void)
{
    size_t len = 4 * pmd;
    void *addr = huge_region(len);
    CHECK(huge_bytes(addr, len) == len, "populated region not PMD-mapped");
    tg_unmap(addr, len);
}

/* A child's write splits its block; tg_collapse repairs it in the child
 * and leaves the parent's mapping huge. Also checks the fork counter. */
static void test_fork_split_and_repair(void)
{
    size_t len = 4 * pmd;
    char *addr = huge_region(len);
    uint64_t generation = tg_fork_generation();
    int pipefd[2];
    CHECK(pipe(pipefd) == 0, "pipe");
    pid_t pid = fork();
    if (pid == 0) {
        uint64_t result[4];
        result[0] = tg_fork_generation() - generation;
        for (size_t off = 0; off < len; off += pmd)
            addr[off] ^= 1;
        result[1] = huge_bytes(addr, len);
        int chunk_errno[2] = {-1, -1};
        result[2] = (uint64_t)tg_collapse(addr, len, 2 * pmd, 3, chunk_errno, 2);
        result[3] = huge_bytes(addr, len);
        _exit(write(pipefd[1], result, sizeof(result)) == sizeof(result) ? 0 : 1);
    }
    close(pipefd[1]);
    uint64_t result[4] = {0};
    CHECK(read(pipefd[0], result, sizeof(result)) == sizeof(result), "child report");
    close(pipefd[0]);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
    CHECK(result[0] == 1, "fork generation moved by %llu in the child", (unsigned long long)result[0]);
    CHECK(result[1] < len, "child's writes did not split: %llu huge", (unsigned long long)result[1]);
    CHECK(result[2] == 0, "tg_collapse returned %lld", (long long)result[2]);
    CHECK(result[3] == len, "child not repaired: %llu of %zu huge", (unsigned long long)result[3], len);
    CHECK(tg_fork_generation() == generation, "parent's generation moved");
    CHECK(huge_bytes(addr, len) == len, "parent lost huge pages");
    tg_unmap(addr, len);
}

static void test_fault_injection(void)
{
    size_t len = 2 * pmd;
    void *addr = huge_region(len);
    int chunk_errno[2] = {0, 0};
    CHECK(tg_fault_inject(TG_FAULT_COLLAPSE, EAGAIN, 2) == 0, "inject");
    /* Two EAGAINs are retried away within max_retries = 3. */
    CHECK(tg_collapse(addr, len, len, 3, chunk_errno, 1) == 0, "EAGAIN not retried");
    CHECK(tg_fault_inject(TG_FAULT_COLLAPSE, ENOMEM, 1) == 0, "inject");
    errno = 0;
    CHECK(tg_collapse(addr, len, pmd, 0, chunk_errno, 2) == -1 && errno == ENOMEM, "injected ENOMEM");
    CHECK(chunk_errno[0] == ENOMEM && chunk_errno[1] == 0, "per-chunk errno %d %d",
          chunk_errno[0], chunk_errno[1]);
    CHECK(tg_fault_inject(TG_FAULT_MAP, ENOMEM, 1) == 0, "inject");
    void *other;
    errno = 0;
    CHECK(tg_map_aligned(pmd, pmd, &other) == -1 && errno == ENOMEM, "injected map failure");
    tg_fault_clear();
    CHECK(huge_bytes(addr, len) == len, "injected faults touched the region");
    tg_unmap(addr, len);
}

/* tg_copy_remap gives the child its own huge pages in place: no split
 * after a write, and the data is unchanged. */
static void test_copy_remap_in_child(void)
{
    size_t len = 2 * pmd;
    char *addr = huge_region(len);
    for (size_t i = 0; i < len; i += 4096)
        addr[i] = (char)(i / 4096);
    pid_t pid = fork();
    if (pid == 0) {
        int ok = tg_copy_remap(addr, len, pmd) == 0;
        addr[0] ^= 1;
        ok = ok && huge_bytes(addr, len) == len;
        for (size_t i = 4096; ok && i < len; i += 4096)
            ok = addr[i] == (char)(i / 4096);
        _exit(ok ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "copy_remap in child failed");
    tg_unmap(addr, len);
}

/* ---- copy regions ---- */

static int copy_supported(void)
{
    struct tg_copy_probe probe;
    return tg_copy_probe(&probe) == 0 && probe.stage == TG_PROBE_OK;
}

static void fill_pattern(char *addr, size_t len, char salt)
{
    for (size_t i = 0; i < len; i += 4096)
        addr[i] = (char)(i / 4096) ^ salt;
}

static int pattern_ok(const char *addr, size_t len, char salt, size_t skip_every)
{
    for (size_t i = 0; i < len; i += 4096) {
        if (skip_every && i % skip_every == 0)
            continue;
        if (addr[i] != ((char)(i / 4096) ^ salt))
            return 0;
    }
    return 1;
}

/* Both sides write one byte into every block after fork: each side stays
 * 100 % PMD-mapped after every write, sees only its own writes, and the
 * writes were resolved by copies (or reuse once the other side copied). */
static int copy_writer(char *addr, size_t len, char mark)
{
    for (size_t off = 0; off < len; off += pmd) {
        addr[off] = mark;
        if (huge_bytes(addr, len) != len)
            return 10;
    }
    for (size_t off = 0; off < len; off += pmd)
        if (addr[off] != mark)
            return 11;
    return pattern_ok(addr, len, 0, pmd) ? 0 : 12;
}

static void test_copy_fork_writes(void)
{
    size_t len = 8 * pmd;
    char *addr = huge_region(len);
    fill_pattern(addr, len, 0);
    CHECK(tg_copy_register(addr, len, pmd) == 0, "register: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        int rc = copy_writer(addr, len, 'c');
        struct tg_copy_stats st;
        tg_copy_stats(&st);
        if (!rc && st.copies + st.reuses != len / pmd)
            rc = 13;
        if (!rc && st.cow_fallbacks)
            rc = 14;
        _exit(rc);
    }
    int rc = copy_writer(addr, len, 'p');
    CHECK(rc == 0, "parent writer failed at check %d", rc);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child writer status %d", status);
    struct tg_copy_stats st;
    tg_copy_stats(&st);
    CHECK(st.cow_fallbacks == 0, "%llu fallbacks", (unsigned long long)st.cow_fallbacks);
    CHECK(st.copies + st.reuses >= len / pmd, "copies %llu reuses %llu",
          (unsigned long long)st.copies, (unsigned long long)st.reuses);
    CHECK(huge_bytes(addr, len) == len, "parent not PMD-mapped after the child left");
    CHECK(tg_copy_unregister(addr) == 0, "unregister: %s", strerror(errno));
    tg_unmap(addr, len);
}

struct same_block {
    char *addr;
    int index;
};

static void *write_same_block(void *arg)
{
    struct same_block *sb = arg;
    sb->addr[4096 * (1 + sb->index)] = (char)(0x40 + sb->index);
    return NULL;
}

/* Eight threads write the same block at once: one copy, every writer woken
 * and every write kept. */
static void test_copy_threads_same_block(void)
{
    size_t len = 2 * pmd;
    char *addr = huge_region(len);
    fill_pattern(addr, len, 0);
    CHECK(tg_copy_register(addr, len, pmd) == 0, "register: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        pthread_t tids[8];
        struct same_block args[8];
        for (int i = 0; i < 8; i++) {
            args[i].addr = addr;
            args[i].index = i;
            pthread_create(&tids[i], NULL, write_same_block, &args[i]);
        }
        for (int i = 0; i < 8; i++)
            pthread_join(tids[i], NULL);
        struct tg_copy_stats st;
        tg_copy_stats(&st);
        for (int i = 0; i < 8; i++)
            if (addr[4096 * (1 + i)] != (char)(0x40 + i))
                _exit(20);
        if (st.copies != 1)
            _exit(21);
        _exit(huge_bytes(addr, len) == len ? 0 : 22);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "threads child status %d", status);
    CHECK(pattern_ok(addr, len, 0, 0), "parent's data changed");
    tg_copy_unregister(addr);
    tg_unmap(addr, len);
}

/* A write made by the kernel (read() into the region) is handled too,
 * in a grandchild as well as in a child. */
static void test_copy_kernel_write_grandchild(void)
{
    size_t len = 2 * pmd;
    char *addr = huge_region(len);
    fill_pattern(addr, len, 0);
    CHECK(tg_copy_register(addr, len, pmd) == 0, "register: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        pid_t grandchild = fork();
        int fds[2];
        if (pipe(fds) != 0 || write(fds[1], "kernel", 6) != 6)
            _exit(30);
        if (read(fds[0], addr + 100, 6) != 6)
            _exit(31);
        if (memcmp(addr + 100, "kernel", 6) != 0 || huge_bytes(addr, len) != len)
            _exit(32);
        if (!pattern_ok(addr, len, 0, 0))
            _exit(33);
        if (grandchild == 0)
            _exit(0);
        int st;
        waitpid(grandchild, &st, 0);
        _exit(WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 34);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "kernel-write child status %d", status);
    CHECK(memcmp(addr + 100, "kernel", 6) != 0, "the child's read() changed the parent");
    tg_copy_unregister(addr);
    tg_unmap(addr, len);
}

/* No new block for the copy (injected): the kernel's own COW handles the
 * write, the data stays right, and the fallback is counted. */
static void test_copy_alloc_failure(void)
{
    size_t len = 2 * pmd;
    char *addr = huge_region(len);
    fill_pattern(addr, len, 0);
    CHECK(tg_copy_register(addr, len, pmd) == 0, "register: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        tg_fault_inject(TG_FAULT_COPY_BLOCK, ENOMEM, 1);
        addr[0] = 'x';
        addr[pmd] = 'y';
        struct tg_copy_stats st;
        tg_copy_stats(&st);
        if (st.cow_fallbacks != 1 || st.copies + st.reuses != 1)
            _exit(40);
        if (addr[0] != 'x' || addr[pmd] != 'y' || !pattern_ok(addr, len, 0, pmd))
            _exit(41);
        _exit(huge_bytes(addr, len) == pmd ? 0 : 42);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "alloc-failure child status %d", status);
    CHECK(pattern_ok(addr, len, 0, 0), "parent's data changed");
    tg_copy_unregister(addr);
    tg_unmap(addr, len);
}

static void test_copy_bad_arguments(void)
{
    errno = 0;
    CHECK(tg_copy_register((void *)(uintptr_t)4096, pmd, pmd) == -1 && errno == EINVAL, "unaligned");
    errno = 0;
    CHECK(tg_copy_register(NULL, 0, pmd) == -1 && errno == EINVAL, "length 0");
    errno = 0;
    CHECK(tg_copy_unregister((void *)(uintptr_t)pmd) == -1 && errno == ENOENT, "not registered");
    CHECK(tg_copy_set_method(99) == -1 && errno == EINVAL, "unknown method");
}

static void test_copy_regions(void)
{
    test_copy_bad_arguments();
    if (!copy_supported()) {
        printf("copy regions: not supported here, skipped\n");
        return;
    }
    test_copy_fork_writes();
    test_copy_threads_same_block();
    test_copy_kernel_write_grandchild();
    test_copy_alloc_failure();
}

int main(void)
{
    pmd = tg_pmd_size();
    if (tg_atfork_install() != 0) {
        perror("tg_atfork_install");
        return 1;
    }
    test_bad_arguments();
    require_thp();
    test_map_aligned();
    test_populate_is_huge();
    test_fork_split_and_repair();
    test_fault_injection();
    test_copy_remap_in_child();
    test_copy_regions();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C tests passed\n");
    return 0;
}

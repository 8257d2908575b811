/* fork_repair.c - a huge-page region that survives fork, in plain C.
 *
 * Maps an aligned region, advises MADV_HUGEPAGE and faults it in, forks,
 * lets the child write one byte per 2 MiB block (each write splits that
 * block in the child), then repairs the child's copy with MADV_COLLAPSE and
 * prints the child's coverage before and after, from PAGEMAP_SCAN.
 *
 *   make -C native examples && native/build/fork_repair [MiB]
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "thpguard.h"

/* The pagemap fd must be opened in the process it describes: one opened
 * before fork keeps reading the parent. */
static int print_coverage(const char *who, char *addr, size_t len)
{
    uint64_t huge, present;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || tg_huge_bytes(fd, (uintptr_t)addr, (uintptr_t)addr + len,
                                &huge, &present) != 0) {
        perror("PAGEMAP_SCAN (Linux 6.7+)");
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    printf("%-22s %8llu of %llu bytes huge (%.0f%%)\n", who,
           (unsigned long long)huge, (unsigned long long)len, 100.0 * huge / len);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    size_t pmd = tg_pmd_size();
    size_t len = (argc > 1 ? strtoul(argv[1], NULL, 10) : 8) << 20;
    len = (len + pmd - 1) / pmd * pmd;
    void *region;

    if (tg_atfork_install() != 0 || tg_map_aligned(len, pmd, &region) != 0) {
        perror("thpguard: map");
        return 1;
    }
    if (tg_madvise(region, len, TG_MADV_HUGEPAGE) != 0
        || tg_populate_write(region, len, (size_t)sysconf(_SC_PAGESIZE)) != 0) {
        perror("thpguard: advise and populate");
        return 1;
    }
    if (print_coverage("parent after populate:", region, len) != 0)
        return 1;

    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) {
        char *p = region;
        printf("child fork generation: %llu\n",
               (unsigned long long)tg_fork_generation());
        for (size_t off = 0; off < len; off += pmd)
            p[off] = 1;  /* copy-on-write: splits each block in the child */
        if (print_coverage("child after writes:", region, len) != 0)
            _exit(1);
        if (tg_collapse(region, len, 4 * pmd, 3, NULL, 0) != 0)
            perror("MADV_COLLAPSE (Linux 6.1+)");
        if (print_coverage("child after repair:", region, len) != 0)
            _exit(1);
        _exit(0);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)
        || WEXITSTATUS(status) != 0)
        return 1;
    if (print_coverage("parent at the end:", region, len) != 0)
        return 1;
    return tg_unmap(region, len) == 0 ? 0 : 1;
}

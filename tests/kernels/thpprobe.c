// SPDX-License-Identifier: MIT
/*
 * thpprobe: what this kernel does with a PMD THP across fork(), measured
 * without thpguard. Built static by tests/kernels/run and run inside each
 * guest; prints one JSON object on stdout.
 *
 *   collapse        MADV_COLLAPSE repairing a block split by a COW fault:
 *                   "ok", or the errno name (EINVAL before 6.1)
 *   pagemap_scan    "ok", or the errno name (ENOTTY before 6.7)
 *   fork_*          a child writes one byte in each block after fork: does
 *                   the child keep its PMD (direct COW) or split, does the
 *                   parent keep its PMD, is the data right on both sides
 *   thp_cow_default the bracketed value of transparent_hugepage/thp_cow, or
 *                   null where the kernel lacks it (the patch in thp-cow/)
 *   direct_cow, cow_never, cow_always, cow_cleared, smaps_tc, ratio
 *                   only where thp_cow exists: the direct-COW path under
 *                   each setting, and the cost of one 2 MiB copy on the
 *                   first write after fork against split + MADV_COLLAPSE.
 *
 * Huge-mapping ground truth: PAGEMAP_SCAN PAGE_IS_HUGE where the kernel has
 * it, else AnonHugePages of the region's VMA in /proc/self/smaps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MADV_HUGEPAGE_ 14
#define MADV_COLLAPSE_ 25
#define MADV_THP_COW_ 257	/* proposed, tests/kernels/thp-cow */
#define MADV_NO_THP_COW_ 258

#define THP_DIR "/sys/kernel/mm/transparent_hugepage/"

/* PAGEMAP_SCAN (6.7): defined here, build hosts may have older headers. */
struct pm_region {
	uint64_t start, end, categories;
};
struct pm_scan_arg_ {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN_ _IOWR('f', 16, struct pm_scan_arg_)
#define PAGE_IS_PRESENT_ (1 << 3)
#define PAGE_IS_HUGE_ (1 << 6)

static size_t pmd;
static int have_scan = -1;

static const char *errname(int e)
{
	switch (e) {
	case 0: return "ok";
	case EINVAL: return "EINVAL";
	case ENOTTY: return "ENOTTY";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EBUSY: return "EBUSY";
	case EPERM: return "EPERM";
	case EFAULT: return "EFAULT";
	default: return "errno";
	}
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	return 0;
}

static int write_file(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, value, strlen(value));
	close(fd);
	return n < 0 ? -1 : 0;
}

/* "always [madvise] never" -> "madvise" in out; -1 if the file is missing */
static int bracketed(const char *path, char *out, size_t len)
{
	char buf[256], *a, *b;

	if (read_file(path, buf, sizeof(buf)))
		return -1;
	a = strchr(buf, '[');
	b = a ? strchr(a, ']') : NULL;
	if (!b)
		return -1;
	snprintf(out, len, "%.*s", (int)(b - a - 1), a + 1);
	return 0;
}

static long vmstat(const char *name)
{
	char line[256];
	size_t n = strlen(name);
	long v = -1;
	FILE *f = fopen("/proc/vmstat", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, name, n) && line[n] == ' ') {
			v = atol(line + n + 1);
			break;
		}
	fclose(f);
	return v;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long minflt(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

/* Bytes of [addr, addr+len) mapped by PMDs; -1 on error. */
static long huge_bytes(char *addr, size_t len)
{
	if (have_scan != 0) {
		struct pm_region vec[64];
		struct pm_scan_arg_ arg = {
			.size = sizeof(arg),
			.start = (uintptr_t)addr, .end = (uintptr_t)addr + len,
			.vec = (uintptr_t)vec, .vec_len = 64,
			.category_anyof_mask = PAGE_IS_PRESENT_,
			.return_mask = PAGE_IS_PRESENT_ | PAGE_IS_HUGE_,
		};
		/* The fd is per mm: open it in the process that asks. */
		int fd = open("/proc/self/pagemap", O_RDONLY);
		long total = 0, n;

		if (fd < 0)
			return -1;
		for (;;) {
			n = ioctl(fd, PAGEMAP_SCAN_, &arg);
			if (n < 0)
				break;
			for (long i = 0; i < n; i++)
				if (vec[i].categories & PAGE_IS_HUGE_)
					total += vec[i].end - vec[i].start;
			if (arg.walk_end >= arg.end)
				break;
			arg.start = arg.walk_end;
		}
		close(fd);
		if (n >= 0) {
			have_scan = 1;
			return total;
		}
		if (errno != ENOTTY)
			return -1;
		have_scan = 0;
	}
	/* Before 6.7: AnonHugePages of the VMA holding addr. */
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0;
	long kb = -1;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;

		if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
			in = s <= (uintptr_t)addr && (uintptr_t)addr < e;
			continue;
		}
		if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb < 0 ? -1 : kb * 1024;
}

static int vma_has_flag(char *addr, const char *flag)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0, found = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;

		if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
			in = s <= (uintptr_t)addr && (uintptr_t)addr < e;
			continue;
		}
		if (in && !strncmp(line, "VmFlags:", 8)) {
			char *p = line + 8, *tok;

			while ((tok = strtok(p, " \n"))) {
				p = NULL;
				if (!strcmp(tok, flag))
					found = 1;
			}
			break;
		}
	}
	fclose(f);
	return found;
}

static int fill(int block)
{
	return 0x10 + block % 0x60;
}

/* nblocks aligned PMD-size blocks, MADV_HUGEPAGE, written; NULL if not huge */
static char *huge_region(int nblocks)
{
	size_t len = nblocks * pmd;
	char *raw = mmap(NULL, len + pmd, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *p;

	if (raw == MAP_FAILED)
		return NULL;
	p = (char *)(((uintptr_t)raw + pmd - 1) & ~(pmd - 1));
	if (p > raw)
		munmap(raw, p - raw);
	munmap(p + len, raw + pmd - p);
	madvise(p, len, MADV_HUGEPAGE_);
	for (int b = 0; b < nblocks; b++)
		memset(p + b * pmd, fill(b), pmd);
	return p;
}

/* Each block is fill(b) except one byte (value mark) at offset off. */
static int data_ok(char *p, int nblocks, size_t off, int mark)
{
	for (int b = 0; b < nblocks; b++) {
		char *blk = p + b * pmd;

		for (size_t i = 0; i < pmd; i++) {
			int want = (i == off && mark >= 0) ? mark : fill(b);

			if ((unsigned char)blk[i] != want)
				return 0;
		}
	}
	return 1;
}

struct cow_result {
	int child_huge, parent_huge_before, parent_huge, child_data, parent_data;
	int collapse_errno, child_huge_after_collapse;
	long cow_alloc, cow_fallback, split_pmd;
};

#define CHILD_OFF (7 * 4096 + 5)
#define PARENT_OFF (9 * 4096 + 3)

/*
 * fork; the child writes one byte per block and reports; the parent checks
 * its own mapping, writes one byte per block and checks again; the child
 * checks that it does not see the parent's writes. advice: 0 none,
 * MADV_THP_COW, or MADV_NO_THP_COW after MADV_THP_COW. collapse: the child
 * repairs its split blocks with MADV_COLLAPSE at the end.
 */
static int cow_scenario(int nblocks, int advice, int collapse, struct cow_result *r)
{
	size_t len = nblocks * pmd;
	char *p = huge_region(nblocks);
	int up[2], down[2];
	long a0, f0, s0;
	pid_t pid;
	char go = 1;

	memset(r, 0, sizeof(*r));
	if (!p || huge_bytes(p, len) != (long)len)
		return -1;
	if (advice == MADV_THP_COW_ || advice == MADV_NO_THP_COW_)
		madvise(p, len, MADV_THP_COW_);
	if (advice == MADV_NO_THP_COW_)
		madvise(p, len, MADV_NO_THP_COW_);
	if (pipe(up) || pipe(down))
		return -1;
	a0 = vmstat("thp_cow_alloc");
	f0 = vmstat("thp_cow_fallback");
	s0 = vmstat("thp_split_pmd");
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		struct cow_result c = { 0 };

		for (int b = 0; b < nblocks; b++)
			p[b * pmd + CHILD_OFF] = (char)0xC1;
		c.child_huge = huge_bytes(p, len) == (long)len;
		c.child_data = data_ok(p, nblocks, CHILD_OFF, 0xC1);
		if (write(up[1], &c, sizeof(c)) != sizeof(c) || read(down[0], &go, 1) != 1)
			_exit(1);
		c.child_data = c.child_data && data_ok(p, nblocks, CHILD_OFF, 0xC1);
		c.collapse_errno = -1;
		if (collapse) {
			c.collapse_errno = madvise(p, len, MADV_COLLAPSE_) ? errno : 0;
			c.child_huge_after_collapse = huge_bytes(p, len) == (long)len;
		}
		if (write(up[1], &c, sizeof(c)) != sizeof(c))
			_exit(1);
		_exit(0);
	}
	if (read(up[0], r, sizeof(*r)) != sizeof(*r))
		return -1;
	r->parent_huge_before = huge_bytes(p, len) == (long)len;
	for (int b = 0; b < nblocks; b++)
		p[b * pmd + PARENT_OFF] = (char)0xA5;
	r->parent_huge = huge_bytes(p, len) == (long)len;
	r->parent_data = data_ok(p, nblocks, PARENT_OFF, 0xA5);
	if (write(down[1], &go, 1) != 1)
		return -1;
	{
		struct cow_result c;
		int pb = r->parent_huge_before, ph = r->parent_huge, pd = r->parent_data;

		if (read(up[0], &c, sizeof(c)) != sizeof(c))
			return -1;
		*r = c;
		r->parent_huge_before = pb;
		r->parent_huge = ph;
		r->parent_data = pd;
	}
	waitpid(pid, NULL, 0);
	r->cow_alloc = a0 < 0 ? -1 : vmstat("thp_cow_alloc") - a0;
	r->cow_fallback = f0 < 0 ? -1 : vmstat("thp_cow_fallback") - f0;
	r->split_pmd = vmstat("thp_split_pmd") - s0;
	close(up[0]); close(up[1]); close(down[0]); close(down[1]);
	munmap(p, len);
	return 0;
}

static void print_cow(const char *name, const struct cow_result *r, int ok_cond)
{
	printf("\"%s\":{\"child_huge\":%s,\"parent_huge_before_write\":%s,"
	       "\"parent_huge\":%s,\"child_data_ok\":%s,\"parent_data_ok\":%s,"
	       "\"thp_cow_alloc\":%ld,\"thp_cow_fallback\":%ld,\"thp_split_pmd\":%ld,"
	       "\"ok\":%s},",
	       name, r->child_huge ? "true" : "false",
	       r->parent_huge_before ? "true" : "false",
	       r->parent_huge ? "true" : "false",
	       r->child_data ? "true" : "false", r->parent_data ? "true" : "false",
	       r->cow_alloc, r->cow_fallback, r->split_pmd,
	       ok_cond ? "true" : "false");
}

/*
 * One fork, the child writes one byte in each block: time of those first
 * write faults (and, on the split path, of the MADV_COLLAPSE repair).
 */
struct timing {
	double fault, collapse;
	long faults, huge_ok;
};

static int time_first_write(int nblocks, int direct, struct timing *t)
{
	size_t len = nblocks * pmd;
	char *p = huge_region(nblocks);
	int up[2];
	pid_t pid;

	if (!p || pipe(up))
		return -1;
	if (direct)
		madvise(p, len, MADV_THP_COW_);
	pid = fork();
	if (pid == 0) {
		struct timing c = { 0 };
		long f0;
		double t0, t1, t2;

		/* the child's own first-touch faults (stack, libc data) first */
		f0 = minflt();
		t0 = now();
		f0 = minflt();
		t0 = now();

		for (int b = 0; b < nblocks; b++)
			p[b * pmd + CHILD_OFF] = 1;
		t1 = now();
		c.faults = minflt() - f0;
		if (!direct)
			madvise(p, len, MADV_COLLAPSE_);
		t2 = now();
		c.fault = t1 - t0;
		c.collapse = t2 - t1;
		c.huge_ok = huge_bytes(p, len) == (long)len;
		if (write(up[1], &c, sizeof(c)) != sizeof(c))
			_exit(1);
		_exit(0);
	}
	if (pid < 0 || read(up[0], t, sizeof(*t)) != sizeof(*t))
		return -1;
	waitpid(pid, NULL, 0);
	close(up[0]); close(up[1]);
	munmap(p, len);
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void ratio(int nblocks, int rounds)
{
	double cow[64], split[64], coll[64], sum[64];
	long cow_faults = 0, split_faults = 0;
	int huge_ok = 1;
	struct timing t;

	if (rounds > 64)
		rounds = 64;
	/* warm up both paths (and the guest memory behind them) */
	time_first_write(nblocks, 1, &t);
	time_first_write(nblocks, 0, &t);
	for (int i = 0; i < rounds; i++) {
		for (int k = 0; k < 2; k++) {
			int direct = (i + k) % 2;	/* interleave, alternate order */

			if (time_first_write(nblocks, direct, &t))
				return;
			huge_ok &= t.huge_ok;
			if (direct) {
				cow[i] = t.fault;
				cow_faults = t.faults;
			} else {
				split[i] = t.fault;
				coll[i] = t.collapse;
				sum[i] = t.fault + t.collapse;
				split_faults = t.faults;
			}
		}
	}
	qsort(cow, rounds, sizeof(double), cmp_double);
	qsort(split, rounds, sizeof(double), cmp_double);
	qsort(coll, rounds, sizeof(double), cmp_double);
	qsort(sum, rounds, sizeof(double), cmp_double);
	printf("\"ratio\":{\"blocks\":%d,\"rounds\":%d,"
	       "\"direct_cow_ms\":%.3f,\"split_fault_ms\":%.3f,\"collapse_ms\":%.3f,"
	       "\"split_plus_collapse_ms\":%.3f,"
	       "\"direct_over_split_plus_collapse\":%.3f,\"direct_over_split_fault\":%.3f,"
	       "\"direct_cow_faults\":%ld,\"split_faults\":%ld,\"all_huge_after\":%s},",
	       nblocks, rounds, cow[rounds / 2] * 1e3, split[rounds / 2] * 1e3,
	       coll[rounds / 2] * 1e3, sum[rounds / 2] * 1e3,
	       sum[rounds / 2] > 0 ? cow[rounds / 2] / sum[rounds / 2] : -1.0,
	       split[rounds / 2] > 0 ? cow[rounds / 2] / split[rounds / 2] : -1.0,
	       cow_faults, split_faults, huge_ok ? "true" : "false");
}

static int advice_known(int advice)
{
	char *p = huge_region(1);
	int r;

	if (!p)
		return EFAULT;
	r = madvise(p, 0, advice) ? errno : 0;
	munmap(p, pmd);
	return r;
}

int main(int argc, char **argv)
{
	char buf[256], mode[64];
	struct utsname u;
	struct cow_result r;
	int has_cow;

	int rounds = argc > 1 ? atoi(argv[1]) : 5;

	if (read_file(THP_DIR "hpage_pmd_size", buf, sizeof(buf))) {
		printf("{\"error\":\"no transparent_hugepage in sysfs\"}\n");
		return 1;
	}
	pmd = strtoul(buf, NULL, 10);
	uname(&u);
	printf("{\"release\":\"%s\",\"pmd_size\":%zu,", u.release, pmd);
	{
		/* The timings below are only as fine as this clock (coarse in some guests). */
		struct timespec res;
		double start = now(), prev = start, t, step = 1.0;

		clock_getres(CLOCK_MONOTONIC, &res);
		for (int i = 0; i < 1000000 && (t = now()) - start < 0.05; i++)
			if (t > prev) {
				if (t - prev < step)
					step = t - prev;
				prev = t;
			}
		printf("\"clock_res_ns\":%ld,\"clock_step_ns\":%.0f,", res.tv_nsec, step * 1e9);
	}
	if (!bracketed(THP_DIR "enabled", mode, sizeof(mode)))
		printf("\"thp_enabled\":\"%s\",", mode);
	has_cow = !bracketed(THP_DIR "thp_cow", mode, sizeof(mode));
	if (has_cow)
		printf("\"thp_cow_default\":\"%s\",", mode);
	else
		printf("\"thp_cow_default\":null,");
	printf("\"advice_collapse\":\"%s\",", errname(advice_known(MADV_COLLAPSE_)));
	printf("\"advice_thp_cow\":\"%s\",", errname(advice_known(MADV_THP_COW_)));

	{
		char *p = huge_region(1);
		long h = p ? huge_bytes(p, pmd) : -1;

		printf("\"pagemap_scan\":\"%s\",", have_scan == 1 ? "ok" : "ENOTTY");
		printf("\"fresh_region_huge\":%s,", h == (long)pmd ? "true" : "false");
		if (p)
			munmap(p, pmd);
	}

	/* The kernel's default behaviour (thp_cow left as it boots, no flag). */
	if (cow_scenario(2, 0, 1, &r) == 0) {
		printf("\"fork_child_huge\":%s,\"fork_parent_huge\":%s,"
		       "\"fork_data_ok\":%s,\"fork_split_pmd\":%ld,",
		       r.child_huge ? "true" : "false",
		       r.parent_huge_before ? "true" : "false",
		       r.child_data && r.parent_data ? "true" : "false", r.split_pmd);
		if (r.collapse_errno == 0 && !r.child_huge_after_collapse)
			printf("\"collapse\":\"not huge after\",");
		else
			printf("\"collapse\":\"%s\",", errname(r.collapse_errno));
	} else {
		printf("\"fork_error\":\"%s\",", strerror(errno));
	}

	if (has_cow) {
		char saved[64];

		bracketed(THP_DIR "thp_cow", saved, sizeof(saved));
		write_file(THP_DIR "thp_cow", "madvise");
		if (cow_scenario(4, MADV_THP_COW_, 0, &r) == 0)
			print_cow("direct_cow", &r,
				  r.child_huge && r.parent_huge_before && r.parent_huge &&
				  r.child_data && r.parent_data && r.cow_alloc == 4 &&
				  r.split_pmd == 0);
		if (cow_scenario(2, MADV_NO_THP_COW_, 0, &r) == 0)
			print_cow("cow_cleared", &r, !r.child_huge && r.cow_alloc == 0);
		{
			char *p = huge_region(1);

			madvise(p, pmd, MADV_THP_COW_);
			printf("\"smaps_tc\":%s,", vma_has_flag(p, "tc") ? "true" : "false");
			munmap(p, pmd);
		}
		write_file(THP_DIR "thp_cow", "never");
		if (cow_scenario(2, MADV_THP_COW_, 0, &r) == 0)
			print_cow("cow_never", &r, !r.child_huge && r.cow_alloc == 0);
		write_file(THP_DIR "thp_cow", "always");
		if (cow_scenario(2, 0, 0, &r) == 0)
			print_cow("cow_always", &r, r.child_huge && r.cow_alloc == 2);
		write_file(THP_DIR "thp_cow", "madvise");
		if (rounds > 0)
			ratio(32, rounds);
		write_file(THP_DIR "thp_cow", saved);
	}
	printf("\"done\":true}\n");
	return 0;
}

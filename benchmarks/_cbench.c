/* Inner loops of the benchmarks, in C so that Python's own overhead does
 * not hide what is measured (a dependent load costs ~100 ns; one Python
 * bytecode costs about as much). Built at run time by _cbench.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

uint64_t tgb_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: a fixed seed gives the same chain on every run. */
static uint64_t next_rand(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* One slot per page, at a pseudo-random cache line of that page, linked
 * into a single random cycle through every page (Sattolo's algorithm).
 * Each hop then lands on another page and another line: one TLB lookup
 * and one cache miss per hop. Slots hold the word index of the next slot.
 * Returns the word index of the first slot, or -1 without memory. */
int64_t tgb_build_chain(uint64_t *base, size_t size, size_t page, uint64_t seed)
{
    size_t n = size / page, words_per_page = page / 8, lines = page / 64;
    uint32_t *order = malloc(n * sizeof(*order));
    if (!order || n < 2) {
        free(order);
        return -1;
    }
    uint64_t state = seed | 1;
    for (size_t i = 0; i < n; i++)
        order[i] = (uint32_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = next_rand(&state) % i;
        uint32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
#define SLOT(p) ((uint64_t)(p) * words_per_page + (((uint64_t)(p) * 2654435761u >> 7) % lines) * 8)
    for (size_t i = 0; i < n; i++)
        base[SLOT(order[i])] = SLOT(order[(i + 1) % n]);
    int64_t first = (int64_t)SLOT(order[0]);
#undef SLOT
    free(order);
    return first;
}

/* Follow the chain for `hops` dependent loads; returns where it ended
 * (the caller keeps it, so the loop cannot be optimised away). */
uint64_t tgb_chase(const uint64_t *base, uint64_t at, uint64_t hops)
{
    const volatile uint64_t *b = base;
    while (hops--)
        at = b[at];
    return at;
}

void tgb_copy(void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
}

void tgb_fill(void *dst, int value, size_t n)
{
    memset(dst, value, n);
}

/* Write one byte every `stride` bytes, keeping its value: after fork this
 * is the write that makes the kernel split a shared PMD. */
void tgb_write_each(void *addr, size_t len, size_t stride)
{
    volatile unsigned char *p = addr;
    for (size_t off = 0; off < len; off += stride)
        p[off] = p[off];
}

/* Read one byte every `stride` bytes (warms caches and TLB, splits nothing). */
uint64_t tgb_read_each(const void *addr, size_t len, size_t stride)
{
    const volatile unsigned char *p = addr;
    uint64_t sum = 0;
    for (size_t off = 0; off < len; off += stride)
        sum += p[off];
    return sum;
}

/* Until *stop: map `bytes`, touch each page, unmap; store each round's
 * start (tgb_now_ns clock) and latency in ns. Every round takes mmap_lock
 * (mmap, fault, munmap), so it stalls whenever another thread holds it
 * for write. Returns the number of rounds stored (at most cap). */
size_t tgb_fault_loop(volatile int *stop, uint64_t *start_ns, uint64_t *lat_ns,
                      size_t cap, size_t bytes)
{
    size_t n = 0;
    while (!*stop && n < cap) {
        uint64_t t0 = tgb_now_ns();
        start_ns[n] = t0;
        unsigned char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            break;
        for (size_t off = 0; off < bytes; off += 4096)
            p[off] = 1;
        munmap(p, bytes);
        lat_ns[n++] = tgb_now_ns() - t0;
    }
    return n;
}

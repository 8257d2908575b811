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

/* -- service and snapshot workloads --------------------------------------- */

#define TGB_GOLDEN 0x9E3779B97F4A7C15ULL

/* `count` dependent lookups in a float32 table of 2^bits entries: each
 * index is derived from the value just read, so the loads cannot overlap
 * and each one pays its full TLB and cache miss. A generator mixed in at
 * each step keeps the walk from falling into a short cycle (an index that
 * depended on the previous index alone would soon repeat a few thousand
 * entries that stay in the cache). Returns the last index. */
uint64_t tgb_lookup_f32(const float *table, unsigned bits, uint64_t start, uint64_t count)
{
    uint64_t mask = (1ULL << bits) - 1, i = start & mask, rnd = start | 1;
    if (bits == 0 || bits >= 64)
        return 0;
    while (count--) {
        float v = table[i];
        uint32_t b;
        memcpy(&b, &v, sizeof(b));
        i = ((next_rand(&rnd) ^ b) * TGB_GOLDEN) >> (64 - bits);
    }
    return i;
}

/* The open-addressing table: 2^bits slots of {key, value} (16 bytes),
 * key 0 = empty, home slot (key * TGB_GOLDEN) >> (64 - bits), linear
 * probing. Filled at 50 %: every odd slot holds the key whose home it is,
 * so a hit needs one probe and the fill is a sequential pass. */
static uint64_t kv_inverse(void)
{
    uint64_t x = TGB_GOLDEN; /* Newton: x = x * (2 - a x) doubles the bits */
    for (int k = 0; k < 6; k++)
        x *= 2 - TGB_GOLDEN * x;
    return x;
}

static uint64_t kv_key(uint64_t slot, unsigned bits, uint64_t inverse)
{
    return inverse * (slot << (64 - bits));
}

void tgb_kv_fill(uint64_t *slots, unsigned bits)
{
    uint64_t n = 1ULL << bits, inverse = kv_inverse();
    for (uint64_t s = 0; s < n; s++) {
        slots[2 * s] = (s & 1) ? kv_key(s, bits, inverse) : 0;
        slots[2 * s + 1] = s;
    }
}

/* Serve batches of `batch` operations (reads, and `update_permille`/1000
 * updates that add 1 to the value) on random existing keys until
 * tgb_now_ns() >= until_ns or `cap` batches; each key is picked from the
 * value read before, so operations run one after another as a single
 * client's requests would. Stores each batch's start and latency (ns);
 * returns the number of batches stored. *state carries the generator. */
size_t tgb_kv_serve(uint64_t *slots, unsigned bits, uint64_t *state, uint64_t batch,
                    unsigned update_permille, uint64_t until_ns,
                    uint64_t *start_ns, uint64_t *lat_ns, size_t cap)
{
    uint64_t mask = (1ULL << bits) - 1, inverse = kv_inverse(), rnd = *state | 1;
    size_t done = 0;
    if (bits == 0 || bits >= 64)
        return 0;
    while (done < cap) {
        uint64_t t0 = tgb_now_ns();
        if (t0 >= until_ns)
            break;
        for (uint64_t op = 0; op < batch; op++) {
            uint64_t r = next_rand(&rnd);
            uint64_t key = kv_key(((r >> 11) & mask) | 1, bits, inverse);
            uint64_t s = (key * TGB_GOLDEN) >> (64 - bits);
            while (slots[2 * s] != key && slots[2 * s] != 0)
                s = (s + 1) & mask;
            if ((r & 1023) < update_permille * 1024 / 1000)
                slots[2 * s + 1] += 1;
            rnd ^= slots[2 * s + 1];
        }
        start_ns[done] = t0;
        lat_ns[done++] = tgb_now_ns() - t0;
    }
    *state = rnd;
    return done;
}

/* t[i] = i for the service's and the pool's tables: one sequential pass. */
void tgb_fill_index_f32(float *table, size_t n)
{
    for (size_t i = 0; i < n; i++)
        table[i] = (float)i;
}

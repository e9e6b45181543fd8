/*
 * The pyvirtio ring benchmark loop in C: the same split-virtqueue algorithm
 * (VIRTIO 1.2 §2.7) on the same byte layout, so bench/ring.py can report how
 * far the Python implementation is from compiled code.
 *
 * Layout: the legacy contiguous ring (§2.7.2) of `num` entries at offset 0 of
 * one guest-memory buffer, aligned 4096; data buffers after it.  Both sides
 * run in this process, as in bench/ring.py, and touch the ring only through
 * volatile loads/stores (READ_ONCE/WRITE_ONCE), so nothing is optimised away.
 *
 * Driver (Linux virtio_ring.c's algorithm): free-descriptor stack, per-head
 * token and chain record, add = write k descriptors + avail ring entry, then
 * avail.idx; kick_prepare = full fence + vring_need_event(avail_event);
 * get_buf = validate used id (range, outstanding), free the chain, publish
 * used_event + full fence.
 * Device (QEMU virtio.c's algorithm): pop = read avail.idx once, check it is
 * at most num ahead, head < num, walk the chain with hop limit num, next <
 * num, every buffer non-empty and inside guest memory, readable before
 * writable, translate to an iovec; publish avail_event (EVENT_IDX); push =
 * used element + used.idx with the signalled_used_valid rule;
 * should_notify = full fence + vring_need_event(used_event).
 *
 * Usage: ring_loop MODE NUM BATCH CHAIN SECONDS
 *   MODE full   : add, kick_prepare, pop, push, should_notify, get_buf per batch
 *   MODE device : the driver fills the whole ring (untimed); pop+push timed
 * Prints: descs=<descriptors> seconds=<seconds> (the best of 3 runs).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define RD16(p) (*(volatile uint16_t *)(p))
#define WR16(p, v) (*(volatile uint16_t *)(p) = (uint16_t)(v))
#define RD32(p) (*(volatile uint32_t *)(p))
#define WR32(p, v) (*(volatile uint32_t *)(p) = (uint32_t)(v))

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

static uint8_t *mem;          /* guest memory, guest address 0 */
static uint64_t mem_size;
static unsigned num;
static struct desc *desc;     /* volatile access via the macros below */
static uint8_t *avail, *used; /* ring bytes */

static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline int need_event(uint16_t event, uint16_t new, uint16_t old)
{
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

/* ------------------------------------------------------------- driver */
static uint16_t *free_stack; static unsigned n_free;
static uint64_t *tokens; static uint8_t *outstanding;
static uint16_t *chain_len; static uint16_t (*chain)[8];
static uint16_t avail_shadow, last_used, num_added;
static int broken;

static int drv_add(const uint64_t *addrs, const uint32_t *lens, unsigned k, unsigned n_out,
                   uint64_t token)
{
    if (n_free < k) return -1;
    uint16_t idx[8];
    for (unsigned j = 0; j < k; j++) idx[j] = free_stack[--n_free];
    for (unsigned j = 0; j < k; j++) {
        volatile struct desc *d = &desc[idx[j]];
        d->addr = addrs[j];
        d->len = lens[j];
        d->flags = (uint16_t)((j >= n_out ? F_WRITE : 0) | (j + 1 < k ? F_NEXT : 0));
        d->next = j + 1 < k ? idx[j + 1] : 0;
    }
    uint16_t head = idx[0];
    memcpy(chain[head], idx, sizeof idx);
    chain_len[head] = (uint16_t)k;
    tokens[head] = token;
    outstanding[head] = 1;
    WR16(avail + 4 + 2 * (avail_shadow & (num - 1)), head);
    avail_shadow++;
    WR16(avail + 2, avail_shadow);   /* x86 keeps stores in order */
    num_added++;
    return head;
}

static int drv_kick_prepare(void)
{
    full_fence();
    uint16_t new = avail_shadow, old = (uint16_t)(new - num_added);
    num_added = 0;
    return need_event(RD16(used + 4 + 8 * num), new, old);
}

static int drv_get_buf(uint64_t *token, uint32_t *len)
{
    uint16_t used_idx = RD16(used + 2);
    if (used_idx == last_used) return 0;
    if ((uint16_t)(used_idx - last_used) > num) { broken = 1; return -1; }
    unsigned slot = last_used & (num - 1);
    uint32_t id = RD32(used + 4 + 8 * slot);
    *len = RD32(used + 8 + 8 * slot);
    if (id >= num || !outstanding[id]) { broken = 1; return -1; }
    *token = tokens[id];
    outstanding[id] = 0;
    for (unsigned j = 0; j < chain_len[id]; j++) free_stack[n_free++] = chain[id][j];
    last_used++;
    WR16(avail + 4 + 2 * num, last_used);
    full_fence();
    return 1;
}

/* ------------------------------------------------------------- device */
struct iov { uint8_t *base; uint32_t len; };
static uint16_t last_avail, shadow_avail, used_idx_dev, signalled_used;
static int signalled_valid; static unsigned inuse;

static int dev_pop(struct iov *rd, unsigned *n_rd, struct iov *wr, unsigned *n_wr)
{
    if (shadow_avail == last_avail) {
        uint16_t idx = RD16(avail + 2);
        if ((uint16_t)(idx - last_avail) > num) { broken = 1; return -1; }
        shadow_avail = idx;
        if (idx == last_avail) return -2;
    }
    unsigned head = RD16(avail + 4 + 2 * (last_avail & (num - 1)));
    if (head >= num) { broken = 1; return -1; }
    last_avail++;
    WR16(used + 4 + 8 * num, last_avail);  /* avail_event, EVENT_IDX */
    inuse++;
    unsigned i = head, hops = 0;
    *n_rd = *n_wr = 0;
    for (;;) {
        volatile struct desc *vd = &desc[i];
        struct desc d = { vd->addr, vd->len, vd->flags, vd->next };   /* read once */
        if (d.flags & F_INDIRECT) { broken = 1; return -1; }          /* not negotiated */
        if (d.len == 0 || d.addr >= mem_size || d.len > mem_size - d.addr) { broken = 1; return -1; }
        if (d.flags & F_WRITE) {
            wr[(*n_wr)++] = (struct iov){ mem + d.addr, d.len };
        } else {
            if (*n_wr) { broken = 1; return -1; }
            rd[(*n_rd)++] = (struct iov){ mem + d.addr, d.len };
        }
        hops++;
        if (!(d.flags & F_NEXT)) break;
        if (hops >= num || d.next >= num || hops >= 8) { broken = 1; return -1; }
        i = d.next;
    }
    return (int)head;
}

static void dev_push(unsigned head, uint32_t len)
{
    unsigned slot = used_idx_dev & (num - 1);
    WR32(used + 4 + 8 * slot, head);
    WR32(used + 8 + 8 * slot, len);
    uint16_t old = used_idx_dev, new = (uint16_t)(old + 1);
    WR16(used + 2, new);
    used_idx_dev = new;
    inuse--;
    if ((uint16_t)(new - signalled_used) < (uint16_t)(new - old)) signalled_valid = 0;
}

static int dev_should_notify(void)
{
    full_fence();
    int valid = signalled_valid;
    signalled_valid = 1;
    uint16_t old = signalled_used, new = signalled_used = used_idx_dev;
    return !valid || need_event(RD16(avail + 4 + 2 * num), new, old);
}

/* -------------------------------------------------------------- setup */
static void setup(void)
{
    uint64_t desc_sz = 16ull * num, avail_sz = 6 + 2ull * num, used_sz = 6 + 8ull * num;
    uint64_t used_off = (desc_sz + avail_sz + 4095) & ~4095ull;
    mem_size = used_off + used_sz + (1u << 22);
    mem = aligned_alloc(4096, (mem_size + 4095) & ~4095ull);
    memset(mem, 0, mem_size);
    desc = (struct desc *)mem;
    avail = mem + desc_sz;
    used = mem + used_off;
    free_stack = malloc(num * sizeof *free_stack);
    for (unsigned i = 0; i < num; i++) free_stack[i] = (uint16_t)(num - 1 - i);
    n_free = num;
    tokens = calloc(num, sizeof *tokens);
    outstanding = calloc(num, 1);
    chain_len = calloc(num, sizeof *chain_len);
    chain = calloc(num, sizeof *chain);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc != 6) { fprintf(stderr, "usage: %s full|device NUM BATCH CHAIN SECONDS\n", argv[0]); return 2; }
    int device_only = strcmp(argv[1], "device") == 0;
    num = (unsigned)atoi(argv[2]);
    unsigned batch = (unsigned)atoi(argv[3]), k = (unsigned)atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (k < 1 || k > 8 || batch < 1 || batch * k > num) { fprintf(stderr, "bad sizes\n"); return 2; }
    setup();
    uint64_t data = (uint64_t)(used - mem) + 6 + 8ull * num + 64;
    uint64_t addrs[8]; uint32_t lens[8];
    for (unsigned j = 0; j < k; j++) { addrs[j] = data + 4096ull * j; lens[j] = 64; }
    struct iov rd[8], wr[8];
    unsigned n_rd, n_wr, heads[32768];
    volatile uint64_t sink = 0;
    double best = 1e30; uint64_t best_descs = 1;
    for (int rep = 0; rep < 3; rep++) {
        uint64_t descs = 0, tok = 0;
        double t0 = now(), elapsed = 0, tend = t0 + seconds / 3;
        while (now() < tend) {
            for (int it = 0; it < 64; it++) {
                if (device_only) {
                    unsigned fill = num / k, n = 0;
                    for (unsigned b = 0; b < fill; b++) drv_add(addrs, lens, k, 1, tok++);
                    double t1 = now();
                    while (n < fill) {
                        unsigned m = fill - n < batch ? fill - n : batch;
                        for (unsigned b = 0; b < m; b++) {
                            int h = dev_pop(rd, &n_rd, wr, &n_wr);
                            if (h < 0) { fprintf(stderr, "pop failed\n"); return 1; }
                            heads[b] = (unsigned)h;
                            sink += n_rd + n_wr + (uintptr_t)rd[0].base;
                        }
                        for (unsigned b = 0; b < m; b++) dev_push(heads[b], 0);
                        n += m;
                    }
                    elapsed += now() - t1;
                    uint64_t t; uint32_t l;
                    while (drv_get_buf(&t, &l) == 1) sink += t;
                    descs += (uint64_t)fill * k;
                } else {
                    for (unsigned b = 0; b < batch; b++) drv_add(addrs, lens, k, 1, tok++);
                    sink += drv_kick_prepare();
                    for (unsigned b = 0; b < batch; b++) {
                        int h = dev_pop(rd, &n_rd, wr, &n_wr);
                        if (h < 0) { fprintf(stderr, "pop failed\n"); return 1; }
                        heads[b] = (unsigned)h;
                        sink += n_rd + n_wr + (uintptr_t)rd[0].base;
                    }
                    for (unsigned b = 0; b < batch; b++) dev_push(heads[b], 0);
                    sink += dev_should_notify();
                    uint64_t t; uint32_t l;
                    for (unsigned b = 0; b < batch; b++) {
                        if (drv_get_buf(&t, &l) != 1) { fprintf(stderr, "get failed\n"); return 1; }
                        sink += t;
                    }
                    descs += (uint64_t)batch * k;
                }
            }
            if (broken) { fprintf(stderr, "ring broken\n"); return 1; }
        }
        if (!device_only) elapsed = now() - t0;
        if (elapsed / descs < best / best_descs) { best = elapsed; best_descs = descs; }
    }
    printf("descs=%llu seconds=%.9f sink=%llu\n", (unsigned long long)best_descs, best,
           (unsigned long long)(sink & 1));
    return 0;
}

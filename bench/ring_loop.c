/*
 * The pyvirtio ring benchmark loop in C: the same split-virtqueue algorithm
 * (VIRTIO 1.2 §2.7) — and packed-virtqueue algorithm (§2.8) — on the same byte layout, so bench/ring.py can report how
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
 * The packed ring (VIRTIO 1.2 §2.8), with RING=packed: one descriptor ring of
 * `num` 16-byte descriptors at offset 0, then the driver and the device event
 * suppression structures (4 bytes each).  Driver (Linux virtqueue_*_packed's
 * algorithm): free buffer-id stack, per-id token and ring positions taken;
 * add = write the chain's descriptors (id in each), the head's flags last,
 * flipping the AVAIL/USED bits when the position wraps; kick_prepare = full
 * fence + one 32-bit read of the device event structure, ENABLE/DISABLE, or
 * the off_wrap event moved one ring back when its wrap counter differs +
 * vring_need_event; get_buf = the flags at last_used (used in this lap?),
 * then id and len, id range and outstanding checks, skip the positions the
 * buffer took (off_wrap is written only while interrupts are DESC-armed, as
 * in pyvirtio's driver; the benchmark never arms them).
 * Device (QEMU virtqueue_packed_*'s algorithm): pop = the head's flags once
 * (available in this lap?), ring positions in flight below num, then each
 * descriptor's fields, chains follow in the ring (every one available in its
 * lap, no indirect, no more than the positions not in flight), buffers
 * non-empty, inside memory, readable before writable; buffer id < num and not
 * in flight; flush = one used descriptor per buffer at the next used
 * positions (len, id, flags), the first one's flags written last, clearing
 * signalled_used_valid when the used position wraps; should_notify = full
 * fence + one 32-bit read of the driver event structure, DISABLE / ENABLE /
 * vring_need_event over the event moved one ring back in the other lap.
 *
 * Usage: ring_loop MODE NUM BATCH CHAIN SECONDS [RING]
 *   MODE full   : add, kick_prepare, pop, push, should_notify, get_buf per batch
 *   MODE device : the driver fills the whole ring (untimed); pop+push timed
 *   RING split (default) or packed
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

/* -------------------------------------------------------- packed ring */
#define P_AVAIL (1u << 7)
#define P_USED (1u << 15)
#define P_BOTH (P_AVAIL | P_USED)
#define EV_ENABLE 0
#define EV_DISABLE 1
#define EV_DESC 2
struct pdesc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
static uint8_t *pring;                     /* descriptor ring bytes */
static uint8_t *drv_event, *dev_event;     /* off_wrap (le16) + flags (le16) each */
#define PD(i) ((volatile struct pdesc *)(pring + 16ull * (i)))

/* driver */
static uint16_t *p_free_ids; static unsigned p_n_free_ids, p_num_free;
static uint16_t *p_ndescs; static uint64_t *p_tokens; static uint8_t *p_out;
static unsigned p_next_avail, p_avail_wrap = 1, p_avail_flags = P_AVAIL;
static unsigned p_last_used, p_used_wrap = 1, p_num_added;
static unsigned p_event_shadow = EV_ENABLE;

static int pdrv_add(const uint64_t *addrs, const uint32_t *lens, unsigned k, unsigned n_out,
                    uint64_t token)
{
    if (p_num_free < k || !p_n_free_ids) return -1;
    unsigned id = p_free_ids[--p_n_free_ids];
    unsigned head = p_next_avail, pos = head;
    uint16_t head_flags = 0;
    for (unsigned j = 0; j < k; j++) {
        uint16_t fl = (uint16_t)(p_avail_flags | (j + 1 < k ? F_NEXT : 0)
                                 | (j >= n_out ? F_WRITE : 0));
        volatile struct pdesc *d = PD(pos);
        d->addr = addrs[j];
        d->len = lens[j];
        d->id = (uint16_t)id;
        if (j == 0) head_flags = fl; else d->flags = fl;
        if (++pos == num) { pos = 0; p_avail_wrap ^= 1; p_avail_flags ^= P_BOTH; }
    }
    p_next_avail = pos;
    p_tokens[id] = token;
    p_ndescs[id] = (uint16_t)k;
    p_out[id] = 1;
    p_num_free -= k;
    p_num_added += k;
    PD(head)->flags = head_flags;          /* x86 keeps stores in order */
    return (int)id;
}

static int pdrv_kick_prepare(void)
{
    full_fence();
    unsigned added = p_num_added;
    p_num_added = 0;
    uint32_t snap = RD32(dev_event);
    unsigned flags = snap >> 16;
    if (flags != EV_DESC) return flags != EV_DISABLE;
    if (added >= num) return 1;
    unsigned off_wrap = snap & 0xffff;
    int event = (int)(off_wrap & 0x7fff);
    if ((off_wrap >> 15) != p_avail_wrap) event -= (int)num;
    uint16_t new = (uint16_t)p_next_avail;
    return (uint16_t)(new - (uint16_t)event - 1) < (uint16_t)added;
}

static int pdrv_get_buf(uint64_t *token, uint32_t *len)
{
    volatile struct pdesc *d = PD(p_last_used);
    unsigned flags = d->flags;             /* once, then the fields it publishes */
    if ((flags & P_BOTH) != (p_used_wrap ? P_BOTH : 0)) return 0;
    unsigned id = d->id;
    *len = d->len;
    if (id >= num || !p_out[id]) { broken = 1; return -1; }
    *token = p_tokens[id];
    p_out[id] = 0;
    p_free_ids[p_n_free_ids++] = (uint16_t)id;
    p_num_free += p_ndescs[id];
    p_last_used += p_ndescs[id];
    if (p_last_used >= num) { p_last_used -= num; p_used_wrap ^= 1; }
    if (p_event_shadow == EV_DESC) {
        WR16(drv_event, p_last_used | p_used_wrap << 15);
        full_fence();
    }
    return 1;
}

/* device */
static unsigned q_last_avail, q_avail_wrap = 1, q_used, q_used_wrap = 1, q_inuse;
static unsigned q_signalled; static int q_signalled_valid;
static uint16_t *q_inflight;               /* ring positions per id in flight, 0: none */

static int pdev_pop(struct iov *rd, unsigned *n_rd, struct iov *wr, unsigned *n_wr)
{
    unsigned head = q_last_avail, wrap = q_avail_wrap;
    volatile struct pdesc *vd = PD(head);
    unsigned flags = vd->flags;            /* once, before the rest */
    unsigned want = wrap ? P_AVAIL : P_USED;
    if ((flags & P_BOTH) != want) return -2;
    unsigned room = num - q_inuse;
    if (!room) { broken = 1; return -1; }
    struct pdesc d = { vd->addr, vd->len, vd->id, (uint16_t)flags };
    unsigned pos = head, n = 1;
    *n_rd = *n_wr = 0;
    if (flags & F_INDIRECT) { broken = 1; return -1; }   /* not negotiated */
    for (;;) {
        if (d.len == 0 || d.addr >= mem_size || d.len > mem_size - d.addr) { broken = 1; return -1; }
        if (d.flags & F_WRITE) {
            wr[(*n_wr)++] = (struct iov){ mem + d.addr, d.len };
        } else {
            if (*n_wr) { broken = 1; return -1; }
            rd[(*n_rd)++] = (struct iov){ mem + d.addr, d.len };
        }
        if (!(d.flags & F_NEXT)) break;
        if (n >= room || n >= 8) { broken = 1; return -1; }
        if (++pos == num) { pos = 0; want ^= P_BOTH; }
        vd = PD(pos);
        d = (struct pdesc){ vd->addr, vd->len, vd->id, vd->flags };
        if ((d.flags & P_BOTH) != want || (d.flags & F_INDIRECT)) { broken = 1; return -1; }
        n++;
    }
    unsigned id = d.id;                    /* the last descriptor's (§2.8.6) */
    if (id >= num || q_inflight[id]) { broken = 1; return -1; }
    q_inflight[id] = (uint16_t)n;
    q_inuse += n;
    q_last_avail = head + n;
    if (q_last_avail >= num) { q_last_avail -= num; q_avail_wrap = wrap ^ 1; }
    return (int)id;
}

static void pdev_flush(const unsigned *ids, unsigned m)
{
    unsigned pos = q_used, wrap = q_used_wrap, first = pos;
    uint16_t first_flags = 0;
    for (unsigned k = 0; k < m; k++) {
        unsigned id = ids[k];
        uint16_t fl = (uint16_t)(wrap ? P_BOTH : 0);   /* used length 0: no WRITE */
        volatile struct pdesc *d = PD(pos);
        d->len = 0;
        d->id = (uint16_t)id;
        if (k == 0) first_flags = fl; else d->flags = fl;
        unsigned n = q_inflight[id];
        q_inflight[id] = 0;
        q_inuse -= n;
        pos += n;
        if (pos >= num) { pos -= num; wrap ^= 1; q_signalled_valid = 0; }
    }
    PD(first)->flags = first_flags;        /* the first one last */
    q_used = pos;
    q_used_wrap = wrap;
}

static int pdev_should_notify(void)
{
    full_fence();
    uint32_t snap = RD32(drv_event);
    unsigned flags = snap >> 16;
    unsigned old = q_signalled, new = q_signalled = q_used;
    int valid = q_signalled_valid;
    q_signalled_valid = 1;
    if (flags == EV_DISABLE) return 0;
    if (flags == EV_ENABLE || !valid) return 1;
    unsigned off_wrap = snap & 0xffff;
    int off = (int)(off_wrap & 0x7fff);
    if ((off_wrap >> 15) != q_used_wrap) off -= (int)num;
    return (uint16_t)(new - (uint16_t)off - 1) < (uint16_t)(new - old);
}

static void setup_packed(void)
{
    uint64_t ring_sz = 16ull * num;
    mem_size = ring_sz + 8 + (1u << 22);
    mem = aligned_alloc(4096, (mem_size + 4095) & ~4095ull);
    memset(mem, 0, mem_size);
    pring = mem;
    drv_event = mem + ring_sz;
    dev_event = drv_event + 4;
    used = dev_event;                      /* data buffers go after it (main) */
    p_free_ids = malloc(num * sizeof *p_free_ids);
    for (unsigned i = 0; i < num; i++) p_free_ids[i] = (uint16_t)(num - 1 - i);
    p_n_free_ids = p_num_free = num;
    p_ndescs = calloc(num, sizeof *p_ndescs);
    p_tokens = calloc(num, sizeof *p_tokens);
    p_out = calloc(num, 1);
    q_inflight = calloc(num, sizeof *q_inflight);
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
    if (argc != 6 && argc != 7) { fprintf(stderr, "usage: %s full|device NUM BATCH CHAIN SECONDS [split|packed]\n", argv[0]); return 2; }
    int device_only = strcmp(argv[1], "device") == 0;
    int packed = argc == 7 && strcmp(argv[6], "packed") == 0;
    num = (unsigned)atoi(argv[2]);
    unsigned batch = (unsigned)atoi(argv[3]), k = (unsigned)atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (k < 1 || k > 8 || batch < 1 || batch * k > num) { fprintf(stderr, "bad sizes\n"); return 2; }
    if (packed) setup_packed(); else setup();
    uint64_t data = packed ? (uint64_t)(used - mem) + 64 : (uint64_t)(used - mem) + 6 + 8ull * num + 64;
    int (*add)(const uint64_t *, const uint32_t *, unsigned, unsigned, uint64_t) =
        packed ? pdrv_add : drv_add;
    int (*kick_prepare)(void) = packed ? pdrv_kick_prepare : drv_kick_prepare;
    int (*get_buf)(uint64_t *, uint32_t *) = packed ? pdrv_get_buf : drv_get_buf;
    int (*pop)(struct iov *, unsigned *, struct iov *, unsigned *) = packed ? pdev_pop : dev_pop;
    int (*should_notify)(void) = packed ? pdev_should_notify : dev_should_notify;
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
                    for (unsigned b = 0; b < fill; b++) add(addrs, lens, k, 1, tok++);
                    double t1 = now();
                    while (n < fill) {
                        unsigned m = fill - n < batch ? fill - n : batch;
                        for (unsigned b = 0; b < m; b++) {
                            int h = pop(rd, &n_rd, wr, &n_wr);
                            if (h < 0) { fprintf(stderr, "pop failed\n"); return 1; }
                            heads[b] = (unsigned)h;
                            sink += n_rd + n_wr + (uintptr_t)rd[0].base;
                        }
                        if (packed) pdev_flush(heads, m);
                        else for (unsigned b = 0; b < m; b++) dev_push(heads[b], 0);
                        n += m;
                    }
                    elapsed += now() - t1;
                    uint64_t t; uint32_t l;
                    while (get_buf(&t, &l) == 1) sink += t;
                    descs += (uint64_t)fill * k;
                } else {
                    for (unsigned b = 0; b < batch; b++) add(addrs, lens, k, 1, tok++);
                    sink += kick_prepare();
                    for (unsigned b = 0; b < batch; b++) {
                        int h = pop(rd, &n_rd, wr, &n_wr);
                        if (h < 0) { fprintf(stderr, "pop failed\n"); return 1; }
                        heads[b] = (unsigned)h;
                        sink += n_rd + n_wr + (uintptr_t)rd[0].base;
                    }
                    if (packed) pdev_flush(heads, batch);
                    else for (unsigned b = 0; b < batch; b++) dev_push(heads[b], 0);
                    sink += should_notify();
                    uint64_t t; uint32_t l;
                    for (unsigned b = 0; b < batch; b++) {
                        if (get_buf(&t, &l) != 1) { fprintf(stderr, "get failed\n"); return 1; }
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

/* The compiled replay core: simulate-mode replay of the built-in demand caches (lru, lfu, belady), compiled on
 * first use by tieremu/native/build.py and driven by tieremu/workloads/replay_core.py.
 *
 * It is tieremu/workloads/simulate.py's Python path, decision for decision: the same reference order, the same
 * pinning, the same victims (the lowest (score, stamp) of a tier's unpinned blocks, or the highest for belady,
 * with stamps counted at the same calls as policy/base.py's RankedBlocks), the same migration channel, epochs and
 * residency samples, the same floating-point operations in the same order. Change one, change both; the test
 * tests/test_replay_core.py replays the shared trace through both and compares every figure.
 *
 * Blocks are dense ids 0..n_blocks-1 (the driver maps hash ids). belady's ranking of a tier is a 4-ary heap with lazy
 * deletion: an entry is live while its stamp is the block's stamp and the block is filed under that tier. lru's and
 * lfu's are ordered lists (lfu's indexed by count: the last block of each count and a bitmap of the counts present). */
/* Python rounds every multiply and add on its own: no fused multiply-add here, or sums differ in the last bit. */
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LRU = 0, LFU = 1, BELADY = 2 };
#define NEVER INT64_MAX
#define MAX_TIERS 16

typedef struct { int64_t k1, k2; int32_t block; } entry;
typedef struct { entry *e; int64_t n, cap; } heap;

typedef struct {
    int64_t score, stamp;  /* its ranking: filed under `filed` with this score, set at this stamp */
    int64_t lm_epoch;      /* its last move: epoch (-1: none), from lm_src to lm_dst */
    double lands;          /* when its latest move lands (-inf: none) */
    int32_t prev, next_in; /* lru, lfu: neighbours in its tier's list */
    int8_t where;          /* tier, -1: none (MAX_TIERS fits a byte: 48 bytes a block, not 56, at 10x the blocks
                            * the records outgrow the caches) */
    int8_t filed;          /* tier the ranking files it under, -1: not ranked */
    uint8_t pinned;        /* 1: pinned for the request, 2: while its own victim is chosen */
    uint8_t set_aside;     /* out of its list until the request ends (or, lru and lfu, until its observe) */
    int8_t lm_src, lm_dst;
} block_state;
_Static_assert(sizeof(block_state) == 48, "one record a block, 48 bytes");

typedef struct {
    /* settings */
    int kind, n_tiers, pin;
    int64_t cap[MAX_TIERS]; /* -1: unlimited */
    const double *read_s, *move_s;
    double prefill, epoch_s;
    int64_t ping_pong_epochs;
    /* block state, one record a block: a reference touches one cache line, not one per field */
    block_state *bk;
    /* tiers */
    int64_t used[MAX_TIERS], pinned_in[MAX_TIERS];
    heap h[MAX_TIERS];
    /* clocks */
    int64_t stamp_clock, lru_clock, epoch;
    double now, channel_free;
    const int64_t *next; /* belady: position of each reference's next use, NEVER if none */
    int64_t position;
    /* counts */
    int64_t *hits, misses, evictions, uncached, promotions, demotions, ping_pongs, waited, samples;
    int64_t *pair_moves; /* moves from tier i to tier j at [i * n_tiers + j]: their bytes differ by pair */
    double strr_sum, *residency;
    entry *passed; int64_t passed_cap; /* rank_first's scratch: entries passed over, put back after */
    /* Entries of blocks pinned for the request, set aside until it ends (they cannot be victims before): a search
     * passes over each once per request, not once per search. */
    heap parked[MAX_TIERS];
    /* lru and lfu rank with ordered lists instead (no stale entries): each limited tier's blocks in (score, stamp)
     * order, head first; lfu keeps the last block of each count and a bitmap of the counts present. */
    int32_t head[MAX_TIERS], tail[MAX_TIERS];
    int32_t *last_of[MAX_TIERS]; uint64_t *counts_present[MAX_TIERS]; int64_t max_count;
    /* Blocks pinned for the request that a search walked past are taken out of their list until it ends. */
    int32_t *aside; int64_t n_aside, aside_cap;
    int failed; /* out of memory */
} state;

/* ---- the heap ---------------------------------------------------------------------------------------------- */

static inline int less(const entry *a, const entry *b) {
    return a->k1 < b->k1 || (a->k1 == b->k1 && a->k2 < b->k2);
}

/* A 4-ary heap: half a binary heap's levels, and a node's children share cache lines; at 10x the blocks the heap
 * outgrows the L2 cache, where each level is a miss. Which entry is on top depends on the keys alone (a live
 * block's (score, stamp) is unique), so the shape changes no decision. */
#define ARITY 4

static inline void sift_up(entry *e, int64_t i, entry x) {
    while (i > 0) {
        int64_t p = (i - 1) / ARITY;
        if (!less(&x, &e[p])) break;
        e[i] = e[p];
        i = p;
    }
    e[i] = x;
}

static void heap_push(state *s, heap *h, entry x) {
    if (h->n == h->cap) {
        int64_t cap = h->cap ? 2 * h->cap : 1024;
        entry *e = realloc(h->e, (size_t)cap * sizeof(entry));
        if (!e) { s->failed = 1; return; }
        h->e = e; h->cap = cap;
    }
    sift_up(h->e, h->n++, x);
}

static void heap_append(state *s, heap *h, entry x) {
    if (h->n == h->cap) {
        int64_t cap = h->cap ? 2 * h->cap : 256;
        entry *e = realloc(h->e, (size_t)cap * sizeof(entry));
        if (!e) { s->failed = 1; return; }
        h->e = e; h->cap = cap;
    }
    h->e[h->n++] = x;
}

static entry heap_pop(heap *h) {
    entry top = h->e[0], x = h->e[--h->n];
    int64_t i = 0, n = h->n;
    for (;;) {
        int64_t c = ARITY * i + 1, last = c + ARITY < n ? c + ARITY : n;
        if (c >= n) break;
        int64_t m = c;
        for (int64_t j = c + 1; j < last; j++) if (less(&h->e[j], &h->e[m])) m = j;
        if (!less(&h->e[m], &x)) break;
        h->e[i] = h->e[m];
        i = m;
    }
    if (n) h->e[i] = x;
    return top;
}

static inline entry key_of(const state *s, int32_t b) {
    entry x;
    if (s->kind == BELADY) { x.k1 = -s->bk[b].score; x.k2 = -s->bk[b].stamp; }  /* the highest first */
    else { x.k1 = s->bk[b].score; x.k2 = s->bk[b].stamp; }                      /* the lowest first */
    x.block = b;
    return x;
}

static inline int live(const state *s, const entry *x, int tier) {
    int32_t b = x->block;
    return s->bk[b].filed == tier && s->bk[b].stamp == (s->kind == BELADY ? -x->k2 : x->k2);
}

/* Drop stale entries once they dominate: the order of live entries is their keys', so nothing changes. */
static void heap_compact(state *s, int tier) {
    heap *h = &s->h[tier];
    int64_t n = 0;
    for (int64_t i = 0; i < h->n; i++)
        if (live(s, &h->e[i], tier)) h->e[n++] = h->e[i];
    h->n = 0;
    entry *e = h->e;
    int64_t count = n;
    /* re-heapify in place: push each back (entries are already in e[0..count)) */
    for (int64_t i = 0; i < count; i++) sift_up(e, h->n++, e[i]);
}

/* ---- RankedBlocks ------------------------------------------------------------------------------------------ */

static inline int key_after(const state *s, int32_t a, int32_t b) {  /* (score, stamp) of a > that of b */
    return s->bk[a].score > s->bk[b].score || (s->bk[a].score == s->bk[b].score && s->bk[a].stamp > s->bk[b].stamp);
}

static void list_unlink(state *s, int t, int32_t b) {
    int32_t p = s->bk[b].prev, n = s->bk[b].next_in;
    if (s->kind == LFU) {
        int64_t c = s->bk[b].score;
        if (s->last_of[t][c] == b) {
            if (p >= 0 && s->bk[p].score == c) s->last_of[t][c] = p;
            else { s->last_of[t][c] = -1; s->counts_present[t][c >> 6] &= ~(1ull << (c & 63)); }
        }
    }
    if (p >= 0) s->bk[p].next_in = n; else s->head[t] = n;
    if (n >= 0) s->bk[n].prev = p; else s->tail[t] = p;
}

/* The block after which b goes in tier t's list (-1: at the head). */
static int32_t list_place(state *s, int t, int32_t b) {
    if (s->kind == LRU) {  /* a touched block has the newest clock: the walk from the tail stops at once */
        int32_t p = s->tail[t];
        while (p >= 0 && key_after(s, p, b)) p = s->bk[p].prev;
        return p;
    }
    /* lfu: after the last block of its count, else of the highest count below it; then back past any of its count
     * with a later stamp (a block put back after its request, see restore_aside) */
    int64_t c = s->bk[b].score;
    int32_t p = s->last_of[t][c];
    if (p < 0) {
        const uint64_t *bits = s->counts_present[t];
        for (int64_t w = (c - 1) >> 6; c > 0 && w >= 0; w--) {
            uint64_t word = bits[w];
            if (w == (c - 1) >> 6) word &= (c & 63) ? ((1ull << (c & 63)) - 1) : ~0ull;
            if (word) { p = s->last_of[t][(w << 6) + 63 - __builtin_clzll(word)]; break; }
        }
    }
    while (p >= 0 && key_after(s, p, b)) p = s->bk[p].prev;
    return p;
}

static void list_insert(state *s, int t, int32_t b) {
    int32_t p = list_place(s, t, b), n = p >= 0 ? s->bk[p].next_in : s->head[t];
    s->bk[b].prev = p; s->bk[b].next_in = n;
    if (p >= 0) s->bk[p].next_in = b; else s->head[t] = b;
    if (n >= 0) s->bk[n].prev = b; else s->tail[t] = b;
    if (s->kind == LFU) {
        int64_t c = s->bk[b].score;
        if (n < 0 || s->bk[n].score != c) s->last_of[t][c] = b;
        s->counts_present[t][c >> 6] |= 1ull << (c & 63);
    }
}

static inline int listed(const state *s, int32_t b) {
    return s->kind != BELADY && s->bk[b].filed >= 0 && s->cap[s->bk[b].filed] >= 0 && !s->bk[b].set_aside;
}

/* File block b under `tier` with `score` and a new stamp. `push` = 0 defers its heap entry to the next rank_set of
 * the block: only for a block about to be observed, which is pinned (or guarded) until then, so no search can want
 * it meanwhile, and whose stamp order against other blocks is the same at either set. */
static void rank_set_(state *s, int32_t b, int tier, int64_t score, int push) {
    if (listed(s, b)) list_unlink(s, s->bk[b].filed, b);
    s->bk[b].set_aside = 0;
    s->bk[b].score = score;
    s->bk[b].filed = (int8_t)tier;
    s->bk[b].stamp = ++s->stamp_clock;
    if (s->kind != BELADY) {
        /* push = 0: out of the list (set aside, not in `aside`) until the observe re-files it, so a miss or a
         * promotion costs one insertion, not two; the list stays ordered by (score, stamp), so where the block goes
         * at the observe is where it would be had it been inserted here and moved then. */
        if (s->cap[tier] >= 0) {
            if (push) list_insert(s, tier, b);
            else s->bk[b].set_aside = 1;
        }
        return;
    }
    if (!push || s->cap[tier] < 0) return; /* an unlimited tier is never asked for a victim: no heap */
    heap *h = &s->h[tier];
    heap_push(s, h, key_of(s, b));
    if (h->n > 2 * s->used[tier] + 1024) heap_compact(s, tier);
}

static inline void rank_set(state *s, int32_t b, int tier, int64_t score) { rank_set_(s, b, tier, score, 1); }

static void rank_forget(state *s, int32_t b) {
    if (listed(s, b)) list_unlink(s, s->bk[b].filed, b);
    s->bk[b].set_aside = 0;
    s->bk[b].filed = -1;
}

/* The request ended: blocks set aside go back into their lists, in key order wherever they are put back. */
static void restore_aside(state *s) {
    for (int64_t i = 0; i < s->n_aside; i++) {
        int32_t b = s->aside[i];
        if (!s->bk[b].set_aside) continue;  /* re-filed (or forgotten) since */
        s->bk[b].set_aside = 0;
        list_insert(s, s->bk[b].filed, b);
    }
    s->n_aside = 0;
}

static void rank_follow(state *s, int32_t b, int target) {
    if (target < 0) rank_forget(s, b);
    else if (s->bk[b].filed >= 0 && s->bk[b].filed != target) rank_set(s, b, target, s->bk[b].score);
}

/* The lowest-keyed unpinned block really in `tier`, or -1. The block found stays on top of its heap (Python pops
 * and pushes it back: the same heap order); stale entries are dropped, pinned ones parked or put back. */
static int32_t rank_first(state *s, int tier) {
    if (s->kind != BELADY) {
        for (int32_t b = s->head[tier], n; b >= 0; b = n) {
            n = s->bk[b].next_in;
            int actual = s->bk[b].where;
            if (actual != tier) {
                if (actual < 0) rank_forget(s, b);
                else rank_set(s, b, actual, s->bk[b].score);
                continue;
            }
            if (!s->bk[b].pinned) return b;
            if (s->bk[b].pinned == 1) {  /* pinned until the request ends: out of the way until then */
                if (s->n_aside == s->aside_cap) {
                    int64_t cap = s->aside_cap ? 2 * s->aside_cap : 256;
                    int32_t *a = realloc(s->aside, (size_t)cap * sizeof(int32_t));
                    if (!a) { s->failed = 1; return -1; }
                    s->aside = a; s->aside_cap = cap;
                }
                list_unlink(s, tier, b);
                s->bk[b].set_aside = 1;
                s->aside[s->n_aside++] = b;
            }
        }
        return -1;
    }
    heap *h = &s->h[tier];
    int64_t passed_n = 0;
    int32_t found = -1;
    while (h->n) {
        entry x = h->e[0];
        int32_t b = x.block;
        if (!live(s, &x, tier)) { heap_pop(h); continue; }
        int actual = s->bk[b].where;
        if (actual != tier) {
            heap_pop(h);
            if (actual < 0) rank_forget(s, b);
            else rank_set(s, b, actual, s->bk[b].score);
            continue;
        }
        if (!s->bk[b].pinned) { found = b; break; }
        heap_pop(h);
        if (s->bk[b].pinned == 1) { heap_append(s, &s->parked[tier], x); continue; }
        if (passed_n == s->passed_cap) {
            int64_t cap = s->passed_cap ? 2 * s->passed_cap : 64;
            entry *p = realloc(s->passed, (size_t)cap * sizeof(entry));
            if (!p) { s->failed = 1; break; }
            s->passed = p; s->passed_cap = cap;
        }
        s->passed[passed_n++] = x;
    }
    for (int64_t i = 0; i < passed_n; i++) heap_push(s, h, s->passed[i]);
    return found;
}

/* ---- the policies ------------------------------------------------------------------------------------------ */

static int64_t admitted_score(state *s, int32_t b) {
    if (s->kind == LRU) return ++s->lru_clock;
    return s->bk[b].filed >= 0 ? s->bk[b].score : 0; /* LFU: the count it has (Python: score or 0.0) */
}

static int64_t touched_score(state *s, int32_t b) {
    if (s->kind == LRU) return ++s->lru_clock;
    return (s->bk[b].filed >= 0 ? s->bk[b].score : 0) + 1;
}

static int policy_admit(state *s, int32_t b) {
    if (s->kind != BELADY) {
        rank_set_(s, b, 0, admitted_score(s, b), 0);
        return 0;
    }
    int64_t use = s->next[s->position];
    int current = s->bk[b].where;
    int chosen = current >= 0 ? current : s->n_tiers - 1;
    for (int t = 0; t < s->n_tiers; t++) {
        if (t == current) break;
        if (s->cap[t] < 0 || s->used[t] < s->cap[t]) { chosen = t; break; }
        int32_t far = rank_first(s, t);
        if (far >= 0 && use < s->bk[far].score) { chosen = t; break; }
    }
    rank_set_(s, b, chosen, use, 0);
    return chosen;
}

static void policy_observe(state *s, int32_t b, int served) {
    int tier = s->bk[b].filed >= 0 ? s->bk[b].filed : served;
    if (tier >= 0) {
        int64_t score = s->kind == BELADY ? s->next[s->position] : touched_score(s, b);
        rank_set(s, b, tier, score);
    }
    s->position++;
}

static int32_t policy_victim(state *s, int tier) {
    int32_t v = rank_first(s, tier);
    if (v < 0) return -1;
    if (tier + 1 < s->n_tiers) rank_follow(s, v, tier + 1); /* pushed_down: filed one tier down */
    else rank_forget(s, v);
    return v;
}

/* ---- the driver (simulate.py's _Replay) -------------------------------------------------------------------- */

static void place(state *s, int32_t b, int t) {
    s->bk[b].where = (int8_t)t;
    s->used[t]++;
    if (s->bk[b].pinned) s->pinned_in[t]++;
}

static void remove_block(state *s, int32_t b) {
    int t = s->bk[b].where;
    s->bk[b].where = -1;
    s->used[t]--;
    if (s->bk[b].pinned) s->pinned_in[t]--;
}

static void record_move(state *s, int32_t b, int source, int target, int promote) {
    if (promote) s->promotions++; else s->demotions++;
    s->pair_moves[source * s->n_tiers + target]++;
    if (s->bk[b].lm_epoch >= 0 && s->bk[b].lm_src == target && s->bk[b].lm_dst == source &&
        s->epoch - s->bk[b].lm_epoch <= s->ping_pong_epochs)
        s->ping_pongs++;
    s->bk[b].lm_epoch = s->epoch; s->bk[b].lm_src = (int8_t)source; s->bk[b].lm_dst = (int8_t)target;
    double start = s->now >= s->channel_free ? s->now : s->channel_free;
    s->channel_free = start + s->move_s[source * s->n_tiers + target];
    s->bk[b].lands = s->channel_free;
    rank_follow(s, b, target);
}

static int fit(state *s, int32_t b, int i) {
    int64_t cap = s->cap[i];
    if (cap >= 0 && s->used[i] >= cap && s->used[i] <= s->pinned_in[i]) return 0;
    place(s, b, i);
    if (cap < 0 || s->used[i] <= cap) return 1;
    int guard = !s->bk[b].pinned;
    if (guard) { s->bk[b].pinned = 2; s->pinned_in[i]++; }  /* 2: pinned only while its victim is chosen */
    int32_t v = policy_victim(s, i);
    if (guard) { s->bk[b].pinned = 0; s->pinned_in[i]--; }
    if (v < 0) { s->failed = 2; return 1; } /* a ranking lost a block: cannot happen (Python raises) */
    remove_block(s, v);
    if (i + 1 < s->n_tiers && fit(s, v, i + 1)) {
        record_move(s, v, i, i + 1, 0);
    } else {
        s->evictions++;
        s->bk[v].lands = -INFINITY;
        rank_forget(s, v);
    }
    return 1;
}

static void admit(state *s, int32_t b) {
    int admitted = policy_admit(s, b);
    for (int i = admitted; i < s->n_tiers; i++) {
        if (fit(s, b, i)) {
            if (i != admitted) rank_follow(s, b, i);
            return;
        }
    }
    s->uncached++;
    rank_forget(s, b);
}

static void promote_on_access(state *s, int32_t b, int i) {
    int target = policy_admit(s, b);
    if (target >= i) return;
    remove_block(s, b);
    if (fit(s, b, target)) {
        record_move(s, b, i, target, 1);
    } else {
        place(s, b, i);
        rank_follow(s, b, i);
    }
}

static void sample(state *s, int64_t count) {
    int64_t total = 0;
    for (int t = 0; t < s->n_tiers; t++) total += s->used[t];
    if (!total) return;
    s->samples += count;
    s->strr_sum += (double)count * ((double)(total - s->used[0]) / (double)total);
    for (int t = 0; t < s->n_tiers; t++) s->residency[t] += (double)count * ((double)s->used[t] / (double)total);
}

static int64_t epochs_due(double start, double epoch_s, double now) {
    double q = (now - start) / epoch_s;
    int64_t k = q > 0 ? (int64_t)q : 0;
    while (start + (double)(k + 1) * epoch_s <= now) k++;
    while (k > 0 && start + (double)k * epoch_s > now) k--;
    return k;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Replay. Returns 0, or 1 out of memory, 2 a lost block, 3 too many tiers. counts_out: misses, evictions,
 * uncached, promotions, demotions, ping_pongs, waited, samples, epochs; doubles_out: strr_sum, channel_free;
 * ttft_ms_out per request, ttft_sorted_out the same sorted; pair_moves_out (n_tiers x n_tiers, zeroed by the
 * caller) the moves from tier i to tier j. */
int replay_demand(int kind, int64_t n_refs, const int32_t *blocks, int64_t n_blocks, int64_t n_requests,
                  const int64_t *request_start, const int64_t *input_length, const double *arrival,
                  int n_tiers, const int64_t *capacity, const double *read_s, const double *move_s,
                  double prefill, int64_t block_tokens, double epoch_s, int64_t ping_pong_epochs, int pin,
                  int64_t *hits_out, double *residency_out, int64_t *resident_out, int64_t *counts_out,
                  double *doubles_out, double *ttft_ms_out, double *ttft_sorted_out, int64_t *pair_moves_out) {
    if (n_tiers < 1 || n_tiers > MAX_TIERS) return 3;
    state s;
    memset(&s, 0, sizeof s);
    s.kind = kind; s.n_tiers = n_tiers; s.pin = pin;
    for (int t = 0; t < n_tiers; t++) s.cap[t] = capacity[t];
    s.read_s = read_s; s.move_s = move_s; s.prefill = prefill; s.epoch_s = epoch_s;
    s.ping_pong_epochs = ping_pong_epochs;
    s.pair_moves = pair_moves_out;
    size_t nb = (size_t)(n_blocks ? n_blocks : 1);
    s.bk = calloc(nb, sizeof(block_state));
    int64_t *next = kind == BELADY ? malloc((size_t)(n_refs ? n_refs : 1) * sizeof(int64_t)) : NULL;
    int64_t *last = kind == BELADY ? malloc(nb * sizeof(int64_t)) : NULL;
    s.hits = hits_out; s.residency = residency_out;
    int rc = 0;
    if (!s.bk || (kind == BELADY && (!next || !last))) { rc = 1; goto out; }
    for (int t = 0; t < MAX_TIERS; t++) s.head[t] = s.tail[t] = -1;
    if (kind == LFU) {  /* a count never exceeds the block's references: size the per-count arrays by that */
        int64_t *refs = calloc(nb, sizeof(int64_t));
        if (!refs) { rc = 1; goto out; }
        for (int64_t k = 0; k < n_refs; k++) if (++refs[blocks[k]] > s.max_count) s.max_count = refs[blocks[k]];
        free(refs);
        for (int t = 0; t < n_tiers; t++) {
            if (capacity[t] < 0) continue;
            s.last_of[t] = malloc((size_t)(s.max_count + 2) * sizeof(int32_t));
            s.counts_present[t] = calloc((size_t)((s.max_count + 2) / 64 + 1), sizeof(uint64_t));
            if (!s.last_of[t] || !s.counts_present[t]) { rc = 1; goto out; }
            for (int64_t c = 0; c < s.max_count + 2; c++) s.last_of[t][c] = -1;
        }
    }
    for (size_t b = 0; b < nb; b++) {
        s.bk[b].where = -1; s.bk[b].filed = -1; s.bk[b].lands = -INFINITY; s.bk[b].lm_epoch = -1;
    }
    if (kind == BELADY) {
        for (size_t b = 0; b < nb; b++) last[b] = NEVER;
        for (int64_t k = n_refs - 1; k >= 0; k--) { next[k] = last[blocks[k]]; last[blocks[k]] = k; }
        s.next = next;
    }
    for (int t = 0; t < n_tiers; t++) { hits_out[t] = 0; residency_out[t] = 0.0; }
    double start = n_requests ? arrival[0] : 0.0;
    s.channel_free = start;
    for (int64_t r = 0; r < n_requests && !s.failed; r++) {
        int64_t due = epochs_due(start, epoch_s, arrival[r]);
        if (s.epoch < due) { sample(&s, due - s.epoch); s.epoch = due; }
        s.now = arrival[r];
        s.position = request_start[r];
        int64_t first = request_start[r], end = request_start[r + 1], n = end - first;
        int64_t last_tokens = input_length[r] - (n - 1) * block_tokens;
        if (!(0 < last_tokens && last_tokens <= block_tokens)) last_tokens = block_tokens;
        int64_t missed = 0;
        double read = 0.0, wait = 0.0;
        for (int64_t k = first; k < end; k++) {
            int32_t b = blocks[k];
            int i = s.bk[b].where;
            if (i < 0) {
                s.misses++;
                missed += k + 1 == end ? last_tokens : block_tokens;
                admit(&s, b);
            } else {
                hits_out[i]++;
                read += read_s[i];
                double landing = s.bk[b].lands;
                if (landing > s.now && landing - s.now > wait) wait = landing - s.now;
                if (i) promote_on_access(&s, b, i);
            }
            if (pin && !s.bk[b].pinned) {
                s.bk[b].pinned = 1;
                if (s.bk[b].where >= 0) s.pinned_in[s.bk[b].where]++;
            }
            policy_observe(&s, b, i);
        }
        for (int64_t k = first; k < end; k++) s.bk[blocks[k]].pinned = 0;
        restore_aside(&s);
        for (int t = 0; t < n_tiers; t++) {
            s.pinned_in[t] = 0;
            heap *parked = &s.parked[t];
            for (int64_t j = 0; j < parked->n; j++)
                if (live(&s, &parked->e[j], t)) heap_push(&s, &s.h[t], parked->e[j]);
            parked->n = 0;
        }
        if (wait > 0) s.waited++;
        double ttft = (double)missed / prefill;
        ttft = ttft + read;
        ttft = ttft + wait;
        ttft_ms_out[r] = ttft * 1e3;
    }
    if (s.samples == 0) sample(&s, 1);
    /* sorted for the tails: the driver's sort of sorted values is linear, of these n log n in Python */
    memcpy(ttft_sorted_out, ttft_ms_out, (size_t)n_requests * sizeof(double));
    qsort(ttft_sorted_out, (size_t)n_requests, sizeof(double), by_value);
    for (int t = 0; t < n_tiers; t++) resident_out[t] = s.used[t];
    counts_out[0] = s.misses; counts_out[1] = s.evictions; counts_out[2] = s.uncached;
    counts_out[3] = s.promotions; counts_out[4] = s.demotions; counts_out[5] = s.ping_pongs;
    counts_out[6] = s.waited; counts_out[7] = s.samples; counts_out[8] = s.epoch;
    doubles_out[0] = s.strr_sum; doubles_out[1] = s.channel_free;
    rc = s.failed;
out:
    for (int t = 0; t < MAX_TIERS; t++) {
        free(s.h[t].e); free(s.parked[t].e); free(s.last_of[t]); free(s.counts_present[t]);
    }
    free(s.aside); free(s.passed); free(s.bk); free(next); free(last);
    return rc;
}

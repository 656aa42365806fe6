// ice_internal.h - helpers shared by the native sources (not installed).
//
// fp16 conversion, strided view access, SIMD kernels chosen at run time,
// the key store shared by both index kinds, the DCI core and the small top-k heap.

#ifndef ICE_INTERNAL_H
#define ICE_INTERNAL_H

#include "iceformer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------
// fp16 (IEEE half) -> f32, exact. Portable bit manipulation.
// ---------------------------------------------------------------------------

static inline float ice_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp  = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {                 // inf / nan
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {             // normal
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {            // zero
        bits = sign;
    } else {                           // subnormal: normalise
        exp = 113;
        while ((mant & 0x400u) == 0) { mant <<= 1; exp--; }
        mant &= 0x3ffu;
        bits = sign | (exp << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// f32 -> fp16, round to nearest even.
static inline uint16_t ice_f32_to_f16(float f) {
    uint32_t x; memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          // overflow -> inf
    if (ax < 0x38800000u) {                                           // subnormal or zero
        if (ax < 0x33000000u) return (uint16_t)sign;
        const uint32_t e = ax >> 23;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;                              // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((ax - 0x38000000u) >> 13);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

// The same, saturating: finite values beyond fp16's range become +-65504, not infinities, so a block
// summary of huge (f32-cache) keys still ranks instead of turning its score into inf - inf = NaN.
static inline uint16_t ice_f32_to_f16_sat(float f) {
    const uint16_t h = ice_f32_to_f16(f);
    return (h & 0x7fffu) == 0x7c00u && f == f && f != INFINITY && f != -INFINITY ? (uint16_t)((h & 0x8000u) | 0x7bffu) : h;
}

// ---------------------------------------------------------------------------
// SIMD kernels (simd.c, simd_select.c): the best variant the CPU supports is picked once.
// All variants give the same result on one machine for one input (the choice is
// made per process), so splitting work over threads never changes the output.
// ---------------------------------------------------------------------------

// The variant picked (once per process; ICEFORMER_SIMD=scalar|avx2 caps it, for tests).
enum { ICE_SIMD_UNSET = 0, ICE_SIMD_SCALAR = 1, ICE_SIMD_AVX2 = 2, ICE_SIMD_AVX512 = 3 };
int ice_simd_level(void);
// At ICE_SIMD_AVX512, whether the gathered-row kernels convert and multiply 256 bits at a time (same bits
// as the 512-bit forms; faster on Zen 4). ICEFORMER_SIMD=avx512 / avx512-ymm forces either (tests).
int ice_simd_rows_ymm(void);

float ice_dot(const float * a, const float * b, int64_t n);
// y[i] += a * x[i]
void  ice_axpy(float * y, float a, const float * x, int64_t n);
// the same with b (resp. x) in IEEE half precision, read in place
float ice_dot_f16(const float * a, const uint16_t * b, int64_t n);
void  ice_axpy_f16(float * y, float a, const uint16_t * x, int64_t n);
// Gathered rows of n elements of type t at base + r*stride, r = idx[i] (or i when idx is NULL), i < cnt:
//   ice_dots_rows:  out[i] = a . row(i)            (out: cnt floats)
//   ice_axpys_rows: y += sum_i w[i] * row(i)       (w: cnt floats, in order i = 0..cnt-1)
void  ice_dots_rows(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out);
void  ice_axpys_rows(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n);
// The same rows for na outputs at once, each row read (and converted) once for all:
//   y_j += sum_i w[j*cnt + i] * row(i)    (y: na*n floats, y_j at y + j*n; w: na*cnt floats)
// Output j's result does not depend on na.
void  ice_axpys_rows_multi(float * y, int64_t na, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n);
// Rows stored in tiles of ICE_TILE rows, element-major within a tile: element d of row i at
// tiles[(i / ICE_TILE) * n * ICE_TILE + d * ICE_TILE + i % ICE_TILE] (fp16; the last tile padded to
// ICE_TILE rows). A vector of ICE_TILE rows' elements times one query element needs no horizontal sums.
#define ICE_TILE 16
static inline size_t ice_tile_at(int64_t i, int64_t d, int64_t n) {
    return (size_t)((i / ICE_TILE) * n * ICE_TILE + d * ICE_TILE + i % ICE_TILE);
}
//   out[j*cnt + i] = a_j . row(i), i < cnt, for na queries (a: na*n floats); padding rows are not read
//   into out (their lanes are computed and dropped).
void  ice_dots_tiles(const float * a, int64_t na, const uint16_t * tiles, int64_t cnt, int64_t n, float * out);
//   The same for whole tiles picked from a list: out[j*ostride + pos[k] + r] = a_j . row r of tile tile[k],
//   r < ICE_TILE, k < nt (tile t at tiles + t*n*ICE_TILE). Where ice_tiles_match_rows(n), each result has
//   the bits ice_dots_rows gives for the same row and query (the same sums in the same order).
void  ice_dots_tile_list(const float * a, int64_t na, const uint16_t * tiles, const int32_t * tile, const int32_t * pos,
        int64_t nt, int64_t n, float * out, int64_t ostride);
bool  ice_tiles_match_rows(int64_t n);
// Softmax numerators: x[i] = exp(x[i] - mx) for i < n, returns their sum. The vector variants use a
// polynomial (relative error about 1e-7 against expf); arguments below -87.3 give 0.
float ice_exp_sum(float * x, int64_t n, float mx);
// max of x[0..n), -INFINITY when n == 0 (NaNs are skipped)
float ice_max(const float * x, int64_t n);
// x[i] *= scale for i < n, then ice_max(x, n): the same results, in one pass where the CPU allows
float ice_scale_max(float * x, int64_t n, float scale);
// Appends to out the cells j in [j0, j1) an f16 mask row m shows (m[j] != -inf); returns how many.
// out needs room for j1 - j0 + 16 entries (the vector variant stores sixteen at a time).
int64_t ice_visible_f16(const uint16_t * m, int64_t j0, int64_t j1, int32_t * out);
// dst[i] = f32(src[i]) for n contiguous halves
void  ice_f16_row_to_f32(float * dst, const uint16_t * src, int64_t n);
// Order-preserving map of a float to an unsigned key (larger value, larger key); -inf maps above 0,
// so 0 can stand for "not eligible".
static inline uint32_t ice_score_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The inverse of ice_score_key.
static inline float ice_key_score(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
// Ranking keys of the coarse block search (tail.c), n blocks: for a block the row sees whole
// (vis[b] == count[b] > 0) key[b] = ice_score_key(qk[b] + 2 sqrt(q2var[b])), else 0; a score
// that is -inf or NaN also gives 0. Returns the number of nonzero keys. Every variant computes the
// score with the same correctly rounded operations, so the keys do not depend on the variant.
int64_t ice_block_keys(const float * qk, const float * q2var, const int32_t * count, const int32_t * vis, int64_t n,
        uint32_t * key);
// Number of key[0..n) >= t.
int64_t ice_count_ge_u32(const uint32_t * key, int64_t n, uint32_t t);
// The largest of key[0..n) (0 when n == 0).
uint32_t ice_max_u32(const uint32_t * key, int64_t n);
// For every nonzero hk[b], b < n: key[b] = max(key[b], ice_score_key(ice_key_score(hk[b]) - sub)), the
// same bits in every variant (one IEEE subtraction between exact bit maps). A GQA group's ranking: each
// head's block scores relative to its best, the best of them per block (tail.c).
void ice_keys_max_shifted(uint32_t * key, const uint32_t * hk, int64_t n, float sub);

// ---------------------------------------------------------------------------
// Views.
// ---------------------------------------------------------------------------

static inline size_t ice_type_size(enum ice_type t) { return t == ICE_TYPE_F16 ? 2 : 4; }

static inline const char * ice_view_ptr(const struct ice_view * v, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return (const char *)v->data + i0 * (int64_t)v->nb[0] + i1 * (int64_t)v->nb[1] + i2 * (int64_t)v->nb[2] + i3 * (int64_t)v->nb[3];
}

static inline float ice_load(enum ice_type t, const char * p) {
    if (t == ICE_TYPE_F16) { uint16_t h; memcpy(&h, p, 2); return ice_f16_to_f32(h); }
    float f; memcpy(&f, p, 4); return f;
}

// Loads the ne[0] elements of row (i1, i2, i3) of `v` as f32 into dst.
void ice_view_load_row(const struct ice_view * v, int64_t i1, int64_t i2, int64_t i3, float * dst);

// Mask helpers: a cell is visible iff its mask value is not -INFINITY.
static inline int ice_mask_visible(enum ice_type t, const void * row, int64_t j) {
    if (t == ICE_TYPE_F16) return ((const uint16_t *)row)[j] != 0xfc00u;
    return ((const float *)row)[j] != -INFINITY;
}
static inline float ice_mask_value(enum ice_type t, const void * row, int64_t j) {
    if (t == ICE_TYPE_F16) {
        const uint16_t h = ((const uint16_t *)row)[j];
        return h == 0 ? 0.0f : ice_f16_to_f32(h);   // causal masks are 0 where visible
    }
    return ((const float *)row)[j];
}

// ---------------------------------------------------------------------------
// Grow-only buffers.
// ---------------------------------------------------------------------------

// Ensures *buf holds at least n bytes; 0 on success. keep: 0 = contents may be lost,
// 1 = contents kept, 2 = contents kept and new bytes zeroed.
int ice_reserve(void ** buf, size_t * cap, size_t n, int keep);

#define ICE_RESERVE(pp, capp, count, keep) ice_reserve((void **)(pp), (capp), (size_t)(count) * sizeof(**(pp)), (keep))

// ---------------------------------------------------------------------------
// Top-k min-heap of (score, id): keeps the k largest scores.
// ---------------------------------------------------------------------------

struct ice_topk {
    float   * score;
    int64_t * id;
    int32_t   k, n;
};

static inline void ice_topk_reset(struct ice_topk * h, int32_t k) { h->k = k; h->n = 0; }

// sift helpers
static inline void ice_topk_push(struct ice_topk * h, float s, int64_t id) {
    if (h->k <= 0) return;
    if (h->n < h->k) {
        int32_t i = h->n++;
        while (i > 0) {
            int32_t p = (i - 1) / 2;
            if (h->score[p] <= s) break;
            h->score[i] = h->score[p]; h->id[i] = h->id[p]; i = p;
        }
        h->score[i] = s; h->id[i] = id;
        return;
    }
    if (s <= h->score[0]) return;
    int32_t i = 0;
    for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && h->score[c + 1] < h->score[c]) c++;
        if (h->score[c] >= s) break;
        h->score[i] = h->score[c]; h->id[i] = h->id[c]; i = c;
    }
    h->score[i] = s; h->id[i] = id;
}

static inline float ice_topk_min(const struct ice_topk * h) {
    return h->n < h->k ? -INFINITY : h->score[0];
}

// Sorts the heap contents by decreasing score (ties: increasing id) in place.
void ice_topk_sort(struct ice_topk * h);

// Rows stored by someone else: row i at data + i*stride bytes, of `type` (f16 rows are read in place).
struct ice_rows { const char * data; enum ice_type type; size_t stride; };

static inline float ice_rows_dot(const struct ice_rows * r, const float * q, int64_t i, int64_t dim) {
    const void * p = r->data + (size_t)i * r->stride;
    return r->type == ICE_TYPE_F16 ? ice_dot_f16(q, (const uint16_t *)p, dim) : ice_dot(q, (const float *)p, dim);
}

// ---------------------------------------------------------------------------
// DCI core (index_dci.c): Prioritized DCI over embedded keys. Points are numbered
// 0..n-1; the caller owns the key rows (keys + i*stride) and maps numbers to ids.
// ---------------------------------------------------------------------------

struct ice_dci {
    int32_t dim, L, m;
    uint64_t seed;
    float   * dirs;   size_t dirs_cap;   // L*m*(dim+1) unit vectors
    int64_t   n;                         // points in the sorted arrays
    int64_t   stride;                    // slots per simple index in proj/pidx (>= n)
    float     max_norm;                  // M of the embedding
    float   * mean;   size_t mean_cap;   // dim: keys are centred before embedding (q.k ranking is
                                         // unchanged by a shared shift; it makes the norms smaller)
    float   * proj;   size_t proj_cap;   // L*m*n projections, each simple index sorted ascending
    int32_t * pidx;   size_t pidx_cap;   // L*m*n point numbers in the same order
    float   * tmpf;   size_t tmpf_cap;   // build scratch
    int32_t * tmpi;   size_t tmpi_cap;
};

// Per-search scratch (grow-only; one per thread).
struct ice_dci_scratch {
    uint8_t * cnt;    size_t cnt_cap;    // L*n visit counts
    uint8_t * cand;   size_t cand_cap;   // n: already scored
    int32_t * touched; size_t touched_cap;
    float   * heap_s; size_t heap_s_cap;
    int64_t * heap_i; size_t heap_i_cap;
    float   * qn;     size_t qn_cap;
};

void ice_dci_init(struct ice_dci * d, int32_t dim, int32_t L, int32_t m, uint64_t seed);
void ice_dci_free(struct ice_dci * d);
size_t ice_dci_memory(const struct ice_dci * d);
// (Re)builds over n points: key i at keys + i*stride (dim floats). 0 on success.
// The centring mean and M come from the points with stat[i] != 0 (stat NULL: all), and M is
// multiplied by headroom (>= 1) so that later keys up to that norm can be upserted. Keys with a larger norm
// embed with a clamped extra coordinate. The attention passes the points every row sees,
// so that keys hidden from a row (future tokens) cannot change the walk order of its
// visible keys: invisible keys are skipped without using budget, hence causality.
int ice_dci_build(struct ice_dci * d, const float * keys, int64_t stride, int64_t n, const uint8_t * stat, float headroom);
// Sets the key of point pt (pt < n: replaces it; pt == n: appends it), keeping every simple
// index sorted (O(n) per simple index). Returns 0, -1 when out of memory, or 1 when the key's
// centred norm exceeds M (it cannot be embedded: the caller rebuilds with a new M).
int ice_dci_upsert(struct ice_dci * d, const float * key, int32_t pt);
// Removes point number `victim` and renames point `last` to `victim` (swap-with-last).
void ice_dci_remove_swap(struct ice_dci * d, int32_t victim, int32_t last);
void ice_dci_scratch_free(struct ice_dci_scratch * s);

// visible(ctx, point) -> nonzero when the point may be returned.
typedef int (*ice_visible_fn)(const void * ctx, int64_t point);

// Search: fills `out` (a heap with k set, storage provided) with point numbers.
// visit_budget: pops per composite index (>0); retrieve_budget: candidates scored (>0).
int ice_dci_search(const struct ice_dci * d, const struct ice_rows * keys,
        const float * query, int32_t visit_budget, int32_t retrieve_budget,
        ice_visible_fn visible, const void * vctx,
        struct ice_dci_scratch * s, struct ice_topk * out);

// Automatic budgets for a given k (used when a budget parameter is 0).
int32_t ice_dci_auto_visit(int32_t k, int32_t m, int64_t n);
int32_t ice_dci_auto_retrieve(int32_t k, int64_t n);

#endif // ICE_INTERNAL_H

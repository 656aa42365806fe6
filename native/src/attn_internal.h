// attn_internal.h - attention state shared by attn.c, attn_dense.c and tail.c (not installed).

#ifndef ICE_ATTN_INTERNAL_H
#define ICE_ATTN_INTERNAL_H

#include "ice_internal.h"

#define ICE_MAX_THREADS 1024   // largest nth accepted by prepare/forward
#define ICE_MAX_HEADS   8192   // largest n_stream * n_head_kv

// K and V rows of one (stream, KV head), read in place from the cache views (no copies: the
// persistent state must stay small next to the KV cache it indexes).
struct ice_kv {
    const char * k; size_t k_nb1; enum ice_type kt;          // key of cell j: d_k contiguous elements at k + j*k_nb1
    const char * v; size_t v_nb0, v_nb1; enum ice_type vt;   // value of cell j, element d: v + d*v_nb0 + j*v_nb1
    int64_t d_k, d_v;
};

// Per (global stream, KV head): written by one thread in prepare, read by all in forward.
// Block b covers cells [b*B, min((b+1)*B, n_kv)) whatever they hold (empty and other-sequence cells
// included): a row uses a block's sums only when it sees every cell of the block; blocks the mask cuts
// are read cell by cell. So the sums depend on the cache's contents alone, never on the rows, and are
// kept across evaluations: prepare recomputes only the blocks whose cells were written (or all of them
// when the cache version says something else changed).
struct ice_head {
    // what it was prepared for (checked by forward)
    const char * kbase; const char * vbase; const void * mdata;
    int64_t n_kv, d_k, d_v;
    enum ice_status status;
    uint64_t  epoch;                         // cache version the summaries and index reflect; 0 = none
    bool      indexed;                       // summaries (and the DCI index, for k-NN search) are built
    bool      dci_built;                     // dci holds cells 0..dci.n-1
    struct ice_dci dci;                      // DCI over cells (point number = cell)
    int64_t   B;                             // block size the summaries were built with
    int64_t   n_blocks;
    int32_t * bcount;   size_t bcount_cap;   // n_blocks: cells per block (B, or fewer for the last)
    // ranking rows in fp16: the block search reads them for every row, and at decode that read is
    // bound by memory traffic more than arithmetic (half the bytes of f32; 3-4% faster decoding at 8k)
    // (tiled, ice_tile_at: ICE_TILE blocks' element d side by side, so one vector holds 16 blocks' terms)
    uint16_t * rmean;   size_t rmean_cap;    // n_blocks (rounded up to ICE_TILE) * d_k: mean key (fp16)
    uint16_t * rvar;    size_t rvar_cap;     // the same: per-dimension variance of the block's keys (fp16)
    // exact sums for the tail estimate, kept only while it is on (it subtracts union keys from them)
    float   * bk;       size_t bk_cap;       // n_blocks*d_k: sum of keys
    float   * bv;       size_t bv_cap;       // n_blocks*d_v: sum of values
    bool      has_sums;                      // bk and bv are up to date
    // this call's keys in tiles (prepare's tile_keys; NULL: none), held by thread kt_th's ktiles and valid
    // while its ktiles_gen is kt_gen: its next prepare, for any layer sharing the scratch, reuses them
    const uint16_t * kt;
    const struct ice_thread * kt_th;
    uint64_t  kt_gen;
};

// One half of the softmax of the rows of a GQA group (a row's attended cells are split in two at n/2,
// see attn.c), per head j < na: the half's largest score m[j], its sum of exp(score - m) s[j] and its
// unnormalised output o + j*d_v.
struct ice_half {
    enum ice_status status;                  // not OK: the half failed (the rows' outputs are zeroed)
    int64_t na;
    float * m, * s, * o;                     // views into buf
    float * buf;        size_t buf_cap;      // na*(d_v + 2) floats
};

// Per thread ith: grow-only scratch.
struct ice_thread {
    struct ice_dci_scratch dci;
    // visible cells of row (s, t), cached across heads
    const void * vis_mask; int64_t vis_s, vis_t, vis_nkv, vis_B; int vis_blocks;
    int32_t * vis;      size_t vis_cap;      // visible cells, ascending
    int64_t   n_vis;
    int32_t * vis_bcnt; size_t vis_bcnt_cap; // visible cells per block for this row
    int32_t * partial;  size_t partial_cap;  // blocks the mask cuts for this row (0 < visible < all)
    int64_t   n_partial;
    const void * vis_mrow;                   // the mask row the visibility was computed from
    bool      vis_flat;                      // that row holds only 0 and -inf: scores take no mask term
    enum ice_type vis_mtype;
    float   * q;        size_t q_cap;
    float   * sc;       size_t sc_cap;       // scores
    float   * qk;       size_t qk_cap;       // q.k of the union's points (reused by the tail)
    int32_t * bcov;     size_t bcov_cap;     // coarse search: union cells per block (zero between rows)
    uint32_t * bkey;    size_t bkey_cap;     // coarse search: per-block scores as ordered keys, then scratch
    float    * bmass;   size_t bmass_cap;    // top-p budget: estimated mass per head and block, then needs
    struct ice_attn_counts * cnt;            // the counts of the state this forward call runs (set per call)
    // block scores of a run of query heads of one GQA group (ice_block_scores), for rows (run_s, run_t)
    // and heads run_h0..run_h1 of KV head run_hk, valid while run_gen == fwd_gen
    float   * gq;       size_t gq_cap;       // the run's query rows
    float   * bqk;      size_t bqk_cap;      // q . mean key per block and head of the run
    float   * q2;       size_t q2_cap;       // the run's query rows squared elementwise (spread term)
    float   * bsp;      size_t bsp_cap;      // q2 . (key variance) per block and head of the run
    uint64_t  fwd_gen, run_gen;              // forward calls on this thread; the call the run was scored in
    int64_t   run_s, run_t, run_hk, run_h0, run_h1;
    int32_t * uni;      size_t uni_cap;      // union of attended cells
    float   * gqa_q;    size_t gqa_q_cap;    // the query rows of a group answered in one pass
    float   * gsc;      size_t gsc_cap;      // their scores, one half of the cells per head (or every head's cells)
    int32_t * hcells;   size_t hcells_cap;   // a group whose heads attend their own cells: the heads' lists, in turn
    int64_t * hoff;     size_t hoff_cap;     // head j's list at hcells + hoff[j]; then na positions of scratch
    int32_t * tl;       size_t tl_cap;       // whole tiles of a cell list: their numbers, then their positions
    const int32_t * cells; int64_t n_cells;  // the cells the current row attends (vis or uni)
    int64_t   n_sink_cells, n_front_cells;   // uni: its sinks' cells, then up to n_front_cells the window's and top-k's
    uint32_t * stamp;   size_t stamp_cap;    // per cell: == gen when in the union
    uint32_t  gen;
    float   * heap_s;   size_t heap_s_cap;
    int64_t * heap_i;   size_t heap_i_cap;
    float   * w;        size_t w_cap;        // tail: per-block weights
    float   * tmp;      size_t tmp_cap;
    // halves of groups: [0] and [1] are this thread's share of a group split with another thread (read
    // by that thread in join_halves), [2] and [3] the halves of groups computed here whole
    struct ice_half half[4];
    // prepare
    float   * krow;     size_t krow_cap;     // one key and one value as f32
    uint8_t * dirty;    size_t dirty_cap;    // per block: to recompute
    float   * k32;      size_t k32_cap;      // all keys as f32 while a DCI index is built (freed after)
    uint8_t * stat;     size_t stat_cap;     // cells whose keys set the DCI embedding's mean and M
    // Many-row evaluations (prefill): the keys of the KV heads this thread prepares, copied into tiles
    // (ICE_TILE cells, element-major, fp16: ice_tile_at), so forward's dot products over whole chosen
    // blocks need no horizontal sums and one conversion serves every head of a group. One layer's at a
    // time: each prepare call moves ktiles_gen on, which retires the copies of the call before.
    uint16_t * ktiles;  size_t ktiles_cap;
    uint64_t  ktiles_gen;
};

// Working memory of prepare and forward, per thread; nothing in it outlives one call, so the states of
// layers that never run at once (one graph's nodes) can share one and keep one copy instead of one per
// layer: it is sized by the context and the thread count, and per layer it outgrew the summaries.
struct ice_attn_scratch {
    struct ice_thread * threads[ICE_MAX_THREADS];
    // forward: slot j joins the two halves of the group split between thread j (its second half) and the
    // thread before it (atomic exchange; NULL between forward calls)
    struct ice_half   * join[ICE_MAX_THREADS];
};

// Slots (stream * n_head_kv + KV head) per block of a state's heads, allocated when first prepared: a
// flat array for ICE_MAX_HEADS slots was 64 KiB per layer whatever the model, a tenth of a short
// context's KV cache.
#define ICE_HEAD_BLOCK 64

struct ice_attn_state {
    struct ice_attn_params p;
    struct ice_head  ** heads[ICE_MAX_HEADS / ICE_HEAD_BLOCK];   // blocks of ICE_HEAD_BLOCK slots, or NULL
    struct ice_attn_scratch * scratch;       // owned, or borrowed (ice_attn_state_init_shared)
    bool   own_scratch;
    struct ice_attn_counts cnt;              // rows answered and cells attended (since init; atomic adds)
};

// The head of a slot, NULL when never prepared.
static inline struct ice_head * ice_state_head(const struct ice_attn_state * st, int64_t slot) {
    struct ice_head ** b = __atomic_load_n(&st->heads[slot / ICE_HEAD_BLOCK], __ATOMIC_ACQUIRE);
    return b ? b[slot % ICE_HEAD_BLOCK] : NULL;
}

// Thread ith's scratch (created on first use; NULL when out of memory).
struct ice_thread * ice_attn_thread(struct ice_attn_state * st, int ith);

// Validates io; fills the common sizes.
struct ice_dims {
    int64_t d_k, d_v, n_tok, n_head, n_head_kv, n_stream, n_kv, gqa;
    int64_t stream0;   // global stream of view stream 0 (from io->written; 0 without persistence)
};
// need_out: also check io->out (forward/dense); prepare passes false, it has no output yet.
enum ice_status ice_attn_check_io(const struct ice_attn_io * io, struct ice_dims * dm, bool need_out);

static inline const void * ice_mask_row(const struct ice_attn_io * io, int64_t t, int64_t s) {
    return ice_view_ptr(&io->mask, 0, t, 0, io->mask.ne[3] == 1 ? 0 : s);
}

static inline float * ice_out_row(const struct ice_attn_io * io, int64_t s, int64_t t, int64_t h) {
    return (float *)(void *)((char *)io->out.data + h * io->out.nb[1] + t * io->out.nb[2] + s * io->out.nb[3]);
}

static inline void ice_kv_of(struct ice_kv * kv, const struct ice_attn_io * io, int64_t hk, int64_t s) {
    kv->k = ice_view_ptr(&io->k, 0, 0, hk, s); kv->k_nb1 = io->k.nb[1]; kv->kt = io->k.type;
    kv->v = ice_view_ptr(&io->v, 0, 0, hk, s); kv->v_nb0 = io->v.nb[0]; kv->v_nb1 = io->v.nb[1]; kv->vt = io->v.type;
    kv->d_k = io->k.ne[0]; kv->d_v = io->v.ne[0];
}

// q . key of cell j
static inline float ice_kv_dot(const struct ice_kv * kv, const float * q, int64_t j) {
    const void * p = kv->k + (size_t)j * kv->k_nb1;
    return kv->kt == ICE_TYPE_F16 ? ice_dot_f16(q, (const uint16_t *)p, kv->d_k) : ice_dot(q, (const float *)p, kv->d_k);
}

// o += w * value of cell j
static inline void ice_kv_axpy(const struct ice_kv * kv, float * o, float w, int64_t j) {
    const char * p = kv->v + (size_t)j * kv->v_nb1;
    if (kv->v_nb0 == ice_type_size(kv->vt)) {
        if (kv->vt == ICE_TYPE_F16) ice_axpy_f16(o, w, (const uint16_t *)(const void *)p, kv->d_v);
        else ice_axpy(o, w, (const float *)(const void *)p, kv->d_v);
        return;
    }
    for (int64_t d = 0; d < kv->d_v; d++) o[d] += w * ice_load(kv->vt, p + (size_t)d * kv->v_nb0);   // transposed V
}

// out[i] = q . key of cell cells[i], i < n
static inline void ice_kv_dots(const struct ice_kv * kv, const float * q, const int32_t * cells, int64_t n, float * out) {
    ice_dots_rows(q, kv->k, kv->k_nb1, kv->kt, cells, n, kv->d_k, out);
}

// The same for a transposed V cache (cells contiguous per dimension; attn.c): runs of consecutive
// cells become one contiguous dot product per dimension.
void ice_kv_axpys_transposed(const struct ice_kv * kv, float * o, const float * w, const int32_t * cells, int64_t n);

// o += sum_i w[i] * value of cell cells[i], i < n
static inline void ice_kv_axpys(const struct ice_kv * kv, float * o, const float * w, const int32_t * cells, int64_t n) {
    if (kv->v_nb0 == ice_type_size(kv->vt)) {
        ice_axpys_rows(o, w, kv->v, kv->v_nb1, kv->vt, cells, n, kv->d_v);
        return;
    }
    ice_kv_axpys_transposed(kv, o, w, cells, n);
}

// tail.c
// Fills constant tables; called by ice_attn_state_init (single-threaded, before any prepare/forward).
void ice_tail_init_tables(void);
// Recomputes block b's count, mean and variance (and, with has_sums, its sums) from the cache.
// krow: scratch of 3*d_k floats.
void ice_tail_block(struct ice_head * hd, const struct ice_kv * kv, int64_t b, float * krow);
// Coarse search: among the blocks with cells visible to the row (th->vis_bcnt) and not already covered
// by the union so far (uni: nu cells, stamped `gen`), picks the n_sel with the largest optimistic score
// and appends their visible cells not yet stamped to out, in cell order. With top_p > 0, n_sel is a cap:
// it takes the fewest blocks (at least n_min) whose estimated mass with the union's reaches top_p of the
// row's estimated total for each of the na heads (scale: the softmax scale). With share > 0, n_sel
// first grows to ceil(share * the blocks the row can choose). Returns the number appended, -1 when out
// of memory. out must hold n_sel * block_size cells (with share > 0, every block's). bqk, bsp: this row's block
// scores (ice_block_scores).
int64_t ice_block_select(const struct ice_head * hd, const struct ice_kv * kv, struct ice_thread * th, int32_t n_sel,
        int32_t n_min, float top_p, float share, float scale, int64_t na, const float * q, const float * bqk,
        const float * bsp, const int32_t * uni, int64_t nu, uint32_t gen, int32_t * out);
// The two ranking dot products of every block (q . mean key into th->bqk, q^2 . variance into th->bsp,
// na*n_blocks floats each, query j's at j*n_blocks) for the na query rows q (na*d_k floats) of one KV
// head: the query heads of a GQA group share one read of the ranking rows. 0, or -1 when out of memory.
int ice_block_scores(const struct ice_head * hd, struct ice_thread * th, const float * q, int64_t na);
// Adds the estimate of the visible points outside the union to a row: given the union
// `uni` (n_uni cells) with scores sc (scale*q.k + mask, already computed), writes per-union
// weights and the output. Returns 0 on success.
int  ice_tail_row(const struct ice_head * hd, const struct ice_kv * kv, struct ice_thread * th, float scale,
        const float * q, const int32_t * uni, int64_t n_uni, float * sc, float * out);

#endif

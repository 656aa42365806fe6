// attn_internal.h - attention state shared by attn.c, attn_dense.c and tail.c (not installed).

#ifndef ICE_ATTN_INTERNAL_H
#define ICE_ATTN_INTERNAL_H

#include "ice_internal.h"

#define ICE_MAX_THREADS 1024   // largest nth accepted by prepare/forward
#define ICE_MAX_HEADS   8192   // largest n_stream * n_head_kv

// Per (stream, KV head): written by one thread in prepare, read by all in forward.
struct ice_head {
    // what it was prepared for (checked by forward)
    const void * kdata; const void * vdata; const void * mdata;
    int64_t n_kv, d_k, d_v;
    enum ice_status status;
    // points: the cells visible to at least one row, ascending; rows of k32/v32 are points
    int64_t   n_pts;
    int32_t * cells;    size_t cells_cap;    // n_pts: point -> cell
    float   * k32;      size_t k32_cap;      // n_pts*d_k
    float   * v32;      size_t v32_cap;      // n_pts*d_v
    bool      indexed;                       // dci built (DCI search) or exact search allowed
    struct ice_dci dci;
    // tail: block b covers cells [b*B, (b+1)*B); sums over its points
    int64_t   n_blocks;
    int32_t * bcount;   size_t bcount_cap;   // n_blocks: points per block
    float   * bk;       size_t bk_cap;       // n_blocks*d_k: sum of keys
    float   * bvar;     size_t bvar_cap;     // n_blocks*d_k: per-dimension variance of the block's keys
    float   * bv;       size_t bv_cap;       // n_blocks*d_v: sum of values
    int32_t * bstart;   size_t bstart_cap;   // n_blocks+1: first point of each block (points ascend by cell)
};

// Per thread ith: grow-only scratch.
struct ice_thread {
    struct ice_dci_scratch dci;
    // visible points of row (s, t), cached across heads
    const void * vis_mask; int64_t vis_s, vis_t, vis_npts; int vis_blocks;
    int32_t * vis;      size_t vis_cap;      // visible points, ascending
    int64_t   n_vis;
    int32_t * vis_bcnt; size_t vis_bcnt_cap; // visible points per block for this row
    int32_t * partial;  size_t partial_cap;  // blocks the mask cuts for this row (0 < visible < all)
    int64_t   n_partial;
    const void * vis_mrow;                   // the mask row the visibility was computed from
    enum ice_type vis_mtype;
    float   * q;        size_t q_cap;
    float   * sc;       size_t sc_cap;       // scores
    float   * qk;       size_t qk_cap;       // q.k of the union's points (reused by the tail)
    float   * bsc;      size_t bsc_cap;      // coarse search: scores of the chosen blocks
    int32_t * bsel;     size_t bsel_cap;     // coarse search: the chosen blocks
    float   * bqk;      size_t bqk_cap;      // q . (key sum) per block, for this row and head
    float   * q2;       size_t q2_cap;       // q squared elementwise (spread term of block scores)
    int       bqk_valid;                     // bqk holds this row's values (set by the block search)
    int32_t * uni;      size_t uni_cap;      // union of attended points
    uint32_t * stamp;   size_t stamp_cap;    // per point: == gen when in the union
    uint32_t  gen;
    float   * heap_s;   size_t heap_s_cap;
    int64_t * heap_i;   size_t heap_i_cap;
    float   * w;        size_t w_cap;        // tail: per-block weights
    float   * tmp;      size_t tmp_cap;
    // stream scan cache for prepare
    const void * any_mask; int64_t any_s, any_nkv, any_ntok;
    uint8_t * any;      size_t any_cap;
    int32_t * unres;    size_t unres_cap;
};

struct ice_attn_state {
    struct ice_attn_params p;
    struct ice_head   * heads[ICE_MAX_HEADS];
    struct ice_thread * threads[ICE_MAX_THREADS];
};

// Validates io; fills the common sizes.
struct ice_dims {
    int64_t d_k, d_v, n_tok, n_head, n_head_kv, n_stream, n_kv, gqa;
};
// need_out: also check io->out (forward/dense); prepare passes false, it has no output yet.
enum ice_status ice_attn_check_io(const struct ice_attn_io * io, struct ice_dims * dm, bool need_out);

static inline const void * ice_mask_row(const struct ice_attn_io * io, int64_t t, int64_t s) {
    return ice_view_ptr(&io->mask, 0, t, 0, io->mask.ne[3] == 1 ? 0 : s);
}

static inline float * ice_out_row(const struct ice_attn_io * io, int64_t s, int64_t t, int64_t h) {
    return (float *)(void *)((char *)io->out.data + h * io->out.nb[1] + t * io->out.nb[2] + s * io->out.nb[3]);
}

// tail.c
// Fills constant tables; called by ice_attn_state_init (single-threaded, before any prepare/forward).
void ice_tail_init_tables(void);
int  ice_tail_prepare(struct ice_head * hd, int64_t block_size);
// Coarse search: among the blocks with points visible to the row (th->vis_bcnt), picks the n_sel with
// the largest optimistic score and appends their visible points not yet stamped `gen` to out.
// Returns the number appended, -1 when out of memory. out must hold n_sel * block_size points.
int64_t ice_block_select(const struct ice_head * hd, struct ice_thread * th, int64_t block_size, int32_t n_sel,
        const float * q, uint32_t gen, int32_t * out);
// Adds the estimate of the visible points outside the union to a row: given the union
// `uni` (n_uni points) with scores sc (scale*q.k + mask, already computed), writes per-union
// weights and the output. Returns 0 on success.
int  ice_tail_row(const struct ice_head * hd, struct ice_thread * th, int64_t block_size, float scale,
        const float * q, const int32_t * uni, int64_t n_uni, float * sc, float * out);

#endif

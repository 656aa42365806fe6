// attn_state.c - the attention op's per-layer state and scratch (lifecycle, memory, counts) and prepare.
//
// prepare: each (stream, KV head) pair p is handled by thread p % nth. It keeps block summaries
// over the cache's cells (and a DCI index for k-NN search) up to date: rebuilt from the views, or,
// when the caller's cache versions say nothing but this op's writes changed the stream since the
// state's last update, recomputed only for the blocks of the cells this evaluation writes. Keys and
// values are read in place (f16); for evaluations of many rows (prefill) prepare also copies the keys
// into tiles in the thread's scratch (tile_keys), which forward reads whole blocks from. forward is in attn.c.

#include "attn_internal.h"


static enum ice_status check_params(const struct ice_attn_params * p) {
    if (!p) return ICE_STATUS_INVALID_ARG;
    if (p->top_k < 0 || p->n_sinks < 0 || p->window < 0 || p->block_size < 1 || p->min_n_kv < 0) return ICE_STATUS_INVALID_ARG;
    if (p->n_composite < 1 || p->n_composite > 64 || p->n_simple < 1 || p->n_simple > 64) return ICE_STATUS_INVALID_ARG;
    if ((int64_t)p->n_composite * p->n_simple > 4096) return ICE_STATUS_INVALID_ARG;
    if (p->visit_budget < 0 || p->retrieve_budget < 0 || p->top_blocks < 0) return ICE_STATUS_INVALID_ARG;
    if (p->min_blocks < 0 || !(p->top_p >= 0.0f && p->top_p <= 1.0f)) return ICE_STATUS_INVALID_ARG;
    if (!(p->block_share >= 0.0f && p->block_share <= 1.0f)) return ICE_STATUS_INVALID_ARG;
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_scratch_init(struct ice_attn_scratch ** out) {
    if (!out) return ICE_STATUS_INVALID_ARG;
    *out = calloc(1, sizeof **out);
    return *out ? ICE_STATUS_OK : ICE_STATUS_NO_MEMORY;
}

enum ice_status ice_attn_state_init_shared(const struct ice_attn_params * params, struct ice_attn_scratch * scratch,
        struct ice_attn_state ** out) {
    if (!out) return ICE_STATUS_INVALID_ARG;
    *out = NULL;
    enum ice_status st = check_params(params);
    if (st != ICE_STATUS_OK) return st;
    struct ice_attn_state * s = calloc(1, sizeof *s);
    if (!s) return ICE_STATUS_NO_MEMORY;
    s->own_scratch = scratch == NULL;
    if (s->own_scratch && ice_attn_scratch_init(&scratch) != ICE_STATUS_OK) { free(s); return ICE_STATUS_NO_MEMORY; }
    ice_tail_init_tables();
    s->p = *params;
    s->scratch = scratch;
    *out = s;
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_state_init(const struct ice_attn_params * params, struct ice_attn_state ** out) {
    return ice_attn_state_init_shared(params, NULL, out);
}

enum ice_status ice_attn_state_set_params(struct ice_attn_state * state, const struct ice_attn_params * params) {
    if (!state) return ICE_STATUS_INVALID_ARG;
    enum ice_status st = check_params(params);
    if (st != ICE_STATUS_OK) return st;
    state->p = *params;
    return ICE_STATUS_OK;
}

static void head_free(struct ice_head * h) {
    if (!h) return;
    free(h->bcount); free(h->rmean); free(h->rvar); free(h->bk); free(h->bv);
    ice_dci_free(&h->dci);
    free(h);
}

static void thread_free(struct ice_thread * t) {
    if (!t) return;
    ice_dci_scratch_free(&t->dci);
    free(t->vis); free(t->vis_bcnt); free(t->q); free(t->sc); free(t->qk); free(t->bcov); free(t->bkey); free(t->bmass); free(t->gq); free(t->bqk); free(t->q2); free(t->bsp); free(t->partial); free(t->uni); free(t->stamp);
    free(t->heap_s); free(t->heap_i); free(t->w); free(t->tmp); free(t->krow); free(t->dirty); free(t->k32); free(t->stat);
    free(t->ktiles);
    for (int i = 0; i < 4; i++) free(t->half[i].buf);
    free(t->gqa_q); free(t->gsc); free(t->hcells); free(t->hoff); free(t->tl);
    free(t);
}

void ice_attn_scratch_free(struct ice_attn_scratch * scratch) {
    if (!scratch) return;
    for (int i = 0; i < ICE_MAX_THREADS; i++) thread_free(scratch->threads[i]);
    free(scratch);
}

void ice_attn_state_free(struct ice_attn_state * state) {
    if (!state) return;
    for (int b = 0; b < ICE_MAX_HEADS / ICE_HEAD_BLOCK; b++) {
        if (!state->heads[b]) continue;
        for (int i = 0; i < ICE_HEAD_BLOCK; i++) head_free(state->heads[b][i]);
        free(state->heads[b]);
    }
    if (state->own_scratch) ice_attn_scratch_free(state->scratch);
    free(state);
}

size_t ice_attn_state_memory(const struct ice_attn_state * state) {
    if (!state) return 0;
    size_t b = sizeof *state;
    for (int k = 0; k < ICE_MAX_HEADS / ICE_HEAD_BLOCK; k++) {
        if (!state->heads[k]) continue;
        b += ICE_HEAD_BLOCK * sizeof *state->heads[k];
        for (int i = 0; i < ICE_HEAD_BLOCK; i++) {
            const struct ice_head * h = state->heads[k][i];
            if (h) b += sizeof *h + h->bcount_cap + h->rmean_cap + h->rvar_cap + h->bk_cap + h->bv_cap + ice_dci_memory(&h->dci);
        }
    }
    return b + (state->own_scratch ? ice_attn_scratch_memory(state->scratch) : 0);
}

size_t ice_attn_scratch_memory(const struct ice_attn_scratch * scratch) {
    if (!scratch) return 0;
    size_t b = sizeof *scratch;
    for (int i = 0; i < ICE_MAX_THREADS; i++) {
        const struct ice_thread * t = scratch->threads[i];
        if (!t) continue;
        b += sizeof *t + t->dci.cnt_cap + t->dci.cand_cap + t->dci.touched_cap + t->dci.qn_cap +
             t->vis_cap + t->vis_bcnt_cap + t->q_cap + t->sc_cap + t->qk_cap + t->bcov_cap + t->bkey_cap + t->bmass_cap + t->gq_cap + t->bqk_cap + t->q2_cap + t->bsp_cap + t->partial_cap + t->uni_cap + t->stamp_cap +
             t->heap_s_cap + t->heap_i_cap + t->w_cap + t->tmp_cap + t->krow_cap + t->dirty_cap + t->k32_cap + t->stat_cap +
             t->ktiles_cap;
        for (int j = 0; j < 4; j++) b += t->half[j].buf_cap;
        b += t->gqa_q_cap + t->gsc_cap + t->hcells_cap + t->hoff_cap + t->tl_cap;
    }
    return b;
}

enum ice_status ice_attn_state_counts(const struct ice_attn_state * state, struct ice_attn_counts * out) {
    if (!state || !out) return ICE_STATUS_INVALID_ARG;
    out->n_rows     = __atomic_load_n(&state->cnt.n_rows, __ATOMIC_RELAXED);
    out->n_attended = __atomic_load_n(&state->cnt.n_attended, __ATOMIC_RELAXED);
    out->n_visible  = __atomic_load_n(&state->cnt.n_visible, __ATOMIC_RELAXED);
    return ICE_STATUS_OK;
}

struct ice_thread * ice_attn_thread(struct ice_attn_state * st, int ith) {
    struct ice_thread ** t = &st->scratch->threads[ith];
    if (!*t) {
        *t = calloc(1, sizeof(struct ice_thread));
        if (*t) (*t)->vis_t = -1;
    }
    return *t;
}

// ---- prepare -------------------------------------------------------------------

// Whether cell id `w` (llama.cpp's k_idxs form) belongs to global stream gs; its cell in *c.
static inline int written_cell(const struct ice_attn_io * io, int64_t i, int64_t gs, int64_t * c) {
    const int64_t w = io->written[i];
    if (w < 0 || w / io->stream_cells != gs) return 0;
    *c = w % io->stream_cells;
    return 1;
}

// DCI over cells 0..n_kv-1: rebuilt, or updated with the written cells and the cells past its end.
// The embedding's mean and M come from the cells visible to row 0 (a causal ubatch's first row sees
// the past only, so keys of later rows never shape the walk of earlier ones), with M given 25%
// headroom; a new key beyond M cannot be embedded and triggers a rebuild (documented in the header).
static int dci_update(const struct ice_attn_params * p, struct ice_head * h, struct ice_thread * th,
        const struct ice_attn_io * io, const struct ice_dims * dm, int64_t s, int64_t hk, bool rebuild) {
    const int64_t n_kv = dm->n_kv, dk = dm->d_k, gs = dm->stream0 + s;
    if (h->dci.dim != dk || h->dci.L != p->n_composite || h->dci.m != p->n_simple || h->dci.seed != p->seed) {
        ice_dci_free(&h->dci);
        ice_dci_init(&h->dci, (int32_t)dk, p->n_composite, p->n_simple, p->seed);
        rebuild = true;
    }
    if (!h->dci_built || h->dci.n > n_kv) rebuild = true;
    if (!rebuild) {
        int r = 0;
        for (int64_t i = 0; i < io->n_written && r == 0; i++) {
            int64_t c;
            if (!written_cell(io, i, gs, &c) || c >= h->dci.n) continue;
            ice_view_load_row(&io->k, c, hk, s, th->krow);
            r = ice_dci_upsert(&h->dci, th->krow, (int32_t)c);
        }
        for (int64_t c = h->dci.n; c < n_kv && r == 0; c++) {
            ice_view_load_row(&io->k, c, hk, s, th->krow);
            r = ice_dci_upsert(&h->dci, th->krow, (int32_t)c);
        }
        if (r < 0) return -1;
        if (r == 0) return 0;
    }
    h->dci_built = false;
    if (ICE_RESERVE(&th->k32, &th->k32_cap, n_kv * dk, 0) || ICE_RESERVE(&th->stat, &th->stat_cap, n_kv, 0)) return -1;
    const void * m0 = ice_mask_row(io, 0, s);
    int64_t n_stat = 0;
    for (int64_t c = 0; c < n_kv; c++) {
        ice_view_load_row(&io->k, c, hk, s, th->k32 + c * dk);
        th->stat[c] = (uint8_t) ice_mask_visible(io->mask.type, m0, c);
        n_stat += th->stat[c];
    }
    const int rc = ice_dci_build(&h->dci, th->k32, dk, n_kv, n_stat >= 64 ? th->stat : NULL, 1.25f);
    // the f32 copy is build scratch only: the persistent state keeps no copy of the cache
    free(th->k32); th->k32 = NULL; th->k32_cap = 0;
    if (rc) return -1;
    h->dci_built = true;
    return 0;
}

// Rows per evaluation from which forward reads keys from tiles: the copy costs about what one head's dot
// products over every cell would, and each row of each head reads about half of the cells.
#define ICE_KEY_TILE_MIN_ROWS 16

// Whether this call copies its keys into tiles (tile_keys): when it pays, many rows, f16 keys, blocks of
// whole tiles and no per-row k-NN search or tail estimate (which read keys their own way); and only where
// the tiles give the row path's bits (ice_tiles_match_rows: AVX-512), so a ubatch's size never changes
// what it computes.
static bool want_key_tiles(const struct ice_attn_params * p, const struct ice_dims * dm, const struct ice_attn_io * io) {
    return dm->n_tok >= ICE_KEY_TILE_MIN_ROWS && io->k.type == ICE_TYPE_F16 && p->top_blocks > 0 &&
           p->block_size % ICE_TILE == 0 && p->top_k == 0 && !p->tail_estimate && ice_tiles_match_rows(dm->d_k);
}

// Copies the n_kv keys of kv into tiles at kt (whole tiles, the last padded with zeros) for forward.
static void tile_keys(uint16_t * kt, const struct ice_dims * dm, const struct ice_kv * kv) {
    const int64_t n_kv = dm->n_kv, dk = dm->d_k;
    for (int64_t c0 = 0; c0 < n_kv; c0 += ICE_TILE) {
        uint16_t * t = kt + (size_t)c0 * dk;
        const int64_t nr = n_kv - c0 < ICE_TILE ? n_kv - c0 : ICE_TILE;
        for (int64_t r = 0; r < nr; r++) {
            const uint16_t * row = (const uint16_t *)(const void *)(kv->k + (size_t)(c0 + r) * kv->k_nb1);
            for (int64_t d = 0; d < dk; d++) t[d * ICE_TILE + r] = row[d];
        }
        for (int64_t r = nr; r < ICE_TILE; r++) for (int64_t d = 0; d < dk; d++) t[d * ICE_TILE + r] = 0;
    }
}

// kt: room for this head's tiled keys, or NULL when the call makes none.
static enum ice_status prepare_head(struct ice_attn_state * st, struct ice_thread * th, const struct ice_attn_io * io,
        const struct ice_dims * dm, int64_t s, int64_t hk, uint16_t * kt) {
    const struct ice_attn_params * p = &st->p;
    const int64_t slot = (dm->stream0 + s) * dm->n_head_kv + hk;
    if (slot >= ICE_MAX_HEADS) return ICE_STATUS_UNSUPPORTED;
    struct ice_head ** blk = __atomic_load_n(&st->heads[slot / ICE_HEAD_BLOCK], __ATOMIC_ACQUIRE);
    if (!blk) {
        // threads preparing slots of one block race to add it: the first wins, the others free theirs
        struct ice_head ** mine = calloc(ICE_HEAD_BLOCK, sizeof *mine), ** none = NULL;
        if (!mine) return ICE_STATUS_NO_MEMORY;
        if (__atomic_compare_exchange_n(&st->heads[slot / ICE_HEAD_BLOCK], &none, mine, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            blk = mine;
        } else {
            free(mine);
            blk = none;   // the winner's block
        }
    }
    struct ice_head ** hp = &blk[slot % ICE_HEAD_BLOCK];   // this thread's slot: no other writes it
    if (!*hp) {
        *hp = calloc(1, sizeof(struct ice_head));
        if (!*hp) return ICE_STATUS_NO_MEMORY;
    }
    struct ice_head * h = *hp;
    h->kt = NULL;
    struct ice_kv kv;
    ice_kv_of(&kv, io, hk, s);
    const int64_t n_kv = dm->n_kv, B = p->block_size;
    // incremental only when the state was last updated at or after the version the caller says its
    // stream has been unchanged since (except by writes this op saw)
    const bool persist = p->persistent && io->epoch_after != 0;
    const bool same = persist && h->epoch != 0 && h->epoch >= io->epoch_before && h->epoch < io->epoch_after &&
                      h->indexed && h->B == B && h->has_sums == p->tail_estimate &&
                      h->kbase == kv.k && h->vbase == kv.v && h->d_k == dm->d_k && h->d_v == dm->d_v;
    const int64_t old_n_kv = same ? h->n_kv : 0;
    h->status = ICE_STATUS_NO_MEMORY;
    h->epoch = 0;
    h->kbase = kv.k; h->vbase = kv.v; h->mdata = io->mask.data;
    h->n_kv = n_kv; h->d_k = dm->d_k; h->d_v = dm->d_v;
    if (ICE_RESERVE(&th->krow, &th->krow_cap, 3 * dm->d_k, 0)) return ICE_STATUS_NO_MEMORY;
    const bool want = p->top_k > 0 || p->top_blocks > 0 || p->tail_estimate;
    if (!want) {
        h->indexed = false;
        h->status = ICE_STATUS_OK;
        return ICE_STATUS_OK;
    }
    const int64_t nb = (n_kv + B - 1) / B;
    const int64_t nb_tiled = (nb + ICE_TILE - 1) / ICE_TILE * ICE_TILE;   // ranking rows come in whole tiles
    if (ICE_RESERVE(&h->bcount, &h->bcount_cap, nb, 1) || ICE_RESERVE(&h->rmean, &h->rmean_cap, nb_tiled * dm->d_k, 1) ||
        ICE_RESERVE(&h->rvar, &h->rvar_cap, nb_tiled * dm->d_k, 1) ||
        (p->tail_estimate && (ICE_RESERVE(&h->bk, &h->bk_cap, nb * dm->d_k, 1) || ICE_RESERVE(&h->bv, &h->bv_cap, nb * dm->d_v, 1))) ||
        ICE_RESERVE(&th->dirty, &th->dirty_cap, nb, 0)) {
        h->indexed = false;
        return ICE_STATUS_NO_MEMORY;
    }
    // exact sums serve the tail estimate only: without it they are not kept (two thirds of the bytes)
    if (!p->tail_estimate) { free(h->bk); free(h->bv); h->bk = NULL; h->bv = NULL; h->bk_cap = h->bv_cap = 0; }
    h->has_sums = p->tail_estimate;
    h->B = B; h->n_blocks = nb;
    if (same) {
        // the blocks of the written cells, and every block whose cell range moved with n_kv
        memset(th->dirty, 0, (size_t)nb);
        for (int64_t i = 0; i < io->n_written; i++) {
            int64_t c;
            if (written_cell(io, i, dm->stream0 + s, &c) && c < n_kv) th->dirty[c / B] = 1;
        }
        const int64_t lo = (old_n_kv < n_kv ? old_n_kv : n_kv) / B;
        for (int64_t b = lo; b < nb; b++) th->dirty[b] = 1;
        for (int64_t b = 0; b < nb; b++) if (th->dirty[b]) ice_tail_block(h, &kv, b, th->krow);
    } else {
        for (int64_t b = 0; b < nb; b++) ice_tail_block(h, &kv, b, th->krow);
    }
    h->indexed = false;
    if (p->top_k > 0 && !p->exact_search) {
        if (dci_update(p, h, th, io, dm, s, hk, !same)) return ICE_STATUS_NO_MEMORY;
    } else {
        h->dci_built = false;   // not kept up to date while unused: rebuilt when next needed
    }
    h->indexed = true;
    h->epoch = persist ? io->epoch_after : 0;
    h->status = ICE_STATUS_OK;
    if (kt) {
        tile_keys(kt, dm, &kv);
        h->kt = kt; h->kt_th = th; h->kt_gen = th->ktiles_gen;
    }
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_prepare(struct ice_attn_state * st, const struct ice_attn_io * io, int ith, int nth) {
    if (!st || nth < 1 || nth > ICE_MAX_THREADS || ith < 0 || ith >= nth) return ICE_STATUS_INVALID_ARG;
    struct ice_dims dm;
    enum ice_status rc = ice_attn_check_io(io, &dm, false);
    if (rc != ICE_STATUS_OK) return rc;
    if ((dm.stream0 + dm.n_stream) * dm.n_head_kv > ICE_MAX_HEADS) return ICE_STATUS_UNSUPPORTED;
    struct ice_thread * th = ice_attn_thread(st, ith);
    if (!th) return ICE_STATUS_NO_MEMORY;
    const int64_t n_pairs = dm.n_stream * dm.n_head_kv, n_mine = n_pairs > ith ? (n_pairs - ith + nth - 1) / nth : 0;
    const int64_t per = (dm.n_kv + ICE_TILE - 1) / ICE_TILE * ICE_TILE * dm.d_k;   // one head's tiled keys
    th->ktiles_gen++;   // the tiles this thread copied before (another layer's, or this one's) are stale
    // without the memory, forward reads rows in place
    const bool tiles = want_key_tiles(&st->p, &dm, io) && !ICE_RESERVE(&th->ktiles, &th->ktiles_cap, n_mine * per, 0);
    for (int64_t pi = ith, k = 0; pi < n_pairs; pi += nth, k++) {
        const enum ice_status r = prepare_head(st, th, io, &dm, pi / dm.n_head_kv, pi % dm.n_head_kv,
                                               tiles ? th->ktiles + k * per : NULL);
        if (r != ICE_STATUS_OK) rc = r;
    }
    return rc;
}

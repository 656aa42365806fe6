// attn.c - the attention op: per-layer state, prepare (per-KV-head indices) and forward.
//
// prepare: each (stream, KV head) pair p is handled by thread p % nth. Its keys and values
// are converted once to contiguous f32 rows ("points": the cells visible to at least one
// row of the ubatch), and a DCI index (or nothing, for exact search) and block summaries
// are built over them.
// forward: rows (stream, token, head) are split over threads; every row is computed the
// same way whatever thread runs it, so the output does not depend on nth.

#include "attn_internal.h"

static enum ice_status check_params(const struct ice_attn_params * p) {
    if (!p) return ICE_STATUS_INVALID_ARG;
    if (p->top_k < 0 || p->n_sinks < 0 || p->window < 0 || p->block_size < 1 || p->min_n_kv < 0) return ICE_STATUS_INVALID_ARG;
    if (p->n_composite < 1 || p->n_composite > 64 || p->n_simple < 1 || p->n_simple > 64) return ICE_STATUS_INVALID_ARG;
    if ((int64_t)p->n_composite * p->n_simple > 4096) return ICE_STATUS_INVALID_ARG;
    if (p->visit_budget < 0 || p->retrieve_budget < 0 || p->top_blocks < 0) return ICE_STATUS_INVALID_ARG;
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_state_init(const struct ice_attn_params * params, struct ice_attn_state ** out) {
    if (!out) return ICE_STATUS_INVALID_ARG;
    *out = NULL;
    enum ice_status st = check_params(params);
    if (st != ICE_STATUS_OK) return st;
    struct ice_attn_state * s = calloc(1, sizeof *s);
    if (!s) return ICE_STATUS_NO_MEMORY;
    ice_tail_init_tables();
    s->p = *params;
    *out = s;
    return ICE_STATUS_OK;
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
    free(h->cells); free(h->k32); free(h->v32); free(h->bcount); free(h->bk); free(h->bv); free(h->bstart); free(h->bvar);
    ice_dci_free(&h->dci);
    free(h);
}

static void thread_free(struct ice_thread * t) {
    if (!t) return;
    ice_dci_scratch_free(&t->dci);
    free(t->vis); free(t->vis_bcnt); free(t->q); free(t->sc); free(t->qk); free(t->bsc); free(t->bsel); free(t->bqk); free(t->q2); free(t->partial); free(t->uni); free(t->stamp);
    free(t->heap_s); free(t->heap_i); free(t->w); free(t->tmp); free(t->any); free(t->unres);
    free(t);
}

void ice_attn_state_free(struct ice_attn_state * state) {
    if (!state) return;
    for (int i = 0; i < ICE_MAX_HEADS; i++) head_free(state->heads[i]);
    for (int i = 0; i < ICE_MAX_THREADS; i++) thread_free(state->threads[i]);
    free(state);
}

size_t ice_attn_state_memory(const struct ice_attn_state * state) {
    if (!state) return 0;
    size_t b = sizeof *state;
    for (int i = 0; i < ICE_MAX_HEADS; i++) {
        const struct ice_head * h = state->heads[i];
        if (!h) continue;
        b += sizeof *h + h->cells_cap + h->k32_cap + h->v32_cap + h->bcount_cap + h->bk_cap + h->bv_cap + h->bstart_cap + h->bvar_cap + ice_dci_memory(&h->dci);
    }
    for (int i = 0; i < ICE_MAX_THREADS; i++) {
        const struct ice_thread * t = state->threads[i];
        if (!t) continue;
        b += sizeof *t + t->dci.cnt_cap + t->dci.cand_cap + t->dci.touched_cap + t->dci.qn_cap +
             t->vis_cap + t->vis_bcnt_cap + t->q_cap + t->sc_cap + t->qk_cap + t->bsc_cap + t->bsel_cap + t->bqk_cap + t->q2_cap + t->partial_cap + t->uni_cap + t->stamp_cap +
             t->heap_s_cap + t->heap_i_cap + t->w_cap + t->tmp_cap + t->any_cap + t->unres_cap;
    }
    return b;
}

static struct ice_thread * get_thread(struct ice_attn_state * st, int ith) {
    if (!st->threads[ith]) {
        st->threads[ith] = calloc(1, sizeof(struct ice_thread));
        if (st->threads[ith]) st->threads[ith]->vis_t = -1;
    }
    return st->threads[ith];
}

// ---- prepare -------------------------------------------------------------------

// Cells of stream s visible to at least one real row: any[j] = 1. Cached per thread.
static int stream_any(struct ice_thread * th, const struct ice_attn_io * io, const struct ice_dims * dm, int64_t s) {
    const int64_t ms = io->mask.ne[3] == 1 ? 0 : s;
    if (th->any_mask == io->mask.data && th->any_s == ms && th->any_nkv == dm->n_kv && th->any_ntok == dm->n_tok) return 0;
    th->any_mask = NULL;
    if (ICE_RESERVE(&th->any, &th->any_cap, dm->n_kv, 0) || ICE_RESERVE(&th->unres, &th->unres_cap, dm->n_kv, 0)) return -1;
    memset(th->any, 0, (size_t)dm->n_kv);
    int64_t n_un = dm->n_kv;
    for (int64_t j = 0; j < n_un; j++) th->unres[j] = (int32_t)j;
    // later rows usually see the most: scan from the last row, only unresolved cells
    for (int64_t t = dm->n_tok - 1; t >= 0 && n_un > 0; t--) {
        const void * mrow = ice_mask_row(io, t, s);
        int64_t o = 0;
        for (int64_t i = 0; i < n_un; i++) {
            const int32_t j = th->unres[i];
            if (ice_mask_visible(io->mask.type, mrow, j)) th->any[j] = 1; else th->unres[o++] = j;
        }
        n_un = o;
    }
    th->any_mask = io->mask.data; th->any_s = ms; th->any_nkv = dm->n_kv; th->any_ntok = dm->n_tok;
    return 0;
}

// Loads rows of a [d, n_kv] view for the given cells into dst (n*d, row-major).
static void load_rows(const struct ice_view * v, int64_t hk, int64_t s, const int32_t * cells, int64_t n, float * dst) {
    const int64_t d = v->ne[0];
    if (v->nb[0] > v->nb[1]) {      // transposed: read along cells
        for (int64_t i = 0; i < d; i++) {
            const char * base = ice_view_ptr(v, i, 0, hk, s);
            for (int64_t p = 0; p < n; p++) dst[p * d + i] = ice_load(v->type, base + (int64_t)cells[p] * (int64_t)v->nb[1]);
        }
        return;
    }
    for (int64_t p = 0; p < n; p++) ice_view_load_row(v, cells[p], hk, s, dst + p * d);
}

static enum ice_status prepare_head(struct ice_attn_state * st, struct ice_thread * th, const struct ice_attn_io * io,
        const struct ice_dims * dm, int64_t s, int64_t hk) {
    const struct ice_attn_params * p = &st->p;
    const int64_t slot = s * dm->n_head_kv + hk;
    if (!st->heads[slot]) {
        st->heads[slot] = calloc(1, sizeof(struct ice_head));
        if (!st->heads[slot]) return ICE_STATUS_NO_MEMORY;
    }
    struct ice_head * h = st->heads[slot];
    h->status = ICE_STATUS_NO_MEMORY;
    h->kdata = io->k.data; h->vdata = io->v.data; h->mdata = io->mask.data;
    h->n_kv = dm->n_kv; h->d_k = dm->d_k; h->d_v = dm->d_v;
    h->indexed = false; h->n_pts = 0; h->n_blocks = 0;
    if (stream_any(th, io, dm, s)) return ICE_STATUS_NO_MEMORY;
    if (ICE_RESERVE(&h->cells, &h->cells_cap, dm->n_kv, 0)) return ICE_STATUS_NO_MEMORY;
    int64_t n = 0;
    for (int64_t j = 0; j < dm->n_kv; j++) if (th->any[j]) h->cells[n++] = (int32_t)j;
    if (ICE_RESERVE(&h->k32, &h->k32_cap, n * dm->d_k + 1, 0) || ICE_RESERVE(&h->v32, &h->v32_cap, n * dm->d_v + 1, 0)) {
        return ICE_STATUS_NO_MEMORY;
    }
    load_rows(&io->k, hk, s, h->cells, n, h->k32);
    load_rows(&io->v, hk, s, h->cells, n, h->v32);
    h->n_pts = n;
    // rows attend densely when sinks + window already cover them (or below min_n_kv)
    const int64_t n_fixed = (int64_t)p->n_sinks + p->window;
    if (n >= p->min_n_kv && n > n_fixed && (p->top_k > 0 || p->top_blocks > 0)) {
        if (p->top_k > 0 && !p->exact_search) {
            if (h->dci.dim != dm->d_k || h->dci.L != p->n_composite || h->dci.m != p->n_simple || h->dci.seed != p->seed) {
                ice_dci_free(&h->dci);
                ice_dci_init(&h->dci, (int32_t)dm->d_k, p->n_composite, p->n_simple, p->seed);
            }
            // statistics from the leading points visible to row 0 (a causal ubatch's first row
            // sees a prefix that every later row sees too); too few: all points
            const void * m0 = ice_mask_row(io, 0, s);
            int64_t n_stat = 0;
            while (n_stat < n && ice_mask_visible(io->mask.type, m0, h->cells[n_stat])) n_stat++;
            if (n_stat < 64) n_stat = 0;
            if (ice_dci_build(&h->dci, h->k32, dm->d_k, n, n_stat)) return ICE_STATUS_NO_MEMORY;
        }
        if ((p->tail_estimate || p->top_blocks > 0) && ice_tail_prepare(h, p->block_size)) return ICE_STATUS_NO_MEMORY;
        h->indexed = true;
    }
    h->status = ICE_STATUS_OK;
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_prepare(struct ice_attn_state * st, const struct ice_attn_io * io, int ith, int nth) {
    if (!st || nth < 1 || nth > ICE_MAX_THREADS || ith < 0 || ith >= nth) return ICE_STATUS_INVALID_ARG;
    struct ice_dims dm;
    enum ice_status rc = ice_attn_check_io(io, &dm, false);
    if (rc != ICE_STATUS_OK) return rc;
    if (dm.n_stream * dm.n_head_kv > ICE_MAX_HEADS) return ICE_STATUS_UNSUPPORTED;
    struct ice_thread * th = get_thread(st, ith);
    if (!th) return ICE_STATUS_NO_MEMORY;
    th->any_mask = NULL;   // the mask buffer may hold new values at the same address
    const int64_t n_pairs = dm.n_stream * dm.n_head_kv;
    for (int64_t pi = ith; pi < n_pairs; pi += nth) {
        const enum ice_status r = prepare_head(st, th, io, &dm, pi / dm.n_head_kv, pi % dm.n_head_kv);
        if (r != ICE_STATUS_OK) rc = r;
    }
    return rc;
}

// ---- forward -------------------------------------------------------------------

struct vis_ctx { const void * mrow; enum ice_type type; const int32_t * cells; };

static int point_visible(const void * ctx, int64_t pt) {
    const struct vis_ctx * c = ctx;
    return ice_mask_visible(c->type, c->mrow, c->cells[pt]);
}

// Visible points of row (s, t) of head h's point set; cached across heads of a stream.
static int row_visible(struct ice_thread * th, const struct ice_head * h, const struct ice_attn_io * io,
        int64_t s, int64_t t, int64_t block_size, int want_blocks) {
    if (th->vis_mask == io->mask.data && th->vis_s == s && th->vis_t == t && th->vis_npts == h->n_pts &&
        th->vis_blocks >= want_blocks) {
        return 0;
    }
    th->vis_mask = NULL;
    if (ICE_RESERVE(&th->vis, &th->vis_cap, h->n_pts + 1, 0)) return -1;
    const void * mrow = ice_mask_row(io, t, s);
    int64_t nv = 0;
    for (int64_t i = 0; i < h->n_pts; i++) if (ice_mask_visible(io->mask.type, mrow, h->cells[i])) th->vis[nv++] = (int32_t)i;
    th->n_vis = nv;
    if (want_blocks) {
        const int64_t nb = (h->n_kv + block_size - 1) / block_size;
        if (ICE_RESERVE(&th->vis_bcnt, &th->vis_bcnt_cap, nb + 1, 0)) return -1;
        memset(th->vis_bcnt, 0, (size_t)nb * sizeof(int32_t));
        for (int64_t i = 0; i < nv; i++) th->vis_bcnt[h->cells[th->vis[i]] / block_size]++;
        // blocks cut by the mask, listed so the tail visits only their points (a causal row has one)
        if (ICE_RESERVE(&th->partial, &th->partial_cap, nb + 1, 0)) return -1;
        th->n_partial = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (th->vis_bcnt[b] > 0 && th->vis_bcnt[b] != h->bcount[b]) th->partial[th->n_partial++] = (int32_t)b;
        }
    }
    th->vis_mrow = mrow;
    th->vis_mtype = io->mask.type;
    th->vis_mask = io->mask.data; th->vis_s = s; th->vis_t = t; th->vis_npts = h->n_pts; th->vis_blocks = want_blocks;
    return 0;
}

// softmax over sc[0..n) of points pts, output into o (d_v), zero when n == 0
static void attend_points(const struct ice_head * h, const int32_t * pts, int64_t n, float * sc, float * o) {
    const int64_t dv = h->d_v;
    memset(o, 0, (size_t)dv * sizeof(float));
    if (n == 0) return;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) if (sc[i] > mx) mx = sc[i];
    float sum = 0;
    for (int64_t i = 0; i < n; i++) { sc[i] = expf(sc[i] - mx); sum += sc[i]; }
    for (int64_t i = 0; i < n; i++) ice_axpy(o, sc[i], h->v32 + (int64_t)pts[i] * dv, dv);
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < dv; d++) o[d] *= inv;
}

static enum ice_status forward_row(struct ice_attn_state * st, struct ice_thread * th, const struct ice_attn_io * io,
        const struct ice_dims * dm, int64_t s, int64_t t, int64_t hq) {
    const struct ice_attn_params * p = &st->p;
    const int64_t hk = hq / dm->gqa;
    const struct ice_head * h = st->heads[s * dm->n_head_kv + hk];
    float * o = ice_out_row(io, s, t, hq);
    if (!h || h->kdata != io->k.data || h->vdata != io->v.data || h->mdata != io->mask.data ||
        h->n_kv != dm->n_kv || h->d_k != dm->d_k || h->d_v != dm->d_v) {
        memset(o, 0, (size_t)dm->d_v * sizeof(float));
        return ICE_STATUS_INVALID_ARG;   // prepare was not run for this io
    }
    if (h->status != ICE_STATUS_OK) { memset(o, 0, (size_t)dm->d_v * sizeof(float)); return h->status; }
    const int tail = p->tail_estimate && h->indexed;
    const int blocks = p->top_blocks > 0 && h->indexed;
    if (row_visible(th, h, io, s, t, p->block_size, tail || blocks)) return ICE_STATUS_NO_MEMORY;
    const int64_t nv = th->n_vis, dk = dm->d_k;
    const void * mrow = ice_mask_row(io, t, s);
    if (ICE_RESERVE(&th->q, &th->q_cap, dk, 0) || ICE_RESERVE(&th->sc, &th->sc_cap, h->n_pts + 1, 0)) return ICE_STATUS_NO_MEMORY;
    float * q = th->q;
    ice_view_load_row(&io->q, t, hq, s, q);
    const int64_t n_union = (int64_t)p->top_k + p->n_sinks + p->window + (int64_t)p->top_blocks * p->block_size;
    if (!h->indexed || nv < p->min_n_kv || nv <= (int64_t)p->n_sinks + p->window) {
        // dense over the visible points
        for (int64_t i = 0; i < nv; i++) {
            const int32_t pt = th->vis[i];
            th->sc[i] = io->scale * ice_dot(q, h->k32 + (int64_t)pt * dk, dk) + ice_mask_value(io->mask.type, mrow, h->cells[pt]);
        }
        attend_points(h, th->vis, nv, th->sc, o);
        return ICE_STATUS_OK;
    }
    // union of sinks, window and top-k, de-duplicated with per-point stamps
    if (ICE_RESERVE(&th->uni, &th->uni_cap, n_union, 0) ||
        ICE_RESERVE(&th->stamp, &th->stamp_cap, h->n_pts, 2) ||
        ICE_RESERVE(&th->heap_s, &th->heap_s_cap, p->top_k, 0) ||
        ICE_RESERVE(&th->heap_i, &th->heap_i_cap, p->top_k, 0)) {
        return ICE_STATUS_NO_MEMORY;
    }
    // stamps: new capacity is zeroed; every stamp is < gen
    if (th->gen == UINT32_MAX) { memset(th->stamp, 0, th->stamp_cap); th->gen = 0; }
    const uint32_t gen = ++th->gen;
    int64_t nu = 0;
    for (int64_t i = 0; i < p->n_sinks && i < nv; i++) {
        const int32_t pt = th->vis[i];
        if (th->stamp[pt] != gen) { th->stamp[pt] = gen; th->uni[nu++] = pt; }
    }
    for (int64_t i = nv - p->window > 0 ? nv - p->window : 0; i < nv; i++) {
        const int32_t pt = th->vis[i];
        if (th->stamp[pt] != gen) { th->stamp[pt] = gen; th->uni[nu++] = pt; }
    }
    struct ice_topk heap = { th->heap_s, th->heap_i, p->top_k, 0 };
    if (p->top_k == 0) {
        // no k-NN search: the coarse block search below chooses the exact keys
    } else if (p->exact_search) {
        for (int64_t i = 0; i < nv; i++) {
            const int32_t pt = th->vis[i];
            ice_topk_push(&heap, ice_dot(q, h->k32 + (int64_t)pt * dk, dk), pt);
        }
    } else {
        struct vis_ctx vc = { mrow, io->mask.type, h->cells };
        const int32_t vb = p->visit_budget > 0 ? p->visit_budget : ice_dci_auto_visit(p->top_k, p->n_simple, h->n_pts);
        const int32_t rb = p->retrieve_budget > 0 ? p->retrieve_budget : ice_dci_auto_retrieve(p->top_k, h->n_pts);
        if (ice_dci_search(&h->dci, h->k32, dk, q, vb, rb, point_visible, &vc, &th->dci, &heap)) return ICE_STATUS_NO_MEMORY;
    }
    ice_topk_sort(&heap);   // a fixed order: the sum below does not depend on heap history
    for (int32_t i = 0; i < heap.n; i++) {
        const int32_t pt = (int32_t)heap.id[i];
        if (th->stamp[pt] != gen) { th->stamp[pt] = gen; th->uni[nu++] = pt; }
    }
    th->bqk_valid = 0;
    if (blocks) {
        const int64_t added = ice_block_select(h, th, p->block_size, p->top_blocks, q, gen, th->uni + nu);
        if (added < 0) return ICE_STATUS_NO_MEMORY;
        nu += added;
    }
    if (ICE_RESERVE(&th->qk, &th->qk_cap, nu + 1, 0)) return ICE_STATUS_NO_MEMORY;
    for (int64_t i = 0; i < nu; i++) {
        const int32_t pt = th->uni[i];
        th->qk[i] = ice_dot(q, h->k32 + (int64_t)pt * dk, dk);
        th->sc[i] = io->scale * th->qk[i] + ice_mask_value(io->mask.type, mrow, h->cells[pt]);
    }
    if (tail) {
        if (ice_tail_row(h, th, p->block_size, io->scale, q, th->uni, nu, th->sc, o)) return ICE_STATUS_NO_MEMORY;
        return ICE_STATUS_OK;
    }
    attend_points(h, th->uni, nu, th->sc, o);
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_forward(struct ice_attn_state * st, const struct ice_attn_io * io, int ith, int nth) {
    if (!st || nth < 1 || nth > ICE_MAX_THREADS || ith < 0 || ith >= nth) return ICE_STATUS_INVALID_ARG;
    struct ice_dims dm;
    enum ice_status rc = ice_attn_check_io(io, &dm, true);
    if (rc != ICE_STATUS_OK) return rc;
    if (dm.n_stream * dm.n_head_kv > ICE_MAX_HEADS) return ICE_STATUS_UNSUPPORTED;
    struct ice_thread * th = get_thread(st, ith);
    if (!th) return ICE_STATUS_NO_MEMORY;
    th->vis_mask = NULL;
    const int64_t n_st = dm.n_stream * dm.n_tok;
    if (n_st >= nth) {
        // (stream, token) units round-robin, all heads of a unit on one thread
        for (int64_t u = ith; u < n_st; u += nth) {
            for (int64_t hq = 0; hq < dm.n_head; hq++) {
                const enum ice_status r = forward_row(st, th, io, &dm, u / dm.n_tok, u % dm.n_tok, hq);
                if (r != ICE_STATUS_OK) rc = r;
            }
        }
    } else {
        const int64_t n_rows = n_st * dm.n_head;
        for (int64_t r = ith; r < n_rows; r += nth) {
            const int64_t u = r / dm.n_head;
            const enum ice_status e = forward_row(st, th, io, &dm, u / dm.n_tok, u % dm.n_tok, r % dm.n_head);
            if (e != ICE_STATUS_OK) rc = e;
        }
    }
    return rc;
}

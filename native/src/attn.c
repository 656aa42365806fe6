// attn.c - the attention op's forward (state and prepare: attn_state.c).
//
// forward: (stream, token, GQA group) units are split over threads; a group's query heads share their
// KV head's block scores and, when they attend the same cells, one pass over those cells (each V row
// read once for the group). Every row is computed the same way whatever thread runs it, so the output
// does not depend on nth. A row's attended cells are taken in two halves merged at the end, always; with
// fewer groups than twice the threads (decoding) a group's halves may run on two threads, so that three
// groups keep two threads equally busy.

#include "attn_internal.h"

// Counts `rows` query rows that attend `attended` cells of `visible`, all together.
static void count_cells(struct ice_thread * th, int64_t rows, int64_t attended, int64_t visible) {
    // shared by the threads: three adds per group row, beside the hundreds of keys the row attends
    __atomic_fetch_add(&th->cnt->n_rows, rows, __ATOMIC_RELAXED);
    __atomic_fetch_add(&th->cnt->n_attended, attended, __ATOMIC_RELAXED);
    __atomic_fetch_add(&th->cnt->n_visible, visible, __ATOMIC_RELAXED);
}

// Counts the current row's cells (th->cells, th->n_vis) for `heads` query heads.
static void count_row(struct ice_thread * th, int64_t heads) {
    count_cells(th, heads, heads * th->n_cells, heads * th->n_vis);
}

static struct ice_head * head_of(const struct ice_attn_state * st, const struct ice_dims * dm, int64_t s, int64_t hk) {
    return ice_state_head(st, (dm->stream0 + s) * dm->n_head_kv + hk);
}

// ---- forward -------------------------------------------------------------------

struct vis_ctx { const void * mrow; enum ice_type type; };

static int cell_visible(const void * ctx, int64_t c) {
    const struct vis_ctx * v = ctx;
    return ice_mask_visible(v->type, v->mrow, c);
}

// Visible cells of row (s, t); cached across the heads of a stream.
static int row_visible(struct ice_thread * th, const struct ice_attn_io * io, int64_t n_kv,
        int64_t s, int64_t t, int64_t B, const int32_t * bcount, int want_blocks) {
    if (th->vis_mask == io->mask.data && th->vis_s == s && th->vis_t == t && th->vis_nkv == n_kv &&
        th->vis_blocks >= want_blocks && (!want_blocks || th->vis_B == B)) {
        return 0;
    }
    th->vis_mask = NULL;
    if (ICE_RESERVE(&th->vis, &th->vis_cap, n_kv + 16, 0)) return -1;   // + the vector scan's overshoot
    const void * mrow = ice_mask_row(io, t, s);
    // block by block, so the per-block counts need no division per cell
    const int64_t nb = (n_kv + B - 1) / B;
    if (want_blocks && ICE_RESERVE(&th->vis_bcnt, &th->vis_bcnt_cap, nb + 1, 0)) return -1;
    int64_t nv = 0;
    int32_t * vis = th->vis;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j1 = (b + 1) * B < n_kv ? (b + 1) * B : n_kv, nv0 = nv;
        if (io->mask.type == ICE_TYPE_F16) {
            nv += ice_visible_f16(mrow, b * B, j1, vis + nv);
        } else {
            for (int64_t j = b * B; j < j1; j++) if (ice_mask_visible(io->mask.type, mrow, j)) vis[nv++] = (int32_t)j;
        }
        if (want_blocks) th->vis_bcnt[b] = (int32_t)(nv - nv0);
    }
    th->n_vis = nv;
    if (want_blocks) {
        // blocks cut by the mask, listed so the tail visits only their cells (a causal row has one)
        if (ICE_RESERVE(&th->partial, &th->partial_cap, nb + 1, 0)) return -1;
        th->n_partial = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (th->vis_bcnt[b] > 0 && th->vis_bcnt[b] != bcount[b]) th->partial[th->n_partial++] = (int32_t)b;
        }
        th->vis_B = B;
    }
    // whether the row's mask is only 0 (visible) and -inf (not): then the scores need no mask term
    uint32_t bumps = 0;
    if (io->mask.type == ICE_TYPE_F16) {
        const uint16_t * m = mrow;
        for (int64_t j = 0; j < n_kv; j++) bumps |= (uint32_t)(m[j] != 0 && m[j] != 0xfc00u);
    } else {
        const float * m = mrow;
        for (int64_t j = 0; j < n_kv; j++) bumps |= (uint32_t)(m[j] != 0.0f && m[j] != -INFINITY);
    }
    th->vis_flat = bumps == 0;
    th->vis_mrow = mrow;
    th->vis_mtype = io->mask.type;
    th->vis_mask = io->mask.data; th->vis_s = s; th->vis_t = t; th->vis_nkv = n_kv; th->vis_blocks = want_blocks;
    return 0;
}

void ice_kv_axpys_transposed(const struct ice_kv * kv, float * o, const float * w, const int32_t * cells, int64_t n) {
    const size_t es = ice_type_size(kv->vt);
    if (kv->v_nb1 != es) {   // neither layout is contiguous: element by element
        for (int64_t i = 0; i < n; i++) ice_kv_axpy(kv, o, w[i], cells[i]);
        return;
    }
    for (int64_t i0 = 0; i0 < n;) {
        int64_t i1 = i0 + 1;
        while (i1 < n && cells[i1] == cells[i1 - 1] + 1) i1++;
        const char * base = kv->v + (size_t)cells[i0] * es;
        for (int64_t d = 0; d < kv->d_v; d++) {
            const char * row = base + (size_t)d * kv->v_nb0;
            o[d] += kv->vt == ICE_TYPE_F16 ? ice_dot_f16(w + i0, (const uint16_t *)(const void *)row, i1 - i0)
                                           : ice_dot(w + i0, (const float *)(const void *)row, i1 - i0);
        }
        i0 = i1;
    }
}

enum { ICE_HALF_0 = 1, ICE_HALF_1 = 2, ICE_HALVES = 3 };

// Room in hf for na heads' halves (d_v floats of output each).
static enum ice_status half_reserve(struct ice_half * hf, int64_t na, int64_t dv) {
    if (ICE_RESERVE(&hf->buf, &hf->buf_cap, na * (dv + 2), 0)) return hf->status = ICE_STATUS_NO_MEMORY;
    hf->na = na;
    hf->m = hf->buf; hf->s = hf->buf + na; hf->o = hf->buf + 2 * na;
    memset(hf->o, 0, (size_t)(na * dv) * sizeof(float));
    return hf->status = ICE_STATUS_OK;
}

// sc[i] = scale * sc[i] + the mask's value at cells[i], i < n; mrow NULL: a row whose mask is 0 wherever
// it is visible (th->vis_flat), so scaling alone (the cells attended are visible)
static void scale_scores(const struct ice_attn_io * io, const void * mrow, const int32_t * cells, int64_t n, float * sc) {
    const float scale = io->scale;
    if (!mrow) {
        for (int64_t i = 0; i < n; i++) sc[i] *= scale;
        return;
    }
    for (int64_t i = 0; i < n; i++) sc[i] = scale * sc[i] + ice_mask_value(io->mask.type, mrow, cells[i]);
}

// The softmax statistics of one head's slice: its scores (scale_scores), their max *mx and sum of
// exp(score - max) *sum.
static void slice_softmax(const struct ice_attn_io * io, const void * mrow, const int32_t * cells, int64_t n,
        float * sc, float * mx, float * sum) {
    if (mrow) {
        scale_scores(io, mrow, cells, n, sc);
        *mx = ice_max(sc, n);
    } else {
        *mx = ice_scale_max(sc, n, io->scale);   // a flat mask adds nothing: scaled in the max's pass
    }
    *sum = ice_exp_sum(sc, n, *mx);
}

// out[j*ostride + i] = q_j . key of cells[i], i < n, for the na query rows q (na*d_k floats). With the
// tiled keys kt (attn_state.c's tile_keys), the list's whole tiles (ICE_TILE consecutive cells from a multiple of it: a
// chosen block's visible cells) are read from them, the other cells row by row.
static void kv_dots(const struct ice_kv * kv, const uint16_t * kt, struct ice_thread * th, const float * q, int64_t na,
        const int32_t * cells, int64_t n, float * out, int64_t ostride) {
    const int64_t dk = kv->d_k, cap = n / ICE_TILE + 1;
    if (!kt || n < ICE_TILE || ICE_RESERVE(&th->tl, &th->tl_cap, 2 * cap, 0)) {
        for (int64_t j = 0; j < na; j++) ice_kv_dots(kv, q + j * dk, cells, n, out + j * ostride);
        return;
    }
    int32_t * tile = th->tl, * pos = th->tl + cap;
    int64_t nt = 0, rs = 0;   // rs: where the cells not yet computed start
    for (int64_t i = 0; i + ICE_TILE <= n;) {
        const int32_t c = cells[i];
        int whole = (c & (ICE_TILE - 1)) == 0 && cells[i + ICE_TILE - 1] == c + ICE_TILE - 1;
        for (int r = 1; whole && r < ICE_TILE - 1; r++) whole = cells[i + r] == c + r;
        if (!whole) { i++; continue; }
        for (int64_t j = 0; j < na && rs < i; j++) ice_kv_dots(kv, q + j * dk, cells + rs, i - rs, out + j * ostride + rs);
        tile[nt] = c / ICE_TILE; pos[nt++] = (int32_t)i;
        i += ICE_TILE; rs = i;
    }
    for (int64_t j = 0; j < na && rs < n; j++) ice_kv_dots(kv, q + j * dk, cells + rs, n - rs, out + j * ostride + rs);
    if (nt) ice_dots_tile_list(q, na, kt, tile, pos, nt, dk, out, ostride);
}

// Half `which` of the softmax over cells[0..n) (the first n/2, or the rest) for the na query rows q
// (na*d_k floats) that attend the same cells, into heads j0..j0+na-1 of hf: dot products, scores (scale *
// q.k + mask) in sc (na*n floats, head j's at j*n), each head's max and exp-sum, and its unnormalised
// output. Each V row is read once for the na heads. kt: the tiled keys or NULL (kv_dots).
static void attend_half(const struct ice_kv * kv, const uint16_t * kt, struct ice_thread * th, const struct ice_attn_io * io,
        const void * mrow, const float * q, int64_t na, const int32_t * cells, int64_t n, int which, float * sc,
        struct ice_half * hf, int64_t j0) {
    const int64_t lo = which ? n / 2 : 0, hi = which ? n : n / 2, m = hi - lo, dv = kv->d_v;
    for (int64_t j = j0; j < j0 + na; j++) { hf->m[j] = -INFINITY; hf->s[j] = 0.0f; }
    if (m == 0) return;
    const int32_t * cl = cells + lo;
    // row by row, dot products go one head at a time: their horizontal sums, not the loads, bound them, so
    // sharing the row loads between heads measured slower (2.86 against 2.64 ns per row and head, Zen 4);
    // tiles need no horizontal sums and do share them; the value sums share them too (1.31 against 2.33 ns)
    kv_dots(kv, kt, th, q, na, cl, m, sc, m);
    for (int64_t j = 0; j < na; j++) slice_softmax(io, mrow, cl, m, sc + j * m, &hf->m[j0 + j], &hf->s[j0 + j]);
    float * o = hf->o + j0 * dv;
    if (na == 1) ice_kv_axpys(kv, o, sc, cl, m);
    else if (kv->v_nb0 == ice_type_size(kv->vt)) ice_axpys_rows_multi(o, na, sc, kv->v, kv->v_nb1, kv->vt, cl, m, dv);
    else for (int64_t j = 0; j < na; j++) ice_kv_axpys_transposed(kv, o + j * dv, sc + j * m, cl, m);
}

// Cells per chunk of attend_half_heads, as a shift: about 32 KiB of K rows (256 cells of 64 f16 elements).
static int chunk_shift(const struct ice_kv * kv) {
    int sh = 5;
    while (sh < 20 && ((size_t)2 << sh) * kv->k_nb1 <= 32768) sh++;
    return sh;
}

// Half `which` of each of na heads' own cell lists (head j: cells[off[j] .. off[j+1]), in ascending order
// of chunk, cell >> shift, its chunk c starting at off[j] + bnd[j*(nch+1) + c]; its query row at q + j*d_k)
// into heads 0..na-1 of hf, as attend_half would for each head alone, but with the heads taking turns
// chunk by chunk: a chunk's K rows (then V rows) are read from memory once and from cache by the other
// heads that chose them, where head after head over whole lists read them again (measured with blocks
// chosen per head on Qwen2.5-Coder at 8k: the dot products cost as much for 40% of the keys per head as
// the shared pass for 62%). sc: off[na] floats, indexed like cells.
static void attend_half_heads(const struct ice_kv * kv, const uint16_t * kt, struct ice_thread * th,
        const struct ice_attn_io * io, const void * mrow, const float * q, int64_t na, const int32_t * cells,
        const int64_t * off, const int64_t * bnd, int64_t nch, int which, float * sc, struct ice_half * hf) {
    const int64_t dk = kv->d_k, dv = kv->d_v;
    for (int64_t j = 0; j < na; j++) { hf->m[j] = -INFINITY; hf->s[j] = 0.0f; }
    for (int pass = 0; pass < 2; pass++) {   // 0: dot products; 1: value sums (after each head's softmax)
        for (int64_t ch = 0; ch < nch; ch++) {
            for (int64_t j = 0; j < na; j++) {
                const int64_t n = off[j + 1] - off[j], lo = which ? n / 2 : 0, hi = which ? n : n / 2;
                const int64_t * bj = bnd + j * (nch + 1);
                const int64_t p = off[j] + (bj[ch] > lo ? bj[ch] : lo), e = off[j] + (bj[ch + 1] < hi ? bj[ch + 1] : hi);
                if (e <= p) continue;
                if (pass == 0) kv_dots(kv, kt, th, q + j * dk, 1, cells + p, e - p, sc + p, 0);
                else ice_kv_axpys(kv, hf->o + j * dv, sc + p, cells + p, e - p);
            }
        }
        if (pass == 1) break;
        for (int64_t j = 0; j < na; j++) {
            const int64_t n = off[j + 1] - off[j], lo = off[j] + (which ? n / 2 : 0), m = which ? n - n / 2 : n / 2;
            if (m > 0) slice_softmax(io, mrow, cells + lo, m, sc + lo, &hf->m[j], &hf->s[j]);
        }
    }
}

// The row's cells (th->cells) into out in ascending order of chunk (cell >> shift), and where each of the
// nch chunks starts in it (bnd[0..nch], bnd[nch] = n). Without k-NN search the union is already ascending
// once its window moves behind the chosen blocks (row_cells: sinks, window, blocks); otherwise, or when
// that does not hold, a stable counting sort by chunk.
static void order_by_chunk(const struct ice_thread * th, int shift, int64_t nch, int64_t * bnd, int32_t * out) {
    const int32_t * cells = th->cells;
    const int64_t n = th->n_cells;
    if (cells == th->uni) {
        const int64_t ns = th->n_sink_cells, nf = th->n_front_cells;
        memcpy(out, cells, (size_t)ns * sizeof *out);
        memcpy(out + ns, cells + nf, (size_t)(n - nf) * sizeof *out);
        memcpy(out + ns + (n - nf), cells + ns, (size_t)(nf - ns) * sizeof *out);
    } else {
        memcpy(out, cells, (size_t)n * sizeof *out);
    }
    // whether it is ascending: one branch-free compare per cell (a per-cell chunk walk here took two thirds
    // of forward_group's time in a per-head prefill profile); then each chunk's start by binary search within
    // the previous start + 2^shift (ascending cells: at most 2^shift per chunk). A masked, branch-free step
    // measured slower than this one, which the compiler keeps as a branch.
    int32_t bad = 0;
    for (int64_t i = 1; i < n; i++) bad |= out[i - 1] >= out[i];
    if (!bad) {
        int64_t lo = 0;
        for (int64_t c = 0; c < nch; c++) {
            const int32_t first = (int32_t)(c << shift);   // the chunk's first cell
            const int64_t span = n - lo < ((int64_t)1 << shift) ? n - lo : (int64_t)1 << shift;
            const int32_t * b = out + lo;
            for (int64_t len = span + 1; len > 1; ) {   // invariant: the start is in [b, b + len - 1]
                const int64_t half = len / 2;
                b = b[half - 1] < first ? b + half : b;
                len -= half;
            }
            bnd[c] = lo = b - out;
        }
        bnd[nch] = n;
        return;
    }
    memset(bnd, 0, (size_t)(nch + 1) * sizeof *bnd);
    for (int64_t i = 0; i < n; i++) bnd[(cells[i] >> shift) + 1]++;
    for (int64_t c = 1; c <= nch; c++) bnd[c] += bnd[c - 1];
    for (int64_t i = 0; i < n; i++) out[bnd[cells[i] >> shift]++] = cells[i];   // bnd[c]: chunk c's end
    for (int64_t c = nch; c > 0; c--) bnd[c] = bnd[c - 1];
    bnd[0] = 0;
}

// Output rows g0..g0+na-1 of (s, t), softmax-weighted, from the two halves of each (zero where neither
// attends anything; all zero when either half failed).
static enum ice_status merge_halves(const struct ice_half * a, const struct ice_half * b, const struct ice_attn_io * io,
        int64_t s, int64_t t, int64_t g0, int64_t na, int64_t dv) {
    const enum ice_status rc = a->status != ICE_STATUS_OK ? a->status : b->status;
    for (int64_t j = 0; j < na; j++) {
        float * o = ice_out_row(io, s, t, g0 + j);
        if (rc != ICE_STATUS_OK) { memset(o, 0, (size_t)dv * sizeof(float)); continue; }
        const float m = a->m[j] > b->m[j] ? a->m[j] : b->m[j];
        const float ea = a->s[j] > 0.0f ? expf(a->m[j] - m) : 0.0f, eb = b->s[j] > 0.0f ? expf(b->m[j] - m) : 0.0f;
        const float sum = a->s[j] * ea + b->s[j] * eb;
        if (!(sum > 0.0f)) { memset(o, 0, (size_t)dv * sizeof(float)); continue; }
        const float wa = ea / sum, wb = eb / sum;
        const float * ao = a->o + j * dv, * bo = b->o + j * dv;
        for (int64_t d = 0; d < dv; d++) o[d] = ao[d] * wa + bo[d] * wb;
    }
    return rc;
}

// Joins a group split between two threads: the first to arrive leaves its half in the slot, the second
// merges both (halves in their fixed order, so the result is the same whichever thread merges).
static enum ice_status join_halves(struct ice_attn_state * st, int64_t slot, struct ice_half * mine, int which,
        const struct ice_attn_io * io, int64_t s, int64_t t, int64_t g0, int64_t na, int64_t dv) {
    struct ice_half * other = __atomic_exchange_n(&st->scratch->join[slot], mine, __ATOMIC_ACQ_REL);
    if (!other) return mine->status;   // the other thread merges
    __atomic_store_n(&st->scratch->join[slot], (struct ice_half *)NULL, __ATOMIC_RELAXED);
    return which ? merge_halves(other, mine, io, s, t, g0, na, dv) : merge_halves(mine, other, io, s, t, g0, na, dv);
}

// The block scores of row (s, t, hq): computed, when this thread has not yet scored it in this forward
// call, for hq and the heads after it up to hq_last (the same GQA group's heads this thread answers
// next for the same token), so the group reads its KV head's ranking rows once. NULL when out of memory.
static const float * row_block_scores(struct ice_thread * th, const struct ice_head * h, const struct ice_attn_io * io,
        const struct ice_dims * dm, int64_t s, int64_t t, int64_t hq, int64_t hq_last, const float ** bsp) {
    const int64_t hk = hq / dm->gqa, nb = h->n_blocks;
    if (!(th->run_gen == th->fwd_gen && th->run_s == s && th->run_t == t && th->run_hk == hk &&
          hq >= th->run_h0 && hq <= th->run_h1)) {
        const int64_t na = hq_last - hq + 1, dk = dm->d_k;
        if (ICE_RESERVE(&th->gq, &th->gq_cap, na * dk, 0)) return NULL;
        for (int64_t j = 0; j < na; j++) ice_view_load_row(&io->q, t, hq + j, s, th->gq + j * dk);
        if (ice_block_scores(h, th, th->gq, na)) return NULL;
        th->run_gen = th->fwd_gen; th->run_s = s; th->run_t = t; th->run_hk = hk; th->run_h0 = hq; th->run_h1 = hq_last;
    }
    const int64_t j = hq - th->run_h0;
    *bsp = th->bsp + j * nb;
    return th->bqk + j * nb;
}

// The cells row (s, t, hq) attends: th->cells[0..th->n_cells), its visible cells (dense rows) or the
// union of sinks, window, k-NN top-k and chosen blocks (th->uni); the query row in th->q, and th->sc
// room for one score per cell.
static enum ice_status row_cells(struct ice_attn_state * st, struct ice_thread * th, const struct ice_attn_io * io,
        const struct ice_dims * dm, const struct ice_head * h, const struct ice_kv * kv, int64_t s, int64_t t,
        int64_t hq, int64_t hq_last, int tail) {
    const struct ice_attn_params * p = &st->p;
    const int blocks = p->top_blocks > 0 && h->indexed;
    const int64_t B = h->indexed ? h->B : p->block_size;
    if (row_visible(th, io, dm->n_kv, s, t, B, h->bcount, tail || blocks)) return ICE_STATUS_NO_MEMORY;
    const int64_t nv = th->n_vis, dk = dm->d_k;
    const void * mrow = ice_mask_row(io, t, s);
    if (ICE_RESERVE(&th->q, &th->q_cap, dk, 0) || ICE_RESERVE(&th->sc, &th->sc_cap, dm->n_kv + 1, 0)) return ICE_STATUS_NO_MEMORY;
    float * q = th->q;
    ice_view_load_row(&io->q, t, hq, s, q);
    if (!h->indexed || nv < p->min_n_kv || nv <= (int64_t)p->n_sinks + p->window) {
        th->cells = th->vis; th->n_cells = nv;   // dense over the visible cells
        return ICE_STATUS_OK;
    }
    // union of sinks, window and top-k, de-duplicated with per-cell stamps
    // with block_share a row may attend more than top_blocks blocks: room for every block then
    const int64_t n_blk = p->block_share > 0.0f && h->n_blocks > p->top_blocks ? h->n_blocks : p->top_blocks;
    const int64_t n_union = (int64_t)p->top_k + p->n_sinks + p->window + n_blk * B;
    if (ICE_RESERVE(&th->uni, &th->uni_cap, n_union, 0) ||
        ICE_RESERVE(&th->stamp, &th->stamp_cap, dm->n_kv, 2) ||
        ICE_RESERVE(&th->heap_s, &th->heap_s_cap, p->top_k, 0) ||
        ICE_RESERVE(&th->heap_i, &th->heap_i_cap, p->top_k, 0)) {
        return ICE_STATUS_NO_MEMORY;
    }
    // stamps: new capacity is zeroed; every stamp is < gen
    if (th->gen == UINT32_MAX) { memset(th->stamp, 0, th->stamp_cap); th->gen = 0; }
    const uint32_t gen = ++th->gen;
    int64_t nu = 0;
    for (int64_t i = 0; i < p->n_sinks && i < nv; i++) {
        const int32_t c = th->vis[i];
        if (th->stamp[c] != gen) { th->stamp[c] = gen; th->uni[nu++] = c; }
    }
    th->n_sink_cells = nu;
    for (int64_t i = nv - p->window > 0 ? nv - p->window : 0; i < nv; i++) {
        const int32_t c = th->vis[i];
        if (th->stamp[c] != gen) { th->stamp[c] = gen; th->uni[nu++] = c; }
    }
    struct ice_topk heap = { th->heap_s, th->heap_i, p->top_k, 0 };
    if (p->top_k == 0) {
        // no k-NN search: the coarse block search below chooses the exact keys
    } else if (p->exact_search) {
        ice_kv_dots(kv, q, th->vis, nv, th->sc);
        for (int64_t i = 0; i < nv; i++) ice_topk_push(&heap, th->sc[i], th->vis[i]);
    } else {
        struct vis_ctx vc = { mrow, io->mask.type };
        const struct ice_rows rows = { kv->k, kv->kt, kv->k_nb1 };
        const int32_t vb = p->visit_budget > 0 ? p->visit_budget : ice_dci_auto_visit(p->top_k, p->n_simple, h->dci.n);
        const int32_t rb = p->retrieve_budget > 0 ? p->retrieve_budget : ice_dci_auto_retrieve(p->top_k, h->dci.n);
        if (ice_dci_search(&h->dci, &rows, q, vb, rb, cell_visible, &vc, &th->dci, &heap)) return ICE_STATUS_NO_MEMORY;
    }
    ice_topk_sort(&heap);   // a fixed order: the sum below does not depend on heap history
    for (int32_t i = 0; i < heap.n; i++) {
        const int32_t c = (int32_t)heap.id[i];
        if (th->stamp[c] != gen) { th->stamp[c] = gen; th->uni[nu++] = c; }
    }
    th->n_front_cells = nu;   // sinks, window and top-k: the chosen blocks' cells follow, ascending
    if (blocks) {
        const float * bsp = NULL;
        // shared blocks: scored for the whole GQA group (whichever of its heads this thread answers), so
        // every head of the group picks the same blocks
        const int64_t g0 = hq - hq % dm->gqa;
        const float * bqk = p->group_blocks ? row_block_scores(th, h, io, dm, s, t, g0, g0 + dm->gqa - 1, &bsp)
                                            : row_block_scores(th, h, io, dm, s, t, hq, hq_last, &bsp);
        if (!bqk) return ICE_STATUS_NO_MEMORY;
        const int64_t added = p->group_blocks
            ? ice_block_select(h, kv, th, p->top_blocks, p->min_blocks, p->top_p, p->block_share, io->scale, dm->gqa,
                               th->gq, bqk, bsp, th->uni, nu, gen, th->uni + nu)
            : ice_block_select(h, kv, th, p->top_blocks, p->min_blocks, p->top_p, p->block_share, io->scale, 1, q,
                               bqk, bsp, th->uni, nu, gen, th->uni + nu);
        if (added < 0) return ICE_STATUS_NO_MEMORY;
        nu += added;
    }
    if (tail && ICE_RESERVE(&th->qk, &th->qk_cap, nu + 1, 0)) return ICE_STATUS_NO_MEMORY;
    th->cells = th->uni; th->n_cells = nu;
    return ICE_STATUS_OK;
}

// The result of a group that failed: zeros written, or, for one half of a split group, a failed half.
static enum ice_status group_failed(struct ice_thread * th, const struct ice_attn_io * io, const struct ice_dims * dm,
        int64_t s, int64_t t, int64_t g0, int parts, enum ice_status rc, struct ice_half ** pending) {
    if (parts == ICE_HALVES) {
        for (int64_t j = 0; j < dm->gqa; j++) memset(ice_out_row(io, s, t, g0 + j), 0, (size_t)dm->d_v * sizeof(float));
        return rc;
    }
    struct ice_half * hf = &th->half[parts == ICE_HALF_0 ? 0 : 1];
    hf->status = rc;
    *pending = hf;
    return rc;
}

// Whether every head of a GQA group attends the same cells, so the group is answered in one pass:
// without per-head k-NN search and without the tail estimate, when its blocks are shared or off.
static bool group_joint(const struct ice_attn_params * p, const struct ice_head * h) {
    if (!h->indexed) return true;
    return !p->tail_estimate && p->top_k == 0 && (p->top_blocks == 0 || p->group_blocks);
}

// The query heads g0 .. g0+gqa-1 of (s, t), which share KV head hk: `parts` says which halves of their
// cells this call computes. With ICE_HALVES the outputs are written; with one half, the heads' halves
// are left in th->half[0 or 1] and *pending points at them for join_halves (NULL when there is nothing to
// join: tail-estimate rows are computed whole by the owner of the first half).
static enum ice_status forward_group(struct ice_attn_state * st, struct ice_thread * th, const struct ice_attn_io * io,
        const struct ice_dims * dm, int64_t s, int64_t t, int64_t hk, int parts, struct ice_half ** pending) {
    const struct ice_attn_params * p = &st->p;
    const int64_t na = dm->gqa, g0 = hk * na, dv = dm->d_v, dk = dm->d_k;
    const struct ice_head * h = head_of(st, dm, s, hk);
    *pending = NULL;
    struct ice_kv kv;
    ice_kv_of(&kv, io, hk, s);
    if (!h || h->kbase != kv.k || h->vbase != kv.v || h->mdata != io->mask.data ||
        h->n_kv != dm->n_kv || h->d_k != dm->d_k || h->d_v != dm->d_v) {
        return group_failed(th, io, dm, s, t, g0, parts, ICE_STATUS_INVALID_ARG, pending);   // prepare was not run for this io
    }
    if (h->status != ICE_STATUS_OK) return group_failed(th, io, dm, s, t, g0, parts, h->status, pending);
    const int tail = p->tail_estimate && h->indexed;
    const void * mrow = ice_mask_row(io, t, s);
    if (tail) {
        if (!(parts & ICE_HALF_0)) return ICE_STATUS_OK;   // the first half's owner computes it whole
        enum ice_status rc = ICE_STATUS_OK;
        for (int64_t hq = g0; hq < g0 + na; hq++) {
            float * o = ice_out_row(io, s, t, hq);
            enum ice_status r = row_cells(st, th, io, dm, h, &kv, s, t, hq, g0 + na - 1, 1);
            if (r == ICE_STATUS_OK) count_row(th, 1);
            if (r == ICE_STATUS_OK && th->cells == th->uni) {
                // the union's scores and q.k (kept in th->qk for the estimate), then the estimate
                ice_kv_dots(&kv, th->q, th->uni, th->n_cells, th->qk);
                for (int64_t i = 0; i < th->n_cells; i++) th->sc[i] = io->scale * th->qk[i] + ice_mask_value(io->mask.type, mrow, th->uni[i]);
                if (ice_tail_row(h, &kv, th, io->scale, th->q, th->uni, th->n_cells, th->sc, o)) r = ICE_STATUS_NO_MEMORY;
            } else if (r == ICE_STATUS_OK) {   // a dense row
                if (half_reserve(&th->half[2], 1, dv) || half_reserve(&th->half[3], 1, dv)) r = ICE_STATUS_NO_MEMORY;
                else {
                    attend_half(&kv, NULL, th, io, mrow, th->q, 1, th->cells, th->n_cells, 0, th->sc, &th->half[2], 0);
                    attend_half(&kv, NULL, th, io, mrow, th->q, 1, th->cells, th->n_cells, 1, th->sc, &th->half[3], 0);
                    r = merge_halves(&th->half[2], &th->half[3], io, s, t, hq, 1, dv);
                }
            }
            if (r != ICE_STATUS_OK) { memset(o, 0, (size_t)dv * sizeof(float)); rc = r; }
        }
        return rc;
    }
    struct ice_half * hv[2] = { &th->half[parts == ICE_HALVES ? 2 : 0], &th->half[parts == ICE_HALVES ? 3 : 1] };
    // prepare's tiled keys, unless the thread holding them has since prepared again (another layer)
    const uint16_t * kt = h->kt && h->kt_th->ktiles_gen == h->kt_gen ? h->kt : NULL;
    for (int which = 0; which < 2; which++) {
        if ((parts & (1 << which)) && half_reserve(hv[which], na, dv)) return group_failed(th, io, dm, s, t, g0, parts, ICE_STATUS_NO_MEMORY, pending);
    }
    if (group_joint(p, h)) {
        // one cell list and one pass over its K and V rows for the whole group
        enum ice_status r = row_cells(st, th, io, dm, h, &kv, s, t, g0, g0 + na - 1, 0);
        if (r == ICE_STATUS_OK && (ICE_RESERVE(&th->gqa_q, &th->gqa_q_cap, na * dk, 0) ||
                                   ICE_RESERVE(&th->gsc, &th->gsc_cap, na * (th->n_cells / 2 + 1), 0))) r = ICE_STATUS_NO_MEMORY;
        if (r != ICE_STATUS_OK) return group_failed(th, io, dm, s, t, g0, parts, r, pending);
        if (parts & ICE_HALF_0) count_row(th, na);   // a split group is counted by its first half's thread
        for (int64_t j = 0; j < na; j++) ice_view_load_row(&io->q, t, g0 + j, s, th->gqa_q + j * dk);
        for (int which = 0; which < 2; which++) {
            if (parts & (1 << which)) attend_half(&kv, kt, th, io, th->vis_flat ? NULL : mrow, th->gqa_q, na, th->cells, th->n_cells, which, th->gsc, hv[which], 0);
        }
    } else {
        // each head's own cells, ordered by chunk, then one pass per half over all of them (attend_half_heads)
        const int shift = chunk_shift(&kv);
        const int64_t nch = ((dm->n_kv - 1) >> shift) + 1;
        if (ICE_RESERVE(&th->hoff, &th->hoff_cap, na + 1 + na * (nch + 1), 0)) {
            return group_failed(th, io, dm, s, t, g0, parts, ICE_STATUS_NO_MEMORY, pending);
        }
        if (ICE_RESERVE(&th->gqa_q, &th->gqa_q_cap, na * dk, 0)) return group_failed(th, io, dm, s, t, g0, parts, ICE_STATUS_NO_MEMORY, pending);
        int64_t * off = th->hoff, * bnd = th->hoff + na + 1, n_cells = 0, n_vis = 0;
        off[0] = 0;
        for (int64_t j = 0; j < na; j++) {
            enum ice_status r = row_cells(st, th, io, dm, h, &kv, s, t, g0 + j, g0 + na - 1, 0);
            if (r == ICE_STATUS_OK && ICE_RESERVE(&th->hcells, &th->hcells_cap, off[j] + th->n_cells, 1)) r = ICE_STATUS_NO_MEMORY;
            if (r != ICE_STATUS_OK) return group_failed(th, io, dm, s, t, g0, parts, r, pending);
            n_cells += th->n_cells; n_vis += th->n_vis;
            memcpy(th->gqa_q + j * dk, th->q, (size_t)dk * sizeof(float));   // row_cells loaded head j's query
            order_by_chunk(th, shift, nch, bnd + j * (nch + 1), th->hcells + off[j]);
            off[j + 1] = off[j] + th->n_cells;
        }
        if (parts & ICE_HALF_0) count_cells(th, na, n_cells, n_vis);   // once per group: the counts are shared
        if (ICE_RESERVE(&th->gsc, &th->gsc_cap, off[na] + 1, 0)) return group_failed(th, io, dm, s, t, g0, parts, ICE_STATUS_NO_MEMORY, pending);
        for (int which = 0; which < 2; which++) {
            if (parts & (1 << which)) attend_half_heads(&kv, kt, th, io, th->vis_flat ? NULL : mrow, th->gqa_q, na, th->hcells, off, bnd, nch, which, th->gsc, hv[which]);
        }
    }
    if (parts == ICE_HALVES) return merge_halves(hv[0], hv[1], io, s, t, g0, na, dv);
    *pending = hv[parts == ICE_HALF_0 ? 0 : 1];
    return ICE_STATUS_OK;
}

// The join slot of group r split between two threads: the index of the thread that owns its second half
// (unit 2r+1) when U = 2*n_groups units are split in contiguous ranges (thread j: [j*U/nth, (j+1)*U/nth)).
static int64_t split_slot(int64_t r, int64_t n_units, int nth) {
    return ((2 * r + 2) * nth - 1) / n_units;
}

enum ice_status ice_attn_forward(struct ice_attn_state * st, const struct ice_attn_io * io, int ith, int nth) {
    if (!st || nth < 1 || nth > ICE_MAX_THREADS || ith < 0 || ith >= nth) return ICE_STATUS_INVALID_ARG;
    struct ice_dims dm;
    enum ice_status rc = ice_attn_check_io(io, &dm, true);
    if (rc != ICE_STATUS_OK) return rc;
    if ((dm.stream0 + dm.n_stream) * dm.n_head_kv > ICE_MAX_HEADS) return ICE_STATUS_UNSUPPORTED;
    const int64_t n_st = dm.n_stream * dm.n_tok;
    // the work is split by GQA group (the query heads of one KV head, answered together) and token
    const int64_t n_groups = n_st * dm.n_head_kv, U = 2 * n_groups;
    struct ice_thread * th = ice_attn_thread(st, ith);
    if (!th) {
        if (n_st < nth) {
            // a group split with a neighbour still needs this thread's half: a failed one
            static struct ice_half failed = { .status = ICE_STATUS_NO_MEMORY };
            const int64_t u0 = ith * U / nth, u1 = (ith + 1) * U / nth;
            for (int which = 1; which >= 0 && u0 < u1; which--) {
                const int64_t end = which ? u0 : u1, r = end / 2, u = r / dm.n_head_kv;   // a split group: an odd end
                if (end & 1) join_halves(st, split_slot(r, U, nth), &failed, which, io, u / dm.n_tok, u % dm.n_tok,
                                         (r % dm.n_head_kv) * dm.gqa, dm.gqa, dm.d_v);
            }
        }
        return ICE_STATUS_NO_MEMORY;
    }
    th->vis_mask = NULL;   // the scratch may have served another layer's state since: nothing carries over
    th->fwd_gen++;
    th->cnt = &st->cnt;
    struct ice_half * pending;
    if (n_st >= nth) {
        // (stream, token) units round-robin, all heads of a unit on one thread
        for (int64_t u = ith; u < n_st; u += nth) {
            for (int64_t hk = 0; hk < dm.n_head_kv; hk++) {
                const enum ice_status r = forward_group(st, th, io, &dm, u / dm.n_tok, u % dm.n_tok, hk, ICE_HALVES, &pending);
                if (r != ICE_STATUS_OK) rc = r;
            }
        }
        return rc;
    }
    // each group two units (its halves), contiguous ranges of units: a thread shares at most the group at
    // each end of its range with a neighbour
    const int64_t u0 = ith * U / nth, u1 = (ith + 1) * U / nth;
    if (u0 == u1) return rc;
    for (int64_t r = u0 / 2; r <= (u1 - 1) / 2; r++) {
        const int parts = (2 * r >= u0 ? ICE_HALF_0 : 0) | (2 * r + 1 < u1 ? ICE_HALF_1 : 0);
        const int64_t u = r / dm.n_head_kv, hk = r % dm.n_head_kv, s = u / dm.n_tok, t = u % dm.n_tok;
        enum ice_status e = forward_group(st, th, io, &dm, s, t, hk, parts, &pending);
        if (pending) e = join_halves(st, split_slot(r, U, nth), pending, parts == ICE_HALF_1, io, s, t, hk * dm.gqa, dm.gqa, dm.d_v);
        if (e != ICE_STATUS_OK) rc = e;
    }
    return rc;
}

// index.c - the index API: a key store (keys, ids, id -> slot map) shared by both
// kinds, brute-force search for ICE_INDEX_EXACT and the DCI core for ICE_INDEX_DCI.
//
// Removal swaps the last key into the removed slot, so slots stay dense.
// ICE_INDEX_DCI rebuilds its sorted projections on every add (O(n log n)): add in batches.

#include "ice_internal.h"

struct ice_index {
    struct ice_index_params p;
    int64_t   n;
    float   * keys;  size_t keys_cap;   // n*dim
    int64_t * ids;   size_t ids_cap;    // n
    // id -> slot, open addressing with linear probing; empty = -1
    int64_t * hkey;  int64_t * hval;  size_t hcap;   // hcap: power of two (or 0)
    struct ice_dci dci;
};

// ---- id map -----------------------------------------------------------------

static size_t hash_id(int64_t id, size_t cap) {
    uint64_t x = (uint64_t)id * 0x9e3779b97f4a7c15ULL;
    x ^= x >> 31;
    return (size_t)(x & (cap - 1));
}

static int64_t map_find(const struct ice_index * ix, int64_t id) {
    if (ix->hcap == 0) return -1;
    for (size_t h = hash_id(id, ix->hcap);; h = (h + 1) & (ix->hcap - 1)) {
        if (ix->hkey[h] == -1) return -1;
        if (ix->hkey[h] == id) return ix->hval[h];
    }
}

static void map_put(struct ice_index * ix, int64_t id, int64_t slot) {
    size_t h = hash_id(id, ix->hcap);
    while (ix->hkey[h] != -1 && ix->hkey[h] != id) h = (h + 1) & (ix->hcap - 1);
    ix->hkey[h] = id;
    ix->hval[h] = slot;
}

static void map_del(struct ice_index * ix, int64_t id) {
    const size_t mask = ix->hcap - 1;
    size_t h = hash_id(id, ix->hcap);
    while (ix->hkey[h] != id) h = (h + 1) & mask;
    // backward-shift deletion
    size_t i = h;
    for (;;) {
        ix->hkey[i] = -1;
        size_t j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (ix->hkey[j] == -1) return;
            const size_t home = hash_id(ix->hkey[j], ix->hcap);
            // can the entry at j move to i? yes if home is not in (i, j] cyclically
            const int between = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
            if (!between) break;
        }
        ix->hkey[i] = ix->hkey[j];
        ix->hval[i] = ix->hval[j];
        i = j;
    }
}

static int map_grow(struct ice_index * ix, int64_t n_total) {
    size_t want = ix->hcap ? ix->hcap : 16;
    while ((double)want * 0.6 < (double)n_total) want *= 2;
    if (want == ix->hcap) return 0;
    int64_t * nk = malloc(want * sizeof *nk);
    int64_t * nv = malloc(want * sizeof *nv);
    if (!nk || !nv) { free(nk); free(nv); return -1; }
    for (size_t i = 0; i < want; i++) nk[i] = -1;
    int64_t * ok = ix->hkey; int64_t * ov = ix->hval; size_t oc = ix->hcap;
    ix->hkey = nk; ix->hval = nv; ix->hcap = want;
    for (size_t i = 0; i < oc; i++) if (ok[i] != -1) map_put(ix, ok[i], ov[i]);
    free(ok); free(ov);
    return 0;
}

// ---- lifecycle ----------------------------------------------------------------

enum ice_status ice_index_init(const struct ice_index_params * params, struct ice_index ** out) {
    if (!params || !out) return ICE_STATUS_INVALID_ARG;
    *out = NULL;
    if (params->dim <= 0 || params->dim > (1 << 16)) return ICE_STATUS_INVALID_ARG;
    if (params->kind != ICE_INDEX_DCI && params->kind != ICE_INDEX_EXACT) return ICE_STATUS_INVALID_ARG;
    if (params->visit_budget < 0 || params->retrieve_budget < 0) return ICE_STATUS_INVALID_ARG;
    if (params->kind == ICE_INDEX_DCI &&
        (params->n_composite < 1 || params->n_composite > 64 || params->n_simple < 1 || params->n_simple > 64)) {
        return ICE_STATUS_INVALID_ARG;
    }
    struct ice_index * ix = calloc(1, sizeof *ix);
    if (!ix) return ICE_STATUS_NO_MEMORY;
    ix->p = *params;
    if (params->kind == ICE_INDEX_DCI) ice_dci_init(&ix->dci, params->dim, params->n_composite, params->n_simple, params->seed);
    *out = ix;
    return ICE_STATUS_OK;
}

void ice_index_free(struct ice_index * ix) {
    if (!ix) return;
    free(ix->keys); free(ix->ids); free(ix->hkey); free(ix->hval);
    if (ix->p.kind == ICE_INDEX_DCI) ice_dci_free(&ix->dci);
    free(ix);
}

int64_t ice_index_size(const struct ice_index * ix) { return ix ? ix->n : 0; }

size_t ice_index_memory(const struct ice_index * ix) {
    if (!ix) return 0;
    size_t b = sizeof *ix + ix->keys_cap + ix->ids_cap + ix->hcap * 2 * sizeof(int64_t);
    if (ix->p.kind == ICE_INDEX_DCI) b += ice_dci_memory(&ix->dci);
    return b;
}

// ---- add / remove ---------------------------------------------------------------

enum ice_status ice_index_add(struct ice_index * ix, int64_t n, const float * keys, const int64_t * ids) {
    if (!ix || n < 0 || (n > 0 && !keys)) return ICE_STATUS_INVALID_ARG;
    if (n == 0) return ICE_STATUS_OK;
    if (ix->n + n > INT32_MAX - 1) return ICE_STATUS_INVALID_ARG;
    const int64_t dim = ix->p.dim;
    for (int64_t i = 0; i < n; i++) {
        if (ids && ids[i] < 0) return ICE_STATUS_INVALID_ARG;
        for (int64_t d = 0; d < dim; d++) if (!isfinite(keys[i * dim + d])) return ICE_STATUS_INVALID_ARG;
    }
    const int64_t n_old = ix->n;
    if (ICE_RESERVE(&ix->keys, &ix->keys_cap, (n_old + n) * dim, 1) ||
        ICE_RESERVE(&ix->ids, &ix->ids_cap, n_old + n, 1) ||
        map_grow(ix, n_old + n)) {
        return ICE_STATUS_NO_MEMORY;
    }
    // insert ids; on a duplicate (stored, or twice in the batch) undo the inserted ones
    for (int64_t i = 0; i < n; i++) {
        const int64_t id = ids ? ids[i] : n_old + i;
        if (map_find(ix, id) >= 0) {
            for (int64_t j = 0; j < i; j++) map_del(ix, ids ? ids[j] : n_old + j);
            return ICE_STATUS_DUPLICATE_ID;
        }
        map_put(ix, id, n_old + i);
        ix->ids[n_old + i] = id;
    }
    memcpy(ix->keys + n_old * dim, keys, (size_t)(n * dim) * sizeof(float));
    ix->n = n_old + n;
    if (ix->p.kind == ICE_INDEX_DCI && ice_dci_build(&ix->dci, ix->keys, dim, ix->n, NULL, 1.0f) != 0) {
        for (int64_t i = 0; i < n; i++) map_del(ix, ix->ids[n_old + i]);
        ix->n = n_old;
        ice_dci_build(&ix->dci, ix->keys, dim, ix->n, NULL, 1.0f);   // shrinking never allocates
        return ICE_STATUS_NO_MEMORY;
    }
    return ICE_STATUS_OK;
}

enum ice_status ice_index_remove(struct ice_index * ix, int64_t id) {
    if (!ix) return ICE_STATUS_INVALID_ARG;
    const int64_t slot = map_find(ix, id);
    if (slot < 0) return ICE_STATUS_NOT_FOUND;
    const int64_t last = ix->n - 1;
    const int64_t dim = ix->p.dim;
    map_del(ix, id);
    if (ix->p.kind == ICE_INDEX_DCI) ice_dci_remove_swap(&ix->dci, (int32_t)slot, (int32_t)last);
    if (slot != last) {
        memcpy(ix->keys + slot * dim, ix->keys + last * dim, (size_t)dim * sizeof(float));
        ix->ids[slot] = ix->ids[last];
        map_put(ix, ix->ids[slot], slot);
    }
    ix->n = last;
    return ICE_STATUS_OK;
}

// ---- search ----------------------------------------------------------------------

struct filter_ctx { const struct ice_filter * f; const int64_t * ids; };

static int filter_visible_point(const void * ctx, int64_t point) {
    const struct filter_ctx * c = ctx;
    const int64_t id = c->ids[point];
    return id < c->f->n && ice_mask_visible(c->f->type, c->f->mask, id);
}

enum ice_status ice_index_search(
        const struct ice_index * ix, const float * query, int32_t k, const struct ice_filter * filter,
        int64_t * labels, float * scores, int32_t * n_found) {
    if (n_found) *n_found = 0;
    if (!ix || !query || k <= 0 || !labels || !scores) return ICE_STATUS_INVALID_ARG;
    if (filter && (filter->n < 0 || (filter->n > 0 && !filter->mask) ||
                   (filter->type != ICE_TYPE_F32 && filter->type != ICE_TYPE_F16))) {
        return ICE_STATUS_INVALID_ARG;
    }
    const int64_t dim = ix->p.dim;
    for (int64_t d = 0; d < dim; d++) if (!isfinite(query[d])) return ICE_STATUS_INVALID_ARG;

    // results go straight into the caller's buffers (the heap never holds more than k)
    struct ice_topk h = { scores, labels, k, 0 };
    enum ice_status st = ICE_STATUS_OK;
    if (ix->p.kind == ICE_INDEX_EXACT || ix->n == 0) {
        for (int64_t i = 0; i < ix->n; i++) {
            const int64_t id = ix->ids[i];
            if (filter && !(id < filter->n && ice_mask_visible(filter->type, filter->mask, id))) continue;
            ice_topk_push(&h, ice_dot(query, ix->keys + i * dim, dim), id);
        }
    } else {
        struct ice_dci_scratch s;
        memset(&s, 0, sizeof s);
        const int32_t vb = ix->p.visit_budget   > 0 ? ix->p.visit_budget   : ice_dci_auto_visit(k, ix->p.n_simple, ix->n);
        const int32_t rb = ix->p.retrieve_budget > 0 ? ix->p.retrieve_budget : ice_dci_auto_retrieve(k, ix->n);
        struct filter_ctx fc = { filter, ix->ids };
        // DCI heap holds point numbers; translate to ids afterwards
        const struct ice_rows rows = { (const char *)ix->keys, ICE_TYPE_F32, (size_t)dim * sizeof(float) };
        if (ice_dci_search(&ix->dci, &rows, query, vb, rb,
                           filter ? filter_visible_point : NULL, &fc, &s, &h) != 0) {
            st = ICE_STATUS_NO_MEMORY;
            h.n = 0;
        }
        for (int32_t i = 0; i < h.n; i++) labels[i] = ix->ids[labels[i]];
        ice_dci_scratch_free(&s);
    }
    ice_topk_sort(&h);
    for (int32_t i = h.n; i < k; i++) { labels[i] = -1; scores[i] = -INFINITY; }
    if (n_found) *n_found = h.n;
    return st;
}

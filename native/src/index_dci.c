// index_dci.c - Prioritized DCI (Li and Malik, 2017) over the IceFormer embedding.
//
// Keys are embedded as k -> [k ; sqrt(M^2 - |k|^2)] (M: the largest key norm at
// build time) and queries as q -> [M q/|q| ; 0] (the same sphere), so the Euclidean nearest embedded
// key is the key with the largest q.k. There are L composite indices of m simple
// indices each; a simple index is the keys' projections on one random unit
// direction, sorted. A query walks every simple index outwards from its own
// projection; each composite index keeps its m walks in a priority order by
// |proj(key) - proj(query)| and pops the closest. A key seen by all m simple
// indices of one composite index becomes a candidate and is scored exactly (q.k).
// The search stops when every composite index has made visit_budget visible pops
// (or is exhausted) or retrieve_budget candidates have been scored.

#include "ice_internal.h"

static uint64_t splitmix64(uint64_t * s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double unif01(uint64_t * s) { return ((double)(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

void ice_dci_init(struct ice_dci * d, int32_t dim, int32_t L, int32_t m, uint64_t seed) {
    memset(d, 0, sizeof *d);
    d->dim = dim; d->L = L; d->m = m; d->seed = seed;
}

void ice_dci_free(struct ice_dci * d) {
    free(d->dirs); free(d->mean); free(d->proj); free(d->pidx); free(d->tmpf); free(d->tmpi);
    memset(d, 0, sizeof *d);
}

size_t ice_dci_memory(const struct ice_dci * d) {
    return d->dirs_cap + d->mean_cap + d->proj_cap + d->pidx_cap + d->tmpf_cap + d->tmpi_cap;
}

void ice_dci_scratch_free(struct ice_dci_scratch * s) {
    free(s->cnt); free(s->cand); free(s->touched); free(s->heap_s); free(s->heap_i); free(s->qn);
    memset(s, 0, sizeof *s);
}

static int make_dirs(struct ice_dci * d) {
    const int64_t D = d->dim + 1, nd = (int64_t)d->L * d->m;
    if (d->dirs && d->dirs_cap >= (size_t)(nd * D) * sizeof(float)) return 0;
    if (ICE_RESERVE(&d->dirs, &d->dirs_cap, nd * D, 0)) return -1;
    uint64_t s = d->seed;
    for (int64_t j = 0; j < nd; j++) {
        float * u = d->dirs + j * D;
        double nrm = 0;
        for (int64_t i = 0; i < D; i++) {
            const double g = sqrt(-2.0 * log(unif01(&s))) * cos(6.283185307179586 * unif01(&s));
            u[i] = (float)g; nrm += g * g;
        }
        const float inv = (float)(1.0 / sqrt(nrm));
        for (int64_t i = 0; i < D; i++) u[i] *= inv;
    }
    return 0;
}

static inline uint32_t sortable(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// LSD radix sort of (key, val) pairs, 3 passes of 11 bits. a/b: n keys, ia/ib: n vals.
// The result ends in (b, ib) after an odd number of passes.
static void radix3(uint32_t * a, int32_t * ia, uint32_t * b, int32_t * ib, int64_t n) {
    for (int pass = 0; pass < 3; pass++) {
        const int sh = pass * 11;
        int64_t cnt[2048];
        memset(cnt, 0, sizeof cnt);
        for (int64_t i = 0; i < n; i++) cnt[(a[i] >> sh) & 2047]++;
        int64_t sum = 0;
        for (int i = 0; i < 2048; i++) { const int64_t c = cnt[i]; cnt[i] = sum; sum += c; }
        for (int64_t i = 0; i < n; i++) {
            const int64_t o = cnt[(a[i] >> sh) & 2047]++;
            b[o] = a[i]; ib[o] = ia[i];
        }
        uint32_t * t = a; a = b; b = t;
        int32_t * ti = ia; ia = ib; ib = ti;
    }
}

int ice_dci_build(struct ice_dci * d, const float * keys, int64_t stride, int64_t n, const uint8_t * stat, float headroom) {
    const int64_t dim = d->dim, D = dim + 1, nd = (int64_t)d->L * d->m;
    if ((int64_t)d->L * n > INT32_MAX) return -1;
    if (make_dirs(d)) return -1;
    if (ICE_RESERVE(&d->proj, &d->proj_cap, nd * n, 0) ||
        ICE_RESERVE(&d->pidx, &d->pidx_cap, nd * n, 0) ||
        ICE_RESERVE(&d->tmpf, &d->tmpf_cap, 3 * n + 1, 0) ||
        ICE_RESERVE(&d->tmpi, &d->tmpi_cap, 2 * n + 1, 0)) {
        d->n = 0;
        return -1;
    }
    d->n = n; d->stride = n;
    if (ICE_RESERVE(&d->mean, &d->mean_cap, dim, 0) || ICE_RESERVE(&d->tmpf, &d->tmpf_cap, 3 * n + 2 * dim + 1, 0)) {
        d->n = 0;
        return -1;
    }
    float * ext = d->tmpf;                       // extra coordinate sqrt(M^2 - |k - mean|^2)
    float * kc  = d->tmpf + 3 * n;               // one centred key
    // u.(k - mean) = u.k - u.mean: project raw keys, subtract the mean's projection
    // mean and M from the points stat[i] != 0 only (see ice_internal.h)
    int64_t n_stat = 0;
    memset(d->mean, 0, (size_t)dim * sizeof(float));
    for (int64_t i = 0; i < n; i++) if (!stat || stat[i]) { ice_axpy(d->mean, 1.0f, keys + i * stride, dim); n_stat++; }
    for (int64_t c = 0; c < dim; c++) d->mean[c] = n_stat > 0 ? d->mean[c] / (float)n_stat : 0.0f;
    float M2 = 0;
    for (int64_t i = 0; i < n; i++) {
        const float * k = keys + i * stride;
        for (int64_t c = 0; c < dim; c++) kc[c] = k[c] - d->mean[c];
        const float nn = ice_dot(kc, kc, dim);
        ext[i] = nn;
        if (nn > M2 && (!stat || stat[i])) M2 = nn;
    }
    if (M2 <= 0) M2 = 1;
    M2 *= headroom * headroom;
    d->max_norm = sqrtf(M2);
    for (int64_t i = 0; i < n; i++) ext[i] = sqrtf(fmaxf(M2 - ext[i], 0.0f));
    uint32_t * ka = (uint32_t *)(void *)(d->tmpf + n);
    uint32_t * kb = (uint32_t *)(void *)(d->tmpf + 2 * n);
    int32_t * ia = d->tmpi, * ib = d->tmpi + n;
    for (int64_t j = 0; j < nd; j++) {
        const float * u = d->dirs + j * D;
        const float um = ice_dot(u, d->mean, dim);
        for (int64_t i = 0; i < n; i++) {
            ka[i] = sortable(ice_dot(u, keys + i * stride, dim) - um + u[dim] * ext[i]);
            ia[i] = (int32_t)i;
        }
        radix3(ka, ia, kb, ib, n);
        float * pj = d->proj + j * n;
        int32_t * xj = d->pidx + j * n;
        for (int64_t i = 0; i < n; i++) {
            const int32_t pt = ib[i];
            pj[i] = ice_dot(u, keys + (int64_t)pt * stride, dim) - um + u[dim] * ext[pt];
            xj[i] = pt;
        }
    }
    return 0;
}

void ice_dci_remove_swap(struct ice_dci * d, int32_t victim, int32_t last) {
    const int64_t nd = (int64_t)d->L * d->m;
    for (int64_t j = 0; j < nd; j++) {
        float * pj = d->proj + j * d->stride;
        int32_t * xj = d->pidx + j * d->stride;
        int64_t o = 0;
        for (int64_t i = 0; i < d->n; i++) {
            int32_t pt = xj[i];
            if (pt == victim) continue;
            if (pt == last) pt = victim;
            pj[o] = pj[i]; xj[o] = pt; o++;
        }
    }
    d->n--;
}

static int64_t lower_bound(const float * p, int64_t n, float x);

// Projection of one key on simple index j, or NAN when the key lies outside the sphere of radius M.
static float project_one(const struct ice_dci * d, const float * key, int64_t j, float ext) {
    const int64_t D = d->dim + 1;
    const float * u = d->dirs + j * D;
    return ice_dot(u, key, d->dim) - ice_dot(u, d->mean, d->dim) + u[d->dim] * ext;
}

int ice_dci_upsert(struct ice_dci * d, const float * key, int32_t pt) {
    const int64_t dim = d->dim, nd = (int64_t)d->L * d->m;
    if (pt < 0 || pt > d->n) return -1;
    float nn = 0;
    for (int64_t c = 0; c < dim; c++) { const float x = key[c] - d->mean[c]; nn += x * x; }
    const float M2 = d->max_norm * d->max_norm;
    if (nn > M2) return 1;                       // outside the embedding's sphere: the caller rebuilds
    const float ext = sqrtf(M2 - nn);
    if (pt == d->n && d->n + 1 > d->stride) {    // grow every simple index's slots (amortised doubling)
        const int64_t ns = d->stride * 2 > d->n + 64 ? d->stride * 2 : d->n + 64;
        float * np = malloc((size_t)(nd * ns) * sizeof(float));
        int32_t * ni = malloc((size_t)(nd * ns) * sizeof(int32_t));
        if (!np || !ni) { free(np); free(ni); return -1; }
        for (int64_t j = 0; j < nd; j++) {
            memcpy(np + j * ns, d->proj + j * d->stride, (size_t)d->n * sizeof(float));
            memcpy(ni + j * ns, d->pidx + j * d->stride, (size_t)d->n * sizeof(int32_t));
        }
        free(d->proj); free(d->pidx);
        d->proj = np; d->pidx = ni;
        d->proj_cap = (size_t)(nd * ns) * sizeof(float); d->pidx_cap = (size_t)(nd * ns) * sizeof(int32_t);
        d->stride = ns;
    }
    const int64_t n_old = d->n;                  // entries before the update
    for (int64_t j = 0; j < nd; j++) {
        float * pj = d->proj + j * d->stride;
        int32_t * xj = d->pidx + j * d->stride;
        int64_t n = n_old;
        if (pt < d->n) {                         // drop the old entry of pt
            int64_t i = 0;
            while (i < n && xj[i] != pt) i++;
            if (i < n) {
                memmove(pj + i, pj + i + 1, (size_t)(n - i - 1) * sizeof(float));
                memmove(xj + i, xj + i + 1, (size_t)(n - i - 1) * sizeof(int32_t));
                n--;
            }
        }
        const float p = project_one(d, key, j, ext);
        const int64_t at = lower_bound(pj, n, p);
        memmove(pj + at + 1, pj + at, (size_t)(n - at) * sizeof(float));
        memmove(xj + at + 1, xj + at, (size_t)(n - at) * sizeof(int32_t));
        pj[at] = p; xj[at] = pt;
    }
    if (pt == d->n) d->n++;
    return 0;
}

// Automatic budgets, from recall measured on structured keys (n = 8192, d = 128, k = 64):
// every simple index walks max(16k, n/8) keys; candidates are not capped.
int32_t ice_dci_auto_visit(int32_t k, int32_t m, int64_t n) {
    int64_t w = 16 * (int64_t)k;
    if (n / 8 > w) w = n / 8;
    if (w < 64) w = 64;
    w *= m;
    return w > INT32_MAX / 4 ? INT32_MAX / 4 : (int32_t)w;
}
int32_t ice_dci_auto_retrieve(int32_t k, int64_t n) { (void)k; return n > INT32_MAX ? INT32_MAX : (int32_t)n; }

// lower bound: first i with p[i] >= x
static int64_t lower_bound(const float * p, int64_t n, float x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (p[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

#define ICE_DCI_MAX_WALKS 4096

int ice_dci_search(const struct ice_dci * d, const struct ice_rows * keys,
        const float * query, int32_t visit_budget, int32_t retrieve_budget,
        ice_visible_fn visible, const void * vctx,
        struct ice_dci_scratch * s, struct ice_topk * out) {
    const int64_t n = d->n, dim = d->dim, D = dim + 1;
    const int32_t L = d->L, m = d->m;
    if (n == 0 || out->k <= 0) return 0;
    if ((int64_t)L * m > ICE_DCI_MAX_WALKS) return -1;
    // cnt and cand are all-zero between searches (reset through the touched list)
    if (ICE_RESERVE(&s->cnt, &s->cnt_cap, (int64_t)L * n, 2) ||
        ICE_RESERVE(&s->cand, &s->cand_cap, n, 2) ||
        ICE_RESERVE(&s->touched, &s->touched_cap, (int64_t)L * visit_budget + 1, 0) ||
        ICE_RESERVE(&s->qn, &s->qn_cap, dim, 0)) {
        return -1;
    }
    float * qn = s->qn;
    const float qq = ice_dot(query, query, dim);
    // the query goes on the keys' sphere: [M q/|q| ; 0] (keys embed at norm M)
    const float inv = qq > 0 ? d->max_norm / sqrtf(qq) : 0.0f;
    for (int64_t i = 0; i < dim; i++) qn[i] = query[i] * inv;

    int64_t lo[ICE_DCI_MAX_WALKS], hi[ICE_DCI_MAX_WALKS];
    float qp[ICE_DCI_MAX_WALKS], pri[ICE_DCI_MAX_WALKS];
    const int64_t nd = (int64_t)L * m;
    for (int64_t j = 0; j < nd; j++) {
        const float * pj = d->proj + j * d->stride;
        qp[j] = ice_dot(d->dirs + j * D, qn, dim);
        const int64_t pos = lower_bound(pj, n, qp[j]);
        lo[j] = pos - 1; hi[j] = pos;
        const float dl = lo[j] >= 0 ? qp[j] - pj[lo[j]] : INFINITY;
        const float dh = hi[j] < n ? pj[hi[j]] - qp[j] : INFINITY;
        pri[j] = fminf(dl, dh);
    }
    int32_t visits[64];
    for (int32_t l = 0; l < L; l++) visits[l] = 0;
    int32_t n_cand = 0;
    int64_t n_touched = 0;
    int active = 1;
    while (active && n_cand < retrieve_budget) {
        active = 0;
        for (int32_t l = 0; l < L && n_cand < retrieve_budget; l++) {
            if (visits[l] >= visit_budget) continue;
            // pop the closest walk of composite l, skipping invisible keys
            for (;;) {
                int64_t jb = -1; float best = INFINITY;
                for (int64_t j = (int64_t)l * m; j < (int64_t)(l + 1) * m; j++) {
                    if (pri[j] < best) { best = pri[j]; jb = j; }
                }
                if (jb < 0) break;                        // composite exhausted
                const float * pj = d->proj + jb * d->stride;
                const int32_t * xj = d->pidx + jb * d->stride;
                int32_t pt;
                const float dl = lo[jb] >= 0 ? qp[jb] - pj[lo[jb]] : INFINITY;
                const float dh = hi[jb] < n ? pj[hi[jb]] - qp[jb] : INFINITY;
                if (dl <= dh) { pt = xj[lo[jb]]; lo[jb]--; } else { pt = xj[hi[jb]]; hi[jb]++; }
                {
                    const float nl = lo[jb] >= 0 ? qp[jb] - pj[lo[jb]] : INFINITY;
                    const float nh = hi[jb] < n ? pj[hi[jb]] - qp[jb] : INFINITY;
                    pri[jb] = fminf(nl, nh);
                }
                if (visible && !visible(vctx, pt)) continue;
                visits[l]++;
                active = 1;
                uint8_t * c = s->cnt + (int64_t)l * n + pt;
                if (*c == 0) s->touched[n_touched++] = (int32_t)((int64_t)l * n + pt);
                if (++*c == m && !s->cand[pt]) {
                    s->cand[pt] = 1;
                    n_cand++;
                    ice_topk_push(out, ice_rows_dot(keys, query, pt, dim), pt);
                }
                break;
            }
        }
    }
    for (int64_t i = 0; i < n_touched; i++) {
        const int32_t e = s->touched[i];
        s->cnt[e] = 0;
        s->cand[e % n] = 0;
    }
    return 0;
}

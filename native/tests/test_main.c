// test_main.c - a small C driver for sanitizer runs (ASan + UBSan + LeakSanitizer):
// index add/search/remove/free for both kinds and attention prepare/forward/dense with
// f16 K/V, a transposed V, GQA, two streams and a causal mask, over 1 and 3 threads; and the tiled dot
// products against the row ones, bit for bit where they promise it (ice_tiles_match_rows); the selection's
// and softmax's small kernels against plain loops.
// Exits non-zero on a failed check; sanitizers abort on their own reports.

#include "../src/ice_internal.h"

#include <stdio.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

static uint64_t rs = 42;
static float frand(void) { rs = rs * 6364136223846793005ULL + 1442695040888963407ULL; return (float)((rs >> 40) & 0xffffff) / 16777216.0f - 0.5f; }

static void test_index(enum ice_index_kind kind) {
    struct ice_index_params p = ice_index_default_params();
    p.kind = kind; p.dim = 24;
    struct ice_index * ix;
    CHECK(ice_index_init(&p, &ix) == ICE_STATUS_OK);
    enum { N = 700 };
    float * keys = malloc(sizeof(float) * N * 24);
    for (int i = 0; i < N * 24; i++) keys[i] = frand();
    CHECK(ice_index_add(ix, N / 2, keys, NULL) == ICE_STATUS_OK);
    CHECK(ice_index_add(ix, N - N / 2, keys + (N / 2) * 24, NULL) == ICE_STATUS_OK);
    CHECK(ice_index_add(ix, 1, keys, NULL) == ICE_STATUS_OK);          // id N: fresh
    int64_t dup = 3;
    CHECK(ice_index_add(ix, 1, keys, &dup) == ICE_STATUS_DUPLICATE_ID);
    CHECK(ice_index_size(ix) == N + 1);
    for (int64_t id = 0; id < N; id += 3) CHECK(ice_index_remove(ix, id) == ICE_STATUS_OK);
    CHECK(ice_index_remove(ix, 0) == ICE_STATUS_NOT_FOUND);
    float mask[N];
    for (int i = 0; i < N; i++) mask[i] = (i % 5 == 0) ? -INFINITY : 0.0f;
    struct ice_filter f = { mask, ICE_TYPE_F32, N };
    int64_t lab[40]; float sc[40]; int32_t nf;
    for (int t = 0; t < 20; t++) {
        CHECK(ice_index_search(ix, keys + t * 24, 40, t % 2 ? &f : NULL, lab, sc, &nf) == ICE_STATUS_OK);
        for (int i = 0; i < nf; i++) {
            CHECK(lab[i] % 3 != 0 || lab[i] == N);
            if (t % 2) CHECK(lab[i] < N && lab[i] % 5 != 0);
        }
    }
    CHECK(ice_index_search(ix, keys, 0, NULL, lab, sc, &nf) == ICE_STATUS_INVALID_ARG);
    CHECK(ice_index_memory(ix) > 0);
    ice_index_free(ix);
    free(keys);
}

static void set_view(struct ice_view * v, void * data, enum ice_type t, int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    v->data = data; v->type = t;
    v->ne[0] = n0; v->ne[1] = n1; v->ne[2] = n2; v->ne[3] = n3;
    v->nb[0] = ice_type_size(t); v->nb[1] = v->nb[0] * n0; v->nb[2] = v->nb[1] * n1; v->nb[3] = v->nb[2] * n2;
}

static void test_attention(bool exact, bool tail) {
    enum { D = 64, T = 20, H = 6, HK = 2, NKV = 900, S = 2, R = 24 };
    float * q = malloc(sizeof(float) * D * T * H * S);
    uint16_t * k = malloc(2 * D * NKV * HK * S);
    uint16_t * v = malloc(2 * D * NKV * HK * S);      // transposed: [NKV, D, HK, S] in memory
    uint16_t * m = malloc(2 * NKV * R * S);
    float * o1 = malloc(sizeof(float) * D * H * T * S), * o3 = malloc(sizeof(float) * D * H * T * S);
    float * od = malloc(sizeof(float) * D * H * T * S);
    for (int i = 0; i < D * T * H * S; i++) q[i] = frand();
    for (int i = 0; i < D * NKV * HK * S; i++) { k[i] = ice_f32_to_f16(frand() * 3); v[i] = ice_f32_to_f16(frand()); }
    for (int s = 0; s < S; s++) for (int r = 0; r < R; r++) for (int j = 0; j < NKV; j++) {
        const int vis = r < T && j <= NKV - T + r && (s == 0 || j % 2 == r % 2);
        m[(s * R + r) * NKV + j] = vis ? 0 : 0xfc00;
    }
    struct ice_attn_io io;
    memset(&io, 0, sizeof io);
    set_view(&io.q, q, ICE_TYPE_F32, D, T, H, S);
    set_view(&io.k, k, ICE_TYPE_F16, D, NKV, HK, S);
    set_view(&io.v, v, ICE_TYPE_F16, D, NKV, HK, S);
    io.v.nb[1] = 2; io.v.nb[0] = 2 * NKV;                // transposed V
    set_view(&io.mask, m, ICE_TYPE_F16, NKV, R, 1, S);
    set_view(&io.out, o1, ICE_TYPE_F32, D, H, T, S);
    io.scale = 0.125f;
    struct ice_attn_params ap = ice_attn_default_params();
    ap.top_k = 16; ap.min_n_kv = 100; ap.exact_search = exact; ap.tail_estimate = tail;
    struct ice_attn_state * st;
    CHECK(ice_attn_state_init(&ap, &st) == ICE_STATUS_OK);
    CHECK(ice_attn_prepare(st, &io, 0, 1) == ICE_STATUS_OK);
    CHECK(ice_attn_forward(st, &io, 0, 1) == ICE_STATUS_OK);
    io.out.data = o3;
    for (int i = 0; i < 3; i++) CHECK(ice_attn_prepare(st, &io, i, 3) == ICE_STATUS_OK);
    for (int i = 0; i < 3; i++) CHECK(ice_attn_forward(st, &io, i, 3) == ICE_STATUS_OK);
    CHECK(memcmp(o1, o3, sizeof(float) * D * H * T * S) == 0);
    io.out.data = od;
    for (int i = 0; i < 2; i++) CHECK(ice_attn_dense(&io, i, 2) == ICE_STATUS_OK);
    for (int i = 0; i < D * H * T * S; i++) CHECK(isfinite(o1[i]) && isfinite(od[i]));
    CHECK(ice_attn_state_memory(st) > 0);
    CHECK(ice_attn_forward(st, &io, 3, 3) == ICE_STATUS_INVALID_ARG);
    // two states borrowing one scratch (one after the other, as a graph's layers) answer as st did
    struct ice_attn_scratch * sc;
    struct ice_attn_state * sh[2];
    CHECK(ice_attn_scratch_init(&sc) == ICE_STATUS_OK);
    io.out.data = o3;
    for (int j = 0; j < 2; j++) {
        CHECK(ice_attn_state_init_shared(&ap, sc, &sh[j]) == ICE_STATUS_OK);
        for (int i = 0; i < 2; i++) CHECK(ice_attn_prepare(sh[j], &io, i, 2) == ICE_STATUS_OK);
        for (int i = 0; i < 2; i++) CHECK(ice_attn_forward(sh[j], &io, i, 2) == ICE_STATUS_OK);
        CHECK(memcmp(o1, o3, sizeof(float) * D * H * T * S) == 0);
    }
    CHECK(ice_attn_scratch_memory(sc) > 0 && ice_attn_state_memory(sh[0]) < ice_attn_state_memory(st));
    for (int j = 0; j < 2; j++) ice_attn_state_free(sh[j]);
    ice_attn_scratch_free(sc);
    // persistence: decode-like updates, each rewriting one cell in place (a reused cell) and naming it
    // in `written` with a new cache version; one key far beyond the embedding bound (DCI rebuild)
    int64_t w[1];
    io.out.data = o3;
    io.written = w; io.n_written = 1; io.stream_cells = NKV;
    for (int step = 0; step < 8; step++) {
        const int64_t cell = (step * 97) % NKV;
        for (int d = 0; d < D; d++) k[cell * D + d] = ice_f32_to_f16(frand() * (step == 5 ? 40.0f : 3.0f));
        w[0] = cell;
        io.epoch_before = 1; io.epoch_after = 2 + (uint64_t)step;
        for (int i = 0; i < 2; i++) CHECK(ice_attn_prepare(st, &io, i, 2) == ICE_STATUS_OK);
        for (int i = 0; i < 2; i++) CHECK(ice_attn_forward(st, &io, i, 2) == ICE_STATUS_OK);
        for (int i = 0; i < D * H * T * S; i++) CHECK(isfinite(o3[i]));
    }
    ice_attn_state_free(st);
    free(q); free(k); free(v); free(m); free(o1); free(o3); free(od);
}

// ice_dots_tile_list against ice_dots_rows over the same rows (f16, llama.cpp's interleaved layout):
// equal bits for 1 to 5 queries, head sizes 64 and 128, where ice_tiles_match_rows says so.
static void test_tiles_match_rows(void) {
    enum { N_KV = 160, HKV = 2, NT = 4 };
    for (int64_t n = 64; n <= 128; n += 64) {
        if (!ice_tiles_match_rows(n)) continue;
        uint16_t * k = malloc((size_t)N_KV * HKV * n * 2), * kt = malloc((size_t)N_KV * n * 2);
        float * q = malloc(5 * (size_t)n * 4), * a = malloc(5 * NT * 16 * 4), * b = malloc(5 * NT * 16 * 4);
        CHECK(k && kt && q && a && b);
        for (int64_t i = 0; i < (int64_t)N_KV * HKV * n; i++) k[i] = ice_f32_to_f16(4.0f * frand());
        for (int64_t c = 0; c < N_KV; c++) for (int64_t d = 0; d < n; d++) kt[ice_tile_at(c, d, n)] = k[(size_t)c * HKV * n + d];
        const int32_t tile[NT] = { 7, 2, 9, 0 }, pos[NT] = { 0, 16, 32, 48 };
        int32_t cells[NT * 16];
        for (int t = 0; t < NT; t++) for (int r = 0; r < 16; r++) cells[t * 16 + r] = tile[t] * 16 + r;
        for (int na = 1; na <= 5; na++) {
            for (int64_t i = 0; i < na * n; i++) q[i] = frand();
            ice_dots_tile_list(q, na, kt, tile, pos, NT, n, a, NT * 16);
            for (int j = 0; j < na; j++) {
                // the rows in several lists of odd lengths: a row's bits must not depend on its place
                for (int64_t i0 = 0; i0 < NT * 16; i0 += 13) {
                    const int64_t cnt = NT * 16 - i0 < 13 ? NT * 16 - i0 : 13;
                    ice_dots_rows(q + j * n, (const char *)k, (size_t)HKV * n * 2, ICE_TYPE_F16, cells + i0, cnt, n, b + j * NT * 16 + i0);
                }
            }
            CHECK(memcmp(a, b, (size_t)na * NT * 16 * sizeof(float)) == 0);
        }
        free(k); free(kt); free(q); free(a); free(b);
    }
}

// The selection's and softmax's small kernels against plain loops, bit for bit, at every length to 40 (full
// vectors and every tail): group ranking keys (zeros: ineligible blocks), their max, and the fused scale-max
// with NaN and infinities among the scores.
static void test_small_kernels_match_loops(void) {
    for (int64_t n = 0; n <= 40; n++) {
        uint32_t hk[40], key[40], ref[40];
        float x[40], y[40];
        for (int64_t i = 0; i < n; i++) {
            hk[i] = i % 5 == 3 ? 0u : ice_score_key(16.0f * frand());
            key[i] = ref[i] = i % 3 ? ice_score_key(4.0f * frand()) : 0u;
            x[i] = y[i] = i % 11 == 7 ? NAN : i % 13 == 5 ? -INFINITY : 8.0f * frand();
        }
        uint32_t top = 0;
        for (int64_t i = 0; i < n; i++) top = hk[i] > top ? hk[i] : top;
        CHECK(ice_max_u32(hk, n) == top);
        const float sub = n ? ice_key_score(top) : 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t k = hk[i] ? ice_score_key(ice_key_score(hk[i]) - sub) : 0u;
            ref[i] = k > ref[i] ? k : ref[i];
        }
        ice_keys_max_shifted(key, hk, n, sub);
        CHECK(memcmp(key, ref, (size_t)n * sizeof *key) == 0);
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) { y[i] *= 0.125f; mx = y[i] > mx ? y[i] : mx; }
        const float got = ice_scale_max(x, n, 0.125f);
        CHECK(memcmp(&got, &mx, sizeof got) == 0 || (got == 0.0f && mx == 0.0f));
        CHECK(memcmp(x, y, (size_t)n * sizeof *x) == 0);
    }
}

int main(void) {
    for (int s = 0; s <= 5; s++) CHECK(strlen(ice_status_str((enum ice_status)s)) > 0);
    test_index(ICE_INDEX_EXACT);
    test_index(ICE_INDEX_DCI);
    for (int e = 0; e < 2; e++) for (int t = 0; t < 2; t++) test_attention(e, t);
    test_tiles_match_rows();
    test_small_kernels_match_loops();
    printf("native C driver: ok (simd: %s)\n", ice_simd_name());
    return 0;
}

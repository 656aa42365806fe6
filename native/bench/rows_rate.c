// rows_rate.c - the rate of the kernels' batched row operations (ice_dots_rows, ice_axpys_rows, and
// ice_axpys_rows_multi for the 3 heads of a GQA group) over gathered rows, as forward uses them: 34
// blocks of 32 consecutive cells, chosen at random from an 8192-cell cache, the same cells for every
// query (hot in L1/L2); of the block ranking (ice_dots_tiles: 3 queries against the 512 tiled fp16
// ranking rows of an 8k cache); and of the same dot products as op dots for the 3 heads at once from
// prefill's tiled copy of the keys (ice_dots_tile_list, per key and query). Prints ns per key (block) and query for f16 rows (interleaved across 3
// KV heads, llama.cpp's layout) and packed f32 rows, and writes JSON.
//
//   gcc -O2 -Inative/include native/bench/rows_rate.c native/src/*.c -lm -o /tmp/rows_rate
//   /tmp/rows_rate [out.json]        (ICEFORMER_SIMD=avx2|scalar caps the SIMD level; avx512 or
//                                     avx512-ymm forces the 512- or 256-bit row forms)
//
// Single-threaded; run it on an idle machine and compare variants side by side.

#define _POSIX_C_SOURCE 199309L   // clock_gettime under -std=c11

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "iceformer.h"

// internal (native/src/ice_internal.h), declared here so the benchmark needs only the public header
void ice_dots_rows(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out);
void ice_axpys_rows(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n);
void ice_axpys_rows_multi(float * y, int64_t na, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n);
void ice_dots_tiles(const float * a, int64_t na, const uint16_t * tiles, int64_t cnt, int64_t n, float * out);
void ice_dots_tile_list(const float * a, int64_t na, const uint16_t * tiles, const int32_t * tile, const int32_t * pos,
        int64_t nt, int64_t n, float * out, int64_t ostride);


enum { N_KV = 8192, N_HEAD_KV = 3, N_BLOCKS = 34, B = 32, N_QUERIES = 20000, REPS = 7, GQA = 3, N_RANK = 512 };

// op 4: the chosen blocks as whole tiles of 16 cells of a tiled copy of KV head 0's keys
static const uint16_t * g_ktiles;
static int32_t g_tile[N_BLOCKS * B / 16], g_pos[N_BLOCKS * B / 16];
static int64_t g_nt;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// best of REPS, ns per (key, query); op 2 (GQA outputs at once) per (key, output), op 3 (ranking
// tiles at base) per (block, query), op 4 (tiled keys, GQA queries at once) per (key, query)
static double rate(int op, enum ice_type t, const char * base, size_t stride, const int32_t * idx, int64_t n,
        int64_t d, float * q, float * buf) {
    double best = 1e30;
    const int64_t per = op == 3 ? (int64_t)GQA * N_RANK : op == 2 || op == 4 ? (int64_t)GQA * n : n;
    const int n_calls = op >= 2 ? N_QUERIES / GQA : N_QUERIES;
    for (int r = 0; r < REPS; r++) {
        const double t0 = now();
        for (int i = 0; i < n_calls; i++) {
            if (op == 0) ice_dots_rows(q, base, stride, t, idx, n, d, buf);
            else if (op == 1) ice_axpys_rows(q, buf, base, stride, t, idx, n, d);
            else if (op == 2) ice_axpys_rows_multi(q, GQA, buf, base, stride, t, idx, n, d);
            else if (op == 3) ice_dots_tiles(q, GQA, (const uint16_t *)(const void *)base, N_RANK, d, buf);
            else ice_dots_tile_list(q, GQA, g_ktiles, g_tile, g_pos, g_nt, d, buf, n);
        }
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return best * 1e9 / ((double)n_calls * (double)per);
}

int main(int argc, char ** argv) {
    static int32_t idx[N_BLOCKS * B];
    static float q[GQA * 256], buf[GQA * N_RANK + GQA * N_BLOCKS * B];
    srand(1);
    int64_t n = 0;
    for (int b = 0; b < N_BLOCKS; b++) {
        const int blk = rand() % (N_KV / B);
        for (int j = 0; j < B; j++) idx[n++] = blk * B + j;
    }
    for (int i = 0; i < GQA * 256; i++) q[i] = (float)rand() / (float)RAND_MAX;
    for (int i = 0; i < GQA * N_BLOCKS * B; i++) buf[i] = 1e-3f;
    FILE * js = argc > 1 ? fopen(argv[1], "w") : NULL;
    if (argc > 1 && !js) { fprintf(stderr, "rows_rate: cannot write %s\n", argv[1]); return 1; }
    if (js) fprintf(js, "{\"simd\": \"%s\", \"keys\": %lld, \"results\": [", ice_simd_name(), (long long)n);
    printf("simd %s, %lld gathered keys per query\n", ice_simd_name(), (long long)n);
    const int dims[2] = { 64, 128 };
    int first = 1;
    for (int di = 0; di < 2; di++) {
        const int64_t d = dims[di];
        // f16 rows as llama.cpp's cache holds them (heads interleaved); f32 rows packed, as an f32 copy of
        // one head would be (the staging that was tried: it pays only if the conversion is the bottleneck)
        const size_t s16 = (size_t)N_HEAD_KV * d * 2, s32 = (size_t)d * 4;
        uint16_t * k16 = malloc(N_KV * s16);
        float * k32 = malloc(N_KV * s32);
        if (!k16 || !k32) { fprintf(stderr, "rows_rate: out of memory\n"); return 1; }
        for (size_t i = 0; i < N_KV * s16 / 2; i++) k16[i] = (uint16_t)(0x3000 | (rand() & 0x3ff));   // f16 in [0.125, 0.25)
        for (size_t i = 0; i < N_KV * s32 / 4; i++) k32[i] = (float)rand() / (float)RAND_MAX;
        uint16_t * kt = malloc((size_t)N_KV * d * 2);   // head 0's keys, tiled as prepare copies them
        if (!kt) { fprintf(stderr, "rows_rate: out of memory\n"); return 1; }
        for (int64_t c = 0; c < N_KV; c++) {
            for (int64_t e = 0; e < d; e++) kt[(c / 16) * d * 16 + e * 16 + c % 16] = k16[(size_t)c * (s16 / 2) + e];
        }
        g_ktiles = kt;
        g_nt = 0;
        for (int64_t i = 0; i < n; i += 16) { g_tile[g_nt] = idx[i] / 16; g_pos[g_nt++] = (int32_t)i; }
        for (int op = 0; op < 5; op++) {
            for (int ty = 0; ty < (op >= 2 ? 1 : 2); ty++) {
                // op 3 reads k16's first N_RANK * d halves as ranking tiles
                const double ns = ty == 0 ? rate(op, ICE_TYPE_F16, (const char *)k16, s16, idx, n, d, q, buf)
                                          : rate(op, ICE_TYPE_F32, (const char *)k32, s32, idx, n, d, q, buf);
                const char * names[5] = { "dots", "axpys", "axpys3", "rank3", "dots3t" }, * opn = names[op], * tyn = ty == 0 ? "f16" : "f32";
                printf("%-6s d=%-3lld %s  %.2f ns per %s and query\n", opn, (long long)d, tyn, ns, op == 3 ? "block" : "key");
                if (js) fprintf(js, "%s{\"op\": \"%s\", \"d\": %lld, \"type\": \"%s\", \"ns_per_key\": %.4f}",
                                first ? "" : ", ", opn, (long long)d, tyn, ns);
                first = 0;
            }
        }
        free(k16); free(k32); free(kt);
    }
    if (js) { fprintf(js, "]}\n"); fclose(js); }
    return 0;
}

// simd_tiles.c - dot products of query rows with rows stored in tiles (ICE_TILE rows, element-major:
// ice_tile_at), the block search's ranking rows and prefill's tiled keys, with the run-time dispatch of
// simd.c (ice_simd_level). A vector of one element of 16 rows times one query element needs no
// horizontal sums, and one conversion of the rows serves every query of the pass.

#include "ice_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ICE_X86_DISPATCH 1
#include <immintrin.h>
#endif

// ---- portable -------------------------------------------------------------

// The first k rows of one tile for na queries: out[j*ostride + r] = a_j . row r.
static void tile_dots_scalar(const float * a, int64_t na, const uint16_t * tile, int64_t n, int64_t k, float * out,
        int64_t ostride) {
    for (int64_t j = 0; j < na; j++) {
        for (int64_t r = 0; r < k; r++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < n; d++) acc += a[j * n + d] * ice_f16_to_f32(tile[d * ICE_TILE + r]);
            out[j * ostride + r] = acc;
        }
    }
}

static void dots_tiles_scalar(const float * a, int64_t na, const uint16_t * tiles, int64_t cnt, int64_t n, float * out) {
    for (int64_t i = 0; i < cnt; i += ICE_TILE) {
        tile_dots_scalar(a, na, tiles + (i / ICE_TILE) * n * ICE_TILE, n, cnt - i < ICE_TILE ? cnt - i : ICE_TILE, out + i, cnt);
    }
}

static void dots_tile_list_scalar(const float * a, int64_t na, const uint16_t * tiles, const int32_t * tile,
        const int32_t * pos, int64_t nt, int64_t n, float * out, int64_t ostride) {
    for (int64_t k = 0; k < nt; k++) tile_dots_scalar(a, na, tiles + (size_t)tile[k] * n * ICE_TILE, n, ICE_TILE, out + pos[k], ostride);
}

#ifdef ICE_X86_DISPATCH
// ---- AVX2 + FMA + F16C ----------------------------------------------------

// Queries four at a time, each pass an instance of FN with a constant query count m (1..4), so its
// accumulators stay in registers.
#define ICE_TILES_BY_FOUR(FN)                                                                             \
    for (int64_t j0 = 0; j0 < na; j0 += 4) {                                                              \
        const int64_t m = na - j0 < 4 ? na - j0 : 4;                                                      \
        const float * aj = a + j0 * n;                                                                    \
        float * oj = out + j0 * cnt;                                                                      \
        if (m == 4) FN(aj, 4, tiles, cnt, n, oj, cnt);                                                    \
        else if (m == 3) FN(aj, 3, tiles, cnt, n, oj, cnt);                                               \
        else if (m == 2) FN(aj, 2, tiles, cnt, n, oj, cnt);                                               \
        else FN(aj, 1, tiles, cnt, n, oj, cnt);                                                           \
    }

// The same for listed tiles (ice_dots_tile_list).
#define ICE_TILE_LIST_BY_FOUR(FN)                                                                         \
    for (int64_t j0 = 0; j0 < na; j0 += 4) {                                                              \
        const int64_t m = na - j0 < 4 ? na - j0 : 4;                                                      \
        const float * aj = a + j0 * n;                                                                    \
        float * oj = out + j0 * ostride;                                                                  \
        if (m == 4) FN(aj, 4, tiles, tile, pos, nt, n, oj, ostride);                                      \
        else if (m == 3) FN(aj, 3, tiles, tile, pos, nt, n, oj, ostride);                                 \
        else if (m == 2) FN(aj, 2, tiles, tile, pos, nt, n, oj, ostride);                                 \
        else FN(aj, 1, tiles, tile, pos, nt, n, oj, ostride);                                             \
    }

// The contiguous form (dots_tiles_ISA, over the per-tile body tile_dots_ISA) and the listed one
// (dots_tile_list_ISA, over LIST_TILE) of one instruction set, compiled for TARGET.
#define ICE_TILE_FORMS(TARGET, ISA, LIST_TILE)                                                            \
    __attribute__((target(TARGET), always_inline))                                                        \
    static inline void dots_tiles_##ISA##_m(const float * a, int m, const uint16_t * tiles, int64_t cnt,  \
            int64_t n, float * out, int64_t ostride) {                                                    \
        for (int64_t i = 0; i < cnt; i += ICE_TILE) {                                                     \
            tile_dots_##ISA(a, m, tiles + (i / ICE_TILE) * n * ICE_TILE, n,                               \
                            cnt - i < ICE_TILE ? cnt - i : ICE_TILE, out + i, ostride);                   \
        }                                                                                                 \
    }                                                                                                     \
    __attribute__((target(TARGET)))                                                                       \
    static void dots_tiles_##ISA(const float * a, int64_t na, const uint16_t * tiles, int64_t cnt,        \
            int64_t n, float * out) {                                                                     \
        ICE_TILES_BY_FOUR(dots_tiles_##ISA##_m)                                                           \
    }                                                                                                     \
    __attribute__((target(TARGET), always_inline))                                                        \
    static inline void dots_tile_list_##ISA##_m(const float * a, int m, const uint16_t * tiles,           \
            const int32_t * tile, const int32_t * pos, int64_t nt, int64_t n, float * out, int64_t ostride) { \
        for (int64_t k = 0; k < nt; k++) {                                                                \
            LIST_TILE(a, m, tiles + (size_t)tile[k] * n * ICE_TILE, n, ICE_TILE, out + pos[k], ostride);    \
        }                                                                                                 \
    }                                                                                                     \
    __attribute__((target(TARGET)))                                                                       \
    static void dots_tile_list_##ISA(const float * a, int64_t na, const uint16_t * tiles,                 \
            const int32_t * tile, const int32_t * pos, int64_t nt, int64_t n, float * out, int64_t ostride) { \
        ICE_TILE_LIST_BY_FOUR(dots_tile_list_##ISA##_m)                                                   \
    }

// Tiled rows (ICE_TILE = 16 rows per tile, element d of the tile's rows contiguous): a query
// element times one vector of row elements, no horizontal sums. m <= 4 queries a pass (a constant where
// inlined) share each conversion; one accumulator chain per query and half tile, two for a lone query
// (d even / odd), so the FMAs do not wait on each other.
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void tile_dots_avx2(const float * a, int m, const uint16_t * tile, int64_t n, int64_t k,
        float * out, int64_t ostride) {
    const int E = m == 1 ? 2 : 1;
    __m256 acc[4][2][2];   // [query][half][chain]
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) for (int hh = 0; hh < 2; hh++) for (int e = 0; e < 2; e++) acc[j][hh][e] = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 2) {
#pragma GCC unroll 2
        for (int e = 0; e < 2; e++) {
            const uint16_t * row = tile + (d + e) * ICE_TILE;
            const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)row));
            const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + 8)));
            const int c = E == 2 ? e : 0;
#pragma GCC unroll 4
            for (int j = 0; j < m; j++) {
                const __m256 bj = _mm256_broadcast_ss(a + j * n + d + e);
                acc[j][0][c] = _mm256_fmadd_ps(bj, lo, acc[j][0][c]);
                acc[j][1][c] = _mm256_fmadd_ps(bj, hi, acc[j][1][c]);
            }
        }
    }
    for (int j = 0; j < m; j++) {
        float r[ICE_TILE];
        _mm256_storeu_ps(r, _mm256_add_ps(acc[j][0][0], acc[j][0][1]));
        _mm256_storeu_ps(r + 8, _mm256_add_ps(acc[j][1][0], acc[j][1][1]));
        memcpy(out + j * ostride, r, (size_t)k * sizeof(float));
    }
}

ICE_TILE_FORMS("avx2,fma,f16c", avx2, tile_dots_avx2)

// ---- AVX-512F --------------------------------------------------------------

// Tiled rows (see dots_tiles_avx2): m <= 4 queries a pass (a constant where inlined), four accumulator
// chains each (d mod 4); the first k rows of the tile are stored.
__attribute__((target("avx512f"), always_inline))
static inline void tile_dots_avx512(const float * a, int m, const uint16_t * tile, int64_t n, int64_t k,
        float * out, int64_t ostride) {
    __m512 acc[4][4];   // [query][chain]
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) for (int e = 0; e < 4; e++) acc[j][e] = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 4) {
#pragma GCC unroll 4
        for (int e = 0; e < 4; e++) {
            const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(tile + (d + e) * ICE_TILE)));
#pragma GCC unroll 4
            for (int j = 0; j < m; j++) acc[j][e] = _mm512_fmadd_ps(_mm512_set1_ps(a[j * n + d + e]), x, acc[j][e]);
        }
    }
    const __mmask16 keep = k >= ICE_TILE ? (__mmask16)0xffff : (__mmask16)((1u << k) - 1);
    for (int j = 0; j < m; j++) {
        const __m512 r = _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3]));
        _mm512_mask_storeu_ps(out + j * ostride, keep, r);
    }
}

// One tile for m <= 4 queries, summed exactly as dots_rows_avx512 sums one row (simd.c), lane by lane:
// p_l = q[l] k[l] then + q[16c+l] k[16c+l] for c = 1.. (one FMA chain), S_l = p_l + p_{l+8}, and
// ((S0+S1)+(S2+S3)) + ((S4+S5)+(S6+S7)). So a key's score has the same bits read from tiles or in place,
// whatever the rows around it: forward's results do not depend on the ubatch size. Lanes l and l+1 are
// taken together, four FMA chains per query in flight. k is always ICE_TILE here.
__attribute__((target("avx512f"), always_inline))
static inline void tile_dots_rows_avx512(const float * a, int m, const uint16_t * tile, int64_t n, int64_t k,
        float * out, int64_t ostride) {
    (void) k;
    const int64_t nc = n / 16;
    __m512 u[4][2];   // [query][(S0+S1)+(S2+S3), then the same of S4..S7]
#pragma GCC unroll 4
    for (int l0 = 0; l0 < 8; l0 += 2) {
        __m512 p[4][4];   // [query][p_l, p_{l+8}, p_{l+1}, p_{l+9}]
#pragma GCC unroll 4
        for (int e = 0; e < 4; e++) {
            const int64_t el = l0 + (e >> 1) + 8 * (e & 1);   // element of chunk 0 for chain e
            const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(tile + el * ICE_TILE)));
#pragma GCC unroll 4
            for (int j = 0; j < m; j++) p[j][e] = _mm512_mul_ps(_mm512_set1_ps(a[j * n + el]), x);
        }
        for (int64_t c = 1; c < nc; c++) {
#pragma GCC unroll 4
            for (int e = 0; e < 4; e++) {
                const int64_t el = 16 * c + l0 + (e >> 1) + 8 * (e & 1);
                const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(tile + el * ICE_TILE)));
#pragma GCC unroll 4
                for (int j = 0; j < m; j++) p[j][e] = _mm512_fmadd_ps(_mm512_set1_ps(a[j * n + el]), x, p[j][e]);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < m; j++) {
            const __m512 pair = _mm512_add_ps(_mm512_add_ps(p[j][0], p[j][1]), _mm512_add_ps(p[j][2], p[j][3]));   // S_l + S_{l+1}
            const int half = l0 >> 2;
            if ((l0 & 2) == 0) u[j][half] = pair;
            else u[j][half] = _mm512_add_ps(u[j][half], pair);
        }
    }
    for (int j = 0; j < m; j++) _mm512_storeu_ps(out + j * ostride, _mm512_add_ps(u[j][0], u[j][1]));
}

ICE_TILE_FORMS("avx512f", avx512, tile_dots_rows_avx512)
#endif

// ---- dispatch ----------------------------------------------------------------

void ice_dots_tiles(const float * a, int64_t na, const uint16_t * tiles, int64_t cnt, int64_t n, float * out) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512 && n % 4 == 0) { dots_tiles_avx512(a, na, tiles, cnt, n, out); return; }
    if (ice_simd_level() == ICE_SIMD_AVX2 && n % 2 == 0) { dots_tiles_avx2(a, na, tiles, cnt, n, out); return; }
#endif
    dots_tiles_scalar(a, na, tiles, cnt, n, out);
}

bool ice_tiles_match_rows(int64_t n) {
#ifdef ICE_X86_DISPATCH
    return ice_simd_level() == ICE_SIMD_AVX512 && n % 16 == 0 && n >= 16 && n <= 256;
#else
    (void) n;
    return false;
#endif
}

void ice_dots_tile_list(const float * a, int64_t na, const uint16_t * tiles, const int32_t * tile, const int32_t * pos,
        int64_t nt, int64_t n, float * out, int64_t ostride) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512 && n % 4 == 0) { dots_tile_list_avx512(a, na, tiles, tile, pos, nt, n, out, ostride); return; }
    if (ice_simd_level() == ICE_SIMD_AVX2 && n % 2 == 0) { dots_tile_list_avx2(a, na, tiles, tile, pos, nt, n, out, ostride); return; }
#endif
    dots_tile_list_scalar(a, na, tiles, tile, pos, nt, n, out, ostride);
}

// simd_select.c - the block search's selection kernels (visible cells of a mask row, block sort keys, a GQA
// group's keys relative to each head's best, their max, counting keys at or above a threshold) with the
// run-time dispatch of simd.c (ice_simd_level).
// Kept apart from simd.c's arithmetic kernels so each file stays readable.

#include "ice_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ICE_X86_DISPATCH 1
#include <immintrin.h>
#endif

// ---- portable -------------------------------------------------------------

static int64_t visible_f16_scalar(const uint16_t * m, int64_t j0, int64_t j1, int32_t * out) {
    int64_t nv = 0;
    for (int64_t j = j0; j < j1; j++) { out[nv] = (int32_t)j; nv += m[j] != 0xfc00u; }
    return nv;
}

static inline uint32_t block_key_scalar(float qk, float q2v, int32_t cnt, int32_t vis) {
    if (!(cnt > 0 && vis == cnt)) return 0u;
    const float sc = qk + 2.0f * sqrtf(q2v);
    return sc > -INFINITY ? ice_score_key(sc) : 0u;   // NaN is not eligible either
}

static int64_t block_keys_scalar(const float * qk, const float * q2v, const int32_t * cnt, const int32_t * vis,
        int64_t i, int64_t n, uint32_t * key) {
    int64_t nok = 0;
    for (; i < n; i++) { key[i] = block_key_scalar(qk[i], q2v[i], cnt[i], vis[i]); nok += key[i] != 0; }
    return nok;
}

static uint32_t max_u32_scalar(const uint32_t * key, int64_t i, int64_t n, uint32_t m) {
    for (; i < n; i++) m = key[i] > m ? key[i] : m;
    return m;
}

static void keys_max_shifted_scalar(uint32_t * key, const uint32_t * hk, int64_t i, int64_t n, float sub) {
    for (; i < n; i++) {
        if (!hk[i]) continue;
        const uint32_t k = ice_score_key(ice_key_score(hk[i]) - sub);
        if (k > key[i]) key[i] = k;
    }
}

static int64_t count_ge_scalar(const uint32_t * key, int64_t i, int64_t n, uint32_t t) {
    int32_t c = 0;   // 32-bit counts so the loop vectorises well
    for (; i < n; i++) c += key[i] >= t;
    return c;
}

#ifdef ICE_X86_DISPATCH
// ---- AVX2 -----------------------------------------------------------------

// Visible cells of an f16 mask row, eight at a time: an all-visible group (the common case: causal rows,
// one sequence) is stored as a vector, others cell by cell. Writes up to 7 entries past the count.
__attribute__((target("avx2")))
static int64_t visible_f16_avx2(const uint16_t * m, int64_t j0, int64_t j1, int32_t * out) {
    const __m128i ninf = _mm_set1_epi16((short)0xfc00);
    const __m256i step = _mm256_set1_epi32(8);
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int32_t)j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    int64_t nv = 0, j = j0;
    for (; j + 8 <= j1; j += 8) {
        const int hidden = _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)(const void *)(m + j)), ninf));
        if (hidden == 0) {
            _mm256_storeu_si256((__m256i *)(void *)(out + nv), idx);
            nv += 8;
        } else if (hidden != 0xffff) {
            nv += visible_f16_scalar(m, j, j + 8, out + nv);
        }
        idx = _mm256_add_epi32(idx, step);
    }
    return nv + visible_f16_scalar(m, j, j1, out + nv);
}

__attribute__((target("avx2")))
static int64_t block_keys_avx2(const float * qk, const float * q2v, const int32_t * cnt, const int32_t * vis, int64_t n,
        uint32_t * key) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), zero = _mm256_setzero_si256();
    int64_t i = 0, nok = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)(cnt + i));
        const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(vis + i));
        const __m256 sc = _mm256_add_ps(_mm256_loadu_ps(qk + i),
                                        _mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_sqrt_ps(_mm256_loadu_ps(q2v + i))));
        const __m256i ok = _mm256_and_si256(_mm256_and_si256(_mm256_cmpeq_epi32(c, v), _mm256_cmpgt_epi32(c, zero)),
                _mm256_castps_si256(_mm256_cmp_ps(sc, _mm256_set1_ps(-INFINITY), _CMP_GT_OQ)));
        const __m256i u = _mm256_castps_si256(sc), neg = _mm256_srai_epi32(u, 31);
        const __m256i k = _mm256_or_si256(_mm256_xor_si256(u, neg), _mm256_andnot_si256(neg, sign));
        _mm256_storeu_si256((__m256i *)(void *)(key + i), _mm256_and_si256(k, ok));
        nok += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(ok)));
    }
    return nok + block_keys_scalar(qk, q2v, cnt, vis, i, n, key);
}

__attribute__((target("avx2")))
static int64_t count_ge_avx2(const uint32_t * key, int64_t n, uint32_t t) {
    const __m256i tv = _mm256_set1_epi32((int)t);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(const void *)(key + i));
        acc = _mm256_sub_epi32(acc, _mm256_cmpeq_epi32(_mm256_max_epu32(k, tv), k));   // -(-1) per key >= t
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)(void *)lanes, acc);
    int64_t c = 0;
    for (int j = 0; j < 8; j++) c += lanes[j];
    return c + count_ge_scalar(key, i, n, t);
}

// The ranking key's float (the inverse of ice_score_key), less sub, as a key again: ice_score_key's
// bit flips on both sides of one subtraction, eight lanes at a time.
__attribute__((target("avx2")))
static void keys_max_shifted_avx2(uint32_t * key, const uint32_t * hk, int64_t n, float sub) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), low = _mm256_set1_epi32(0x7fffffff), ones = _mm256_set1_epi32(-1);
    const __m256 s = _mm256_set1_ps(sub);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)(hk + i));
        const __m256i neg = _mm256_srai_epi32(u, 31);   // all ones where the key's top bit is set
        const __m256i f = _mm256_blendv_epi8(_mm256_xor_si256(u, ones), _mm256_and_si256(u, low), neg);
        const __m256i d = _mm256_castps_si256(_mm256_sub_ps(_mm256_castsi256_ps(f), s));
        const __m256i dn = _mm256_srai_epi32(d, 31);
        const __m256i k = _mm256_blendv_epi8(_mm256_or_si256(d, sign), _mm256_xor_si256(d, ones), dn);
        const __m256i live = _mm256_xor_si256(_mm256_cmpeq_epi32(u, _mm256_setzero_si256()), ones);
        const __m256i old = _mm256_loadu_si256((const __m256i *)(const void *)(key + i));
        _mm256_storeu_si256((__m256i *)(void *)(key + i), _mm256_max_epu32(old, _mm256_and_si256(k, live)));
    }
    keys_max_shifted_scalar(key, hk, i, n, sub);
}

__attribute__((target("avx2")))
static uint32_t max_u32_avx2(const uint32_t * key, int64_t n) {
    __m256i m = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_epu32(m, _mm256_loadu_si256((const __m256i *)(const void *)(key + i)));
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)(void *)lanes, m);
    return max_u32_scalar(lanes, 0, 8, max_u32_scalar(key, i, n, 0));
}

// ---- AVX-512F --------------------------------------------------------------

// Visible cells of an f16 mask row, sixteen at a time: compare, then compress the cell numbers.
// Writes up to 15 entries past the count (callers size out with room for them).
__attribute__((target("avx512f")))
static int64_t visible_f16_avx512(const uint16_t * m, int64_t j0, int64_t j1, int32_t * out) {
    const __m512i ninf = _mm512_set1_epi32(0xfc00), step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    int64_t nv = 0, j = j0;
    for (; j + 16 <= j1; j += 16) {
        const __m512i mv = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(m + j)));
        const __mmask16 vis = _mm512_cmpneq_epi32_mask(mv, ninf);
        _mm512_storeu_si512((void *)(out + nv), _mm512_maskz_compress_epi32(vis, idx));
        nv += __builtin_popcount((unsigned) vis);
        idx = _mm512_add_epi32(idx, step);
    }
    return nv + visible_f16_scalar(m, j, j1, out + nv);
}

__attribute__((target("avx512f")))
static int64_t block_keys_avx512(const float * qk, const float * q2v, const int32_t * cnt, const int32_t * vis, int64_t n,
        uint32_t * key) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), ones = _mm512_set1_epi32(-1);
    int64_t i = 0, nok = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i c = _mm512_loadu_si512(cnt + i), v = _mm512_loadu_si512(vis + i);
        const __m512 sc = _mm512_add_ps(_mm512_loadu_ps(qk + i),
                                        _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_sqrt_ps(_mm512_loadu_ps(q2v + i))));
        const __mmask16 ok = _mm512_cmpeq_epi32_mask(c, v) & _mm512_cmpgt_epi32_mask(c, _mm512_setzero_si512()) &
                             _mm512_cmp_ps_mask(sc, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
        const __m512i u = _mm512_castps_si512(sc);
        const __m512i k = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), _mm512_test_epi32_mask(u, sign), u, ones);
        _mm512_storeu_si512(key + i, _mm512_maskz_mov_epi32(ok, k));
        nok += __builtin_popcount((unsigned)ok);
    }
    return nok + block_keys_scalar(qk, q2v, cnt, vis, i, n, key);
}

__attribute__((target("avx512f")))
static int64_t count_ge_avx512(const uint32_t * key, int64_t n, uint32_t t) {
    const __m512i tv = _mm512_set1_epi32((int)t);
    int64_t i = 0, c = 0;
    for (; i + 16 <= n; i += 16) c += __builtin_popcount((unsigned)_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i), tv));
    return c + count_ge_scalar(key, i, n, t);
}

__attribute__((target("avx512f")))
static void keys_max_shifted_avx512(uint32_t * key, const uint32_t * hk, int64_t n, float sub) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), low = _mm512_set1_epi32(0x7fffffff), ones = _mm512_set1_epi32(-1);
    const __m512 s = _mm512_set1_ps(sub);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_loadu_si512(hk + i);
        const __m512i f = _mm512_mask_and_epi32(_mm512_xor_si512(u, ones), _mm512_test_epi32_mask(u, sign), u, low);
        const __m512i d = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(f), s));
        const __m512i k = _mm512_mask_xor_epi32(_mm512_or_si512(d, sign), _mm512_test_epi32_mask(d, sign), d, ones);
        const __m512i old = _mm512_loadu_si512(key + i);
        _mm512_storeu_si512(key + i, _mm512_max_epu32(old, _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(u, u), k)));
    }
    keys_max_shifted_scalar(key, hk, i, n, sub);
}

__attribute__((target("avx512f")))
static uint32_t max_u32_avx512(const uint32_t * key, int64_t n) {
    __m512i m = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_epu32(m, _mm512_loadu_si512(key + i));
    return max_u32_scalar(key, i, n, _mm512_reduce_max_epu32(m));
}
#endif

// ---- dispatch ----------------------------------------------------------------

int64_t ice_visible_f16(const uint16_t * m, int64_t j0, int64_t j1, int32_t * out) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) return visible_f16_avx512(m, j0, j1, out);
    if (ice_simd_level() == ICE_SIMD_AVX2) return visible_f16_avx2(m, j0, j1, out);
#endif
    return visible_f16_scalar(m, j0, j1, out);
}

int64_t ice_block_keys(const float * qk, const float * q2var, const int32_t * count, const int32_t * vis, int64_t n,
        uint32_t * key) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) return block_keys_avx512(qk, q2var, count, vis, n, key);
    if (ice_simd_level() == ICE_SIMD_AVX2) return block_keys_avx2(qk, q2var, count, vis, n, key);
#endif
    return block_keys_scalar(qk, q2var, count, vis, 0, n, key);
}

int64_t ice_count_ge_u32(const uint32_t * key, int64_t n, uint32_t t) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) return count_ge_avx512(key, n, t);
    if (ice_simd_level() == ICE_SIMD_AVX2) return count_ge_avx2(key, n, t);
#endif
    return count_ge_scalar(key, 0, n, t);
}

uint32_t ice_max_u32(const uint32_t * key, int64_t n) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) return max_u32_avx512(key, n);
    if (ice_simd_level() == ICE_SIMD_AVX2) return max_u32_avx2(key, n);
#endif
    return max_u32_scalar(key, 0, n, 0);
}

void ice_keys_max_shifted(uint32_t * key, const uint32_t * hk, int64_t n, float sub) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) { keys_max_shifted_avx512(key, hk, n, sub); return; }
    if (ice_simd_level() == ICE_SIMD_AVX2) { keys_max_shifted_avx2(key, hk, n, sub); return; }
#endif
    keys_max_shifted_scalar(key, hk, 0, n, sub);
}

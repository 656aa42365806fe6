// simd.c - dot products, axpys, f16 row conversion and exp sums, with run-time dispatch
// (ice_simd_level, shared with simd_select.c's selection kernels and simd_tiles.c's tiled dot products).
//
// x86-64 with GCC/Clang: AVX-512F and AVX2+FMA(+F16C) variants are compiled with
// target attributes and picked once with __builtin_cpu_supports. Elsewhere (aarch64,
// other compilers) only the portable loops are built; -O3 vectorises them.

#include "ice_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ICE_X86_DISPATCH 1
#include <immintrin.h>
#endif

// ---- portable -------------------------------------------------------------

static float dot_scalar(const float * a, const float * b, int64_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void axpy_scalar(float * y, float a, const float * x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void f16_scalar(float * dst, const uint16_t * src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = ice_f16_to_f32(src[i]);
}

static float dot_f16_scalar(const float * a, const uint16_t * b, int64_t n) {
    float s0 = 0, s1 = 0;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) { s0 += a[i] * ice_f16_to_f32(b[i]); s1 += a[i + 1] * ice_f16_to_f32(b[i + 1]); }
    for (; i < n; i++) s0 += a[i] * ice_f16_to_f32(b[i]);
    return s0 + s1;
}

static void axpy_f16_scalar(float * y, float a, const uint16_t * x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * ice_f16_to_f32(x[i]);
}

static float exp_sum_scalar(float * x, int64_t n, float mx) {
    float sum = 0;
    for (int64_t i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    return sum;
}

static void dots_rows_generic(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out) {
    const struct ice_rows rows = { base, t, stride };
    for (int64_t i = 0; i < cnt; i++) out[i] = ice_rows_dot(&rows, a, idx ? idx[i] : i, n);
}

static void axpys_rows_generic(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n) {
    for (int64_t i = 0; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        if (t == ICE_TYPE_F16) ice_axpy_f16(y, w[i], (const uint16_t *)(const void *)row, n);
        else ice_axpy(y, w[i], (const float *)(const void *)row, n);
    }
}

#ifdef ICE_X86_DISPATCH
// ---- AVX2 + FMA + F16C ----------------------------------------------------

__attribute__((target("avx2,fma,f16c")))
static float dot_f16_avx2(const float * a, const uint16_t * b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))),     s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8))), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * ice_f16_to_f32(b[i]);
    return s;
}

__attribute__((target("avx2,fma,f16c")))
static void axpy_f16_avx2(float * y, float a, const uint16_t * x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, xv, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * ice_f16_to_f32(x[i]);
}

__attribute__((target("avx2,fma")))
static float dot_avx2(const float * a, const float * b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),     _mm256_loadu_ps(b + i),     s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,fma")))
static void axpy_avx2(float * y, float a, const float * x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

__attribute__((target("avx2,f16c")))
static void f16_f16c(float * dst, const uint16_t * src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = ice_f16_to_f32(src[i]);
}

// exp(x) for x <= 88 as Cephes expf does it (x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative
// error about 1e-7); x below -87.3 (and -inf) gives 0. The AVX-512 version scales by 2^n with scalef.
#define ICE_EXP_POLY(FMA, SET1, r, p) do { \
        p = FMA(SET1(1.9875691500e-4f), r, SET1(1.3981999507e-3f)); \
        p = FMA(p, r, SET1(8.3334519073e-3f)); p = FMA(p, r, SET1(4.1665795894e-2f)); \
        p = FMA(p, r, SET1(1.6666665459e-1f)); p = FMA(p, r, SET1(5.0000001201e-1f)); \
    } while (0)

__attribute__((target("avx2,fma")))
static inline __m256 exp8_avx2(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p;
    ICE_EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r, p);
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

__attribute__((target("avx2,fma")))
static float exp_sum_avx2(float * x, int64_t n, float mx) {
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    float buf[8];
    _mm256_storeu_ps(buf, s);
    float sum = ((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7]));
    if (i < n) {
        float t[8] = { 0 };
        memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(buf, exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(t), vm)));
        for (int64_t j = 0; j < n - i; j++) { x[i + j] = buf[j]; sum += buf[j]; }
    }
    return sum;
}

// Batched forms for rows of 8k elements (k <= 32), as the AVX-512 ones below: the query (resp. the
// output) stays in registers across rows, eight dot products share one horizontal reduction. The
// bodies are always inlined with nc constant for head sizes 64 and 128, so the register arrays unroll.
__attribute__((target("avx2,fma,f16c")))
static inline __m256 load8(const char * row, enum ice_type t, int64_t i) {
    return t == ICE_TYPE_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + 2 * i)))
                             : _mm256_loadu_ps((const float *)(const void *)(row + 4 * i));
}

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline __m256 row_acc8(const __m256 * qa, int64_t nc, const char * row, enum ice_type t) {
    __m256 acc0 = _mm256_mul_ps(qa[0], load8(row, t, 0)), acc1 = _mm256_setzero_ps();
#pragma GCC unroll 32
    for (int64_t c = 1; c < nc; c++) {
        if (c & 1) acc1 = _mm256_fmadd_ps(qa[c], load8(row, t, 8 * c), acc1);
        else       acc0 = _mm256_fmadd_ps(qa[c], load8(row, t, 8 * c), acc0);
    }
    return _mm256_add_ps(acc0, acc1);
}

// Lane r: the sum of y[r]'s eight lanes, ((0+1)+(2+3))+((4+5)+(6+7)): eight rows' dot products share
// one horizontal reduction.
__attribute__((target("avx2"), always_inline))
static inline __m256 sum_rows8(const __m256 * y) {
    const __m256 t0 = _mm256_hadd_ps(y[0], y[1]), t1 = _mm256_hadd_ps(y[2], y[3]);
    const __m256 t2 = _mm256_hadd_ps(y[4], y[5]), t3 = _mm256_hadd_ps(y[6], y[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void dots_rows_avx2_n(const float * a, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t nc, float * out) {
    __m256 qa[32] = { 0 };
#pragma GCC unroll 32
    for (int64_t c = 0; c < nc; c++) qa[c] = _mm256_loadu_ps(a + 8 * c);
    int64_t i = 0;
    for (; i + 8 <= cnt; i += 8) {
        __m256 y[8];
        for (int r = 0; r < 8; r++) y[r] = row_acc8(qa, nc, base + (size_t)(idx ? idx[i + r] : i + r) * stride, t);
        _mm256_storeu_ps(out + i, sum_rows8(y));
    }
    for (; i < cnt; i++) {
        const __m256 s = row_acc8(qa, nc, base + (size_t)(idx ? idx[i] : i) * stride, t);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        out[i] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
}

__attribute__((target("avx2,fma,f16c")))
static void dots_rows_avx2(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out) {
    if (n == 64) dots_rows_avx2_n(a, base, stride, t, idx, cnt, 8, out);
    else if (n == 128) dots_rows_avx2_n(a, base, stride, t, idx, cnt, 16, out);
    else dots_rows_avx2_n(a, base, stride, t, idx, cnt, n / 8, out);
}

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void axpys_rows_avx2_n(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t nc) {
    __m256 acc[32] = { 0 };
#pragma GCC unroll 32
    for (int64_t c = 0; c < nc; c++) acc[c] = _mm256_loadu_ps(y + 8 * c);
    for (int64_t i = 0; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        const __m256 wv = _mm256_set1_ps(w[i]);
#pragma GCC unroll 32
        for (int64_t c = 0; c < nc; c++) acc[c] = _mm256_fmadd_ps(wv, load8(row, t, 8 * c), acc[c]);
    }
#pragma GCC unroll 32
    for (int64_t c = 0; c < nc; c++) _mm256_storeu_ps(y + 8 * c, acc[c]);
}

__attribute__((target("avx2,fma,f16c")))
static void axpys_rows_avx2(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n) {
    if (n == 64) axpys_rows_avx2_n(y, w, base, stride, t, idx, cnt, 8);
    else if (n == 128) axpys_rows_avx2_n(y, w, base, stride, t, idx, cnt, 16);
    else axpys_rows_avx2_n(y, w, base, stride, t, idx, cnt, n / 8);
}

// ---- AVX-512F --------------------------------------------------------------

__attribute__((target("avx512f")))
static float dot_avx512(const float * a, const float * b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i),      _mm512_loadu_ps(b + i),      s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx512f")))
static void axpy_avx512(float * y, float a, const float * x, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(mk, x + i), _mm512_maskz_loadu_ps(mk, y + i)));
    }
}

__attribute__((target("avx512f")))
static float dot_f16_avx512(const float * a, const uint16_t * b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i),      _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i))),      s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i + 16))), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i))), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * ice_f16_to_f32(b[i]);
    return s;
}

__attribute__((target("avx512f")))
static void axpy_f16_avx512(float * y, float a, const uint16_t * x, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, xv, _mm512_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * ice_f16_to_f32(x[i]);
}

__attribute__((target("avx512f")))
static inline __m512 exp16_avx512(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p;
    ICE_EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r, p);
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(live, p, n);
}

__attribute__((target("avx512f")))
static float exp_sum_avx512(float * x, int64_t n, float mx) {
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 s = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp16_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
        _mm512_storeu_ps(x + i, e);
        s = _mm512_add_ps(s, e);
    }
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 e = _mm512_maskz_mov_ps(mk, exp16_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), vm)));
        _mm512_mask_storeu_ps(x + i, mk, e);
        s = _mm512_add_ps(s, e);
    }
    return _mm512_reduce_add_ps(s);
}

// x *= scale and the max of the products in one pass (NaNs skipped: max_ps keeps its second operand)
__attribute__((target("avx512f")))
static float scale_max_avx512(float * x, int64_t n, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vs);
        _mm512_storeu_ps(x + i, v);
        m = _mm512_max_ps(v, m);
    }
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), vs);
        _mm512_mask_storeu_ps(x + i, mk, v);
        m = _mm512_mask_max_ps(m, mk, v, m);
    }
    return _mm512_reduce_max_ps(m);
}

// Batched forms for rows of 16k elements: the query (resp. the output) stays in registers across
// rows, and eight dot products share one horizontal reduction.
__attribute__((target("avx512f")))
static inline __m512 load16(const char * row, enum ice_type t, int64_t i) {
    return t == ICE_TYPE_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * i)))
                             : _mm512_loadu_ps((const float *)(const void *)(row + 4 * i));
}

// acc of one row: sum over its nc chunks of 16 (nc <= 16)
__attribute__((target("avx512f"), always_inline))
static inline __m512 row_acc(const __m512 * qa, int64_t nc, const char * row, enum ice_type t) {
    __m512 acc = _mm512_mul_ps(qa[0], load16(row, t, 0));
#pragma GCC unroll 16
    for (int64_t c = 1; c < nc; c++) acc = _mm512_fmadd_ps(qa[c], load16(row, t, 16 * c), acc);
    return acc;
}

__attribute__((target("avx512f")))
static inline __m256 half_sum(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// Zen 4 runs 512-bit instructions as two 256-bit halves, and converts f16 to f32 faster 256 bits at a time:
// there the row kernels below take the "ymm" forms (ice_simd_rows_ymm), which keep each lane's operations
// and their order and so give the same bits. Per 64-element f16 row from L1, one thread (a one-off
// timing program, 2026-12-07): dot products 9.6 -> 7.0 cycles, value sums 8.3 -> 5.1, value sums for 3 or 7
// heads at once 4.6 -> 4.1 per row and head; 128-element rows 18 -> 15, 16 -> 12.5, 11.5 -> 8.6. Dot
// products of other sizes keep the zmm form (the query then no longer fits the registers twice over).
#define ICE_AVX512_YMM "avx512f,avx512vl,fma,f16c"

// row_acc's two halves as two chains: lanes 0-7 of each chunk of 16 in lo, lanes 8-15 in hi; lo + hi is
// half_sum(row_acc(...)) bit for bit (qh: the query as 2*nc halves).
__attribute__((target(ICE_AVX512_YMM), always_inline))
static inline __m256 row_acc_ymm(const __m256 * qh, int64_t nc, const char * row, enum ice_type t) {
    __m256 lo = _mm256_mul_ps(qh[0], load8(row, t, 0)), hi = _mm256_mul_ps(qh[1], load8(row, t, 8));
#pragma GCC unroll 16
    for (int64_t c = 1; c < nc; c++) {
        lo = _mm256_fmadd_ps(qh[2 * c], load8(row, t, 16 * c), lo);
        hi = _mm256_fmadd_ps(qh[2 * c + 1], load8(row, t, 16 * c + 8), hi);
    }
    return _mm256_add_ps(lo, hi);
}

// The bodies are always inlined with nc constant for head sizes 64 and 128: a register array indexed
// by a run-time count lives on the stack, and the axpy accumulators then chain through store-to-load
// forwarding (measured 2-3x slower per key on Zen 4).
// ymm: the same sums with 256-bit conversions and FMAs (row_acc_ymm).
__attribute__((target(ICE_AVX512_YMM), always_inline))
static inline void dots_rows_avx512_n(const float * a, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t nc, int ymm, float * out) {
    __m512 qa[16] = { 0 };
    __m256 qh[32] = { 0 };
#pragma GCC unroll 32
    for (int64_t c = 0; c < nc; c++) {
        if (ymm) { qh[2 * c] = _mm256_loadu_ps(a + 16 * c); qh[2 * c + 1] = _mm256_loadu_ps(a + 16 * c + 8); }
        else qa[c] = _mm512_loadu_ps(a + 16 * c);
    }
    // every row summed the same way, a last partial group included (its missing rows repeat the last
    // one): a row's bits do not depend on its place in the list, so the tiled form can give the same ones
    // (ice_dots_tile_list: per lane, S_l = p_l + p_{l+8}, then ((S0+S1)+(S2+S3)) + ((S4+S5)+(S6+S7)))
    for (int64_t i = 0; i < cnt; i += 8) {
        __m256 y[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            const int64_t ir = i + r < cnt ? i + r : cnt - 1;
            const char * row = base + (size_t)(idx ? idx[ir] : ir) * stride;
            y[r] = ymm ? row_acc_ymm(qh, nc, row, t) : half_sum(row_acc(qa, nc, row, t));
        }
        const __m256 r8 = sum_rows8(y);
        if (i + 8 <= cnt) { _mm256_storeu_ps(out + i, r8); continue; }
        float tmp[8];
        _mm256_storeu_ps(tmp, r8);
        memcpy(out + i, tmp, (size_t)(cnt - i) * sizeof(float));
    }
}

__attribute__((target(ICE_AVX512_YMM)))
static void dots_rows_avx512(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out) {
    const int ymm = ice_simd_rows_ymm();
    if (n == 64 && ymm) dots_rows_avx512_n(a, base, stride, t, idx, cnt, 4, 1, out);
    else if (n == 64) dots_rows_avx512_n(a, base, stride, t, idx, cnt, 4, 0, out);
    else if (n == 128 && ymm) dots_rows_avx512_n(a, base, stride, t, idx, cnt, 8, 1, out);
    else if (n == 128) dots_rows_avx512_n(a, base, stride, t, idx, cnt, 8, 0, out);
    else dots_rows_avx512_n(a, base, stride, t, idx, cnt, n / 16, 0, out);
}

// Two accumulator sets (even and odd rows) when they fit the 32 registers, so consecutive rows do not
// wait on each other's FMA latency.
__attribute__((target("avx512f"), always_inline))
static inline void axpys_rows_avx512_n(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t nc) {
    __m512 acc[16] = { 0 }, acc2[16] = { 0 };   // initialised: only nc are used, the compiler cannot tell
#pragma GCC unroll 16
    for (int64_t c = 0; c < nc; c++) { acc[c] = _mm512_loadu_ps(y + 16 * c); acc2[c] = _mm512_setzero_ps(); }
    int64_t i = 0;
    if (nc <= 8) {
        for (; i + 2 <= cnt; i += 2) {
            const char * r0 = base + (size_t)(idx ? idx[i] : i) * stride;
            const char * r1 = base + (size_t)(idx ? idx[i + 1] : i + 1) * stride;
            const __m512 w0 = _mm512_set1_ps(w[i]), w1 = _mm512_set1_ps(w[i + 1]);
#pragma GCC unroll 8
            for (int64_t c = 0; c < nc; c++) {
                acc[c] = _mm512_fmadd_ps(w0, load16(r0, t, 16 * c), acc[c]);
                acc2[c] = _mm512_fmadd_ps(w1, load16(r1, t, 16 * c), acc2[c]);
            }
        }
    }
    for (; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        const __m512 wv = _mm512_set1_ps(w[i]);
#pragma GCC unroll 16
        for (int64_t c = 0; c < nc; c++) acc[c] = _mm512_fmadd_ps(wv, load16(row, t, 16 * c), acc[c]);
    }
#pragma GCC unroll 16
    for (int64_t c = 0; c < nc; c++) _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(acc[c], acc2[c]));
}

// axpys_rows_avx512_n's sums over 64 of the elements (y: those 64; base: their first element in row 0),
// as 8 lanes per register: pairs (n <= 128 there) takes even and odd rows in two sets of accumulators.
__attribute__((target(ICE_AVX512_YMM), always_inline))
static inline void axpys_rows_ymm64(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int pairs) {
    __m256 acc[8], acc2[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) { acc[c] = _mm256_loadu_ps(y + 8 * c); acc2[c] = _mm256_setzero_ps(); }
    int64_t i = 0;
    if (pairs) {
        for (; i + 2 <= cnt; i += 2) {
            const char * r0 = base + (size_t)(idx ? idx[i] : i) * stride;
            const char * r1 = base + (size_t)(idx ? idx[i + 1] : i + 1) * stride;
            const __m256 w0 = _mm256_set1_ps(w[i]), w1 = _mm256_set1_ps(w[i + 1]);
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                acc[c] = _mm256_fmadd_ps(w0, load8(r0, t, 8 * c), acc[c]);
                acc2[c] = _mm256_fmadd_ps(w1, load8(r1, t, 8 * c), acc2[c]);
            }
        }
    }
    for (; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        const __m256 wv = _mm256_set1_ps(w[i]);
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(wv, load8(row, t, 8 * c), acc[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(y + 8 * c, _mm256_add_ps(acc[c], acc2[c]));
}

__attribute__((target(ICE_AVX512_YMM)))
static void axpys_rows_avx512(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n) {
    if (n % 64 == 0 && ice_simd_rows_ymm()) {
        for (int64_t d = 0; d < n; d += 64) axpys_rows_ymm64(y + d, w, base + d * (int64_t)ice_type_size(t), stride, t, idx, cnt, n <= 128);
        return;
    }
    if (n == 64) axpys_rows_avx512_n(y, w, base, stride, t, idx, cnt, 4);
    else if (n == 128) axpys_rows_avx512_n(y, w, base, stride, t, idx, cnt, 8);
    else axpys_rows_avx512_n(y, w, base, stride, t, idx, cnt, n / 16);
}

// Weighted sums of the same rows for na outputs (na * nc <= 16 accumulators), each row loaded and
// converted once for all of them. Output j's sum is one FMA chain in row order whatever na is.
__attribute__((target("avx512f"), always_inline))
static inline void axpys_multi_avx512_n(float * y, int64_t na, const float * w, int64_t wstride, const char * base,
        size_t stride, enum ice_type t, const int32_t * idx, int64_t cnt, int64_t nc) {
    __m512 acc[16] = { 0 };
    for (int64_t j = 0; j < na; j++) for (int64_t c = 0; c < nc; c++) acc[j * nc + c] = _mm512_loadu_ps(y + j * 16 * nc + 16 * c);
    for (int64_t i = 0; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        __m512 x[16] = { 0 };   // initialised: only nc are used, the compiler cannot tell
#pragma GCC unroll 16
        for (int64_t c = 0; c < nc; c++) x[c] = load16(row, t, 16 * c);
#pragma GCC unroll 4
        for (int64_t j = 0; j < na; j++) {
            const __m512 wv = _mm512_set1_ps(w[j * wstride + i]);
#pragma GCC unroll 16
            for (int64_t c = 0; c < nc; c++) acc[j * nc + c] = _mm512_fmadd_ps(wv, x[c], acc[j * nc + c]);
        }
    }
    for (int64_t j = 0; j < na; j++) for (int64_t c = 0; c < nc; c++) _mm512_storeu_ps(y + j * 16 * nc + 16 * c, acc[j * nc + c]);
}

// axpys_multi_avx512_n's sums over 64 of the elements for m <= 3 outputs (y_j: y + j*ystride, its 64;
// base: their first element in row 0), 8 lanes per register.
__attribute__((target(ICE_AVX512_YMM), always_inline))
static inline void axpys_multi_ymm64(float * y, int64_t ystride, int64_t m, const float * w, int64_t wstride,
        const char * base, size_t stride, enum ice_type t, const int32_t * idx, int64_t cnt) {
    __m256 acc[24] = { 0 };
    for (int64_t j = 0; j < m; j++) for (int c = 0; c < 8; c++) acc[j * 8 + c] = _mm256_loadu_ps(y + j * ystride + 8 * c);
    for (int64_t i = 0; i < cnt; i++) {
        const char * row = base + (size_t)(idx ? idx[i] : i) * stride;
        __m256 wv[3] = { 0 };
#pragma GCC unroll 3
        for (int64_t j = 0; j < m; j++) wv[j] = _mm256_set1_ps(w[j * wstride + i]);
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m256 x = load8(row, t, 8 * c);
#pragma GCC unroll 3
            for (int64_t j = 0; j < m; j++) acc[j * 8 + c] = _mm256_fmadd_ps(wv[j], x, acc[j * 8 + c]);
        }
    }
    for (int64_t j = 0; j < m; j++) for (int c = 0; c < 8; c++) _mm256_storeu_ps(y + j * ystride + 8 * c, acc[j * 8 + c]);
}

// Head sizes 64 (four outputs a pass) and 128 (two) unrolled with constant counts; others one at a time.
// The ymm forms: three outputs a pass, 64 elements at a time.
__attribute__((target(ICE_AVX512_YMM)))
static void axpys_multi_avx512(float * y, int64_t na, const float * w, int64_t wstride, const char * base, size_t stride,
        enum ice_type t, const int32_t * idx, int64_t cnt, int64_t n) {
    if (n % 64 == 0 && ice_simd_rows_ymm()) {
        for (int64_t j0 = 0; j0 < na; j0 += 3) {
            const int64_t m = na - j0 < 3 ? na - j0 : 3;
            for (int64_t d = 0; d < n; d += 64) {
                float * yj = y + j0 * n + d;
                const float * wj = w + j0 * wstride;
                const char * bd = base + d * (int64_t)ice_type_size(t);
                if (m == 3) axpys_multi_ymm64(yj, n, 3, wj, wstride, bd, stride, t, idx, cnt);
                else if (m == 2) axpys_multi_ymm64(yj, n, 2, wj, wstride, bd, stride, t, idx, cnt);
                else axpys_multi_ymm64(yj, n, 1, wj, wstride, bd, stride, t, idx, cnt);
            }
        }
        return;
    }
    const int64_t per = n == 64 ? 4 : n == 128 ? 2 : 1;
    for (int64_t j0 = 0; j0 < na; j0 += per) {
        const int64_t m = na - j0 < per ? na - j0 : per;
        float * yj = y + j0 * n;
        const float * wj = w + j0 * wstride;
        if (n == 64 && m == 4) axpys_multi_avx512_n(yj, 4, wj, wstride, base, stride, t, idx, cnt, 4);
        else if (n == 64 && m == 3) axpys_multi_avx512_n(yj, 3, wj, wstride, base, stride, t, idx, cnt, 4);
        else if (n == 64) axpys_multi_avx512_n(yj, m, wj, wstride, base, stride, t, idx, cnt, 4);
        else if (n == 128 && m == 2) axpys_multi_avx512_n(yj, 2, wj, wstride, base, stride, t, idx, cnt, 8);
        else if (n == 128) axpys_multi_avx512_n(yj, 1, wj, wstride, base, stride, t, idx, cnt, 8);
        else axpys_multi_avx512_n(yj, 1, wj, wstride, base, stride, t, idx, cnt, n / 16);
    }
}
#endif

// ---- dispatch ----------------------------------------------------------------

static int g_level = ICE_SIMD_UNSET;
static int g_rows_ymm = 0;

#ifdef ICE_X86_DISPATCH
#include <cpuid.h>
// The CPU's display family (CPUID leaf 1: base family, plus the extended family when it is 0xf).
static unsigned cpu_family(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned base = (a >> 8) & 0xf;
    return base == 0xf ? base + ((a >> 20) & 0xff) : base;
}
#endif

int ice_simd_level(void) {
    int lvl = __atomic_load_n(&g_level, __ATOMIC_RELAXED);
    if (lvl != ICE_SIMD_UNSET) return lvl;
    lvl = ICE_SIMD_SCALAR;
#ifdef ICE_X86_DISPATCH
    __builtin_cpu_init();
    const char * env = getenv("ICEFORMER_SIMD");   // "scalar" / "avx2" caps the level (tests)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) lvl = ICE_SIMD_AVX2;
    // avx512vl: the ymm forms use the 32 vector registers (every AVX-512 CPU but Xeon Phi has it)
    if (lvl == ICE_SIMD_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) lvl = ICE_SIMD_AVX512;
    if (env && strcmp(env, "scalar") == 0) lvl = ICE_SIMD_SCALAR;
    if (env && strcmp(env, "avx2") == 0 && lvl > ICE_SIMD_AVX2) lvl = ICE_SIMD_AVX2;
    // the ymm row forms on AMD family 19h (Zen 4: the AVX-512 CPUs of that family) unless the environment
    // names a form; elsewhere the zmm ones, unmeasured against them
    int ymm = __builtin_cpu_is("amd") && cpu_family() == 0x19;
    if (env && strcmp(env, "avx512") == 0) ymm = 0;
    if (env && strcmp(env, "avx512-ymm") == 0) ymm = 1;
    __atomic_store_n(&g_rows_ymm, lvl == ICE_SIMD_AVX512 && ymm, __ATOMIC_RELAXED);
#endif
    __atomic_store_n(&g_level, lvl, __ATOMIC_RELAXED);
    return lvl;
}

int ice_simd_rows_ymm(void) {
    ice_simd_level();
    return __atomic_load_n(&g_rows_ymm, __ATOMIC_RELAXED);
}

const char * ice_simd_name(void) {
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: return ice_simd_rows_ymm() ? "avx512-ymm" : "avx512";
        case ICE_SIMD_AVX2:   return "avx2";
        default:         return "scalar";
    }
}

float ice_dot(const float * a, const float * b, int64_t n) {
#ifdef ICE_X86_DISPATCH
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: return dot_avx512(a, b, n);
        case ICE_SIMD_AVX2:   return dot_avx2(a, b, n);
        default: break;
    }
#endif
    return dot_scalar(a, b, n);
}

void ice_axpy(float * y, float a, const float * x, int64_t n) {
#ifdef ICE_X86_DISPATCH
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: axpy_avx512(y, a, x, n); return;
        case ICE_SIMD_AVX2:   axpy_avx2(y, a, x, n); return;
        default: break;
    }
#endif
    axpy_scalar(y, a, x, n);
}

void ice_f16_row_to_f32(float * dst, const uint16_t * src, int64_t n) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() >= ICE_SIMD_AVX2) { f16_f16c(dst, src, n); return; }
#endif
    f16_scalar(dst, src, n);
}

float ice_dot_f16(const float * a, const uint16_t * b, int64_t n) {
#ifdef ICE_X86_DISPATCH
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: return dot_f16_avx512(a, b, n);
        case ICE_SIMD_AVX2:   return dot_f16_avx2(a, b, n);
        default: break;
    }
#endif
    return dot_f16_scalar(a, b, n);
}

void ice_axpy_f16(float * y, float a, const uint16_t * x, int64_t n) {
#ifdef ICE_X86_DISPATCH
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: axpy_f16_avx512(y, a, x, n); return;
        case ICE_SIMD_AVX2:   axpy_f16_avx2(y, a, x, n); return;
        default: break;
    }
#endif
    axpy_f16_scalar(y, a, x, n);
}

// The batched kernels take the AVX-512 path for rows of 16..256 elements in multiples of 16 and the
// AVX2 path for 8..256 in multiples of 8 (head sizes); other sizes and CPUs loop over the single-row
// kernels.
static int batched_avx512(int64_t n) {
#ifdef ICE_X86_DISPATCH
    return ice_simd_level() == ICE_SIMD_AVX512 && n % 16 == 0 && n >= 16 && n <= 256;
#else
    (void) n;
    return 0;
#endif
}

static int batched_avx2(int64_t n) {
#ifdef ICE_X86_DISPATCH
    return ice_simd_level() == ICE_SIMD_AVX2 && n % 8 == 0 && n >= 8 && n <= 256;
#else
    (void) n;
    return 0;
#endif
}

void ice_dots_rows(const float * a, const char * base, size_t stride, enum ice_type t, const int32_t * idx,
        int64_t cnt, int64_t n, float * out) {
#ifdef ICE_X86_DISPATCH
    if (batched_avx512(n)) { dots_rows_avx512(a, base, stride, t, idx, cnt, n, out); return; }
    if (batched_avx2(n)) { dots_rows_avx2(a, base, stride, t, idx, cnt, n, out); return; }
#endif
    dots_rows_generic(a, base, stride, t, idx, cnt, n, out);
}

void ice_axpys_rows_multi(float * y, int64_t na, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n) {
#ifdef ICE_X86_DISPATCH
    if (batched_avx512(n)) { axpys_multi_avx512(y, na, w, cnt, base, stride, t, idx, cnt, n); return; }
#endif
    for (int64_t j = 0; j < na; j++) ice_axpys_rows(y + j * n, w + j * cnt, base, stride, t, idx, cnt, n);
}

void ice_axpys_rows(float * y, const float * w, const char * base, size_t stride, enum ice_type t,
        const int32_t * idx, int64_t cnt, int64_t n) {
#ifdef ICE_X86_DISPATCH
    if (batched_avx512(n)) { axpys_rows_avx512(y, w, base, stride, t, idx, cnt, n); return; }
    if (batched_avx2(n)) { axpys_rows_avx2(y, w, base, stride, t, idx, cnt, n); return; }
#endif
    axpys_rows_generic(y, w, base, stride, t, idx, cnt, n);
}

float ice_exp_sum(float * x, int64_t n, float mx) {
#ifdef ICE_X86_DISPATCH
    switch (ice_simd_level()) {
        case ICE_SIMD_AVX512: return exp_sum_avx512(x, n, mx);
        case ICE_SIMD_AVX2:   return exp_sum_avx2(x, n, mx);
        default: break;
    }
#endif
    return exp_sum_scalar(x, n, mx);
}

float ice_scale_max(float * x, int64_t n, float scale) {
#ifdef ICE_X86_DISPATCH
    if (ice_simd_level() == ICE_SIMD_AVX512) return scale_max_avx512(x, n, scale);
#endif
    for (int64_t i = 0; i < n; i++) x[i] *= scale;
    return ice_max(x, n);
}

float ice_max(const float * x, int64_t n) {
    // four independent maxima: the loop is not one long dependency chain
    float m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY, m3 = -INFINITY;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        m0 = x[i] > m0 ? x[i] : m0; m1 = x[i + 1] > m1 ? x[i + 1] : m1;
        m2 = x[i + 2] > m2 ? x[i + 2] : m2; m3 = x[i + 3] > m3 ? x[i + 3] : m3;
    }
    for (; i < n; i++) m0 = x[i] > m0 ? x[i] : m0;
    m0 = m1 > m0 ? m1 : m0; m2 = m3 > m2 ? m3 : m2;
    return m2 > m0 ? m2 : m0;
}

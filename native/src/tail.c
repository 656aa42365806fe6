// tail.c - block-summary estimate of the keys a row does not attend exactly.
//
// Block b holds the cells [b*B, (b+1)*B): their count, mean key and key variance in fp16 (the ranking
// rows of the block search) and, while the tail estimate is on, their key and value sums in f32.
// For a row, the "rest" of a block is its visible points outside the exact union U. The rest
// enters the softmax as one logit z_b = scale * q.mean_k_rest + log(n_rest) with value
// mean_v_rest: n_rest * exp(scale q.mean_k) approximates the sum of the rest's exp(scores).
// A block fully visible to the row uses its sums minus the union's keys and values; a block
// the mask cuts (causal boundary, other sequences, empty cells) is summed over its visible rest directly.

#include "attn_internal.h"

#define ICE_LOG_TABLE 1025
static float ice_log_table[ICE_LOG_TABLE];   // ice_log_table[n] = logf(n), filled by ice_tail_init_tables

void ice_tail_init_tables(void) {
    for (int n = 1; n < ICE_LOG_TABLE; n++) ice_log_table[n] = logf((float) n);
}


void ice_tail_block(struct ice_head * h, const struct ice_kv * kv, int64_t b, float * krow) {
    const int64_t B = h->B, dk = h->d_k, dv = h->d_v;
    const int64_t c0 = b * B, c1 = (b + 1) * B < h->n_kv ? (b + 1) * B : h->n_kv;
    float * sum = krow + dk, * var = krow + 2 * dk, * vs = h->has_sums ? h->bv + b * dv : NULL;
    memset(sum, 0, (size_t)dk * sizeof(float));
    memset(var, 0, (size_t)dk * sizeof(float));
    if (vs) memset(vs, 0, (size_t)dv * sizeof(float));
    h->bcount[b] = (int32_t)(c1 - c0);
    // always the same order of additions, so an updated block equals a rebuilt one bit for bit
    for (int64_t c = c0; c < c1; c++) {
        const char * kp = kv->k + (size_t)c * kv->k_nb1;
        if (kv->kt == ICE_TYPE_F16) ice_axpy_f16(sum, 1.0f, (const uint16_t *)(const void *)kp, dk);
        else ice_axpy(sum, 1.0f, (const float *)(const void *)kp, dk);
        if (vs) ice_kv_axpy(kv, vs, 1.0f, c);
    }
    // per-dimension variance around the block mean (the spread term of the block score)
    const float inv = 1.0f / (float)(c1 - c0);
    for (int64_t c = c0; c < c1; c++) {
        const char * kp = kv->k + (size_t)c * kv->k_nb1;
        if (kv->kt == ICE_TYPE_F16) ice_f16_row_to_f32(krow, (const uint16_t *)(const void *)kp, dk);
        else memcpy(krow, kp, (size_t)dk * sizeof(float));
        for (int64_t d = 0; d < dk; d++) { const float x = krow[d] - sum[d] * inv; var[d] += x * x; }
    }
    for (int64_t d = 0; d < dk; d++) {
        h->rmean[ice_tile_at(b, d, dk)] = ice_f32_to_f16_sat(sum[d] * inv);
        h->rvar[ice_tile_at(b, d, dk)] = ice_f32_to_f16_sat(var[d] * inv);
    }
    if (h->has_sums) memcpy(h->bk + b * dk, sum, (size_t)dk * sizeof(float));
}

// The k-th largest (1 <= k <= n) of key[0..n), found bit by bit from the top with counting passes
// (no data-dependent branches; cheaper here than a quickselect whose comparisons mispredict). The
// low 16 bits are resolved among the keys that share the top 16 only (few): scratch holds n keys.
static uint32_t kth_largest_key(const uint32_t * key, int64_t n, int64_t k, uint32_t * scratch) {
    uint32_t t = 0;
    for (int bit = 31; bit >= 16; bit--) {
        if (ice_count_ge_u32(key, n, t | (1u << bit)) >= k) t |= 1u << bit;
    }
    // keys above t's 16-bit bucket are all among the k largest; the rest is chosen within the bucket
    k -= ice_count_ge_u32(key, n, t + 0x10000u);   // t + 0x10000 cannot wrap: some key above it would exceed 2^32
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) if ((key[i] >> 16) == (t >> 16)) scratch[m++] = key[i];
    for (int bit = 15; bit >= 0; bit--) {
        if (ice_count_ge_u32(scratch, m, t | (1u << bit)) >= k) t |= 1u << bit;
    }
    return t;
}

int ice_block_scores(const struct ice_head * h, struct ice_thread * th, const float * q, int64_t na) {
    const int64_t nb = h->n_blocks, dk = h->d_k;
    if (ICE_RESERVE(&th->bqk, &th->bqk_cap, na * nb + 1, 0) || ICE_RESERVE(&th->bsp, &th->bsp_cap, na * nb + 1, 0) ||
        ICE_RESERVE(&th->q2, &th->q2_cap, na * dk, 0)) return -1;
    for (int64_t i = 0; i < na * dk; i++) th->q2[i] = q[i] * q[i];
    // two passes over the tiled fp16 ranking rows, each tile read once for all na queries
    ice_dots_tiles(q, na, h->rmean, nb, dk, th->bqk);
    ice_dots_tiles(th->q2, na, h->rvar, nb, dk, th->bsp);
    return 0;
}

// Group keys: each head's block scores relative to its best fully visible block, the best of them per
// block (a block near the top for any head of the group ranks high). hk: nb scratch; mx: na floats out.
static int64_t group_keys(const struct ice_head * h, const int32_t * bcnt, int64_t na, const float * bqk,
        const float * bsp, uint32_t * key, uint32_t * hk, float * mx) {
    const int64_t nb = h->n_blocks;
    memset(key, 0, (size_t)nb * sizeof *key);
    for (int64_t j = 0; j < na; j++) {
        mx[j] = 0.0f;
        if (ice_block_keys(bqk + j * nb, bsp + j * nb, h->bcount, bcnt, nb, hk) == 0) continue;
        mx[j] = ice_key_score(ice_max_u32(hk, nb));
        ice_keys_max_shifted(key, hk, nb, mx[j]);
    }
    int64_t n_ok = 0;
    for (int64_t b = 0; b < nb; b++) n_ok += key[b] != 0;
    return n_ok;
}

// Whether the blocks with key >= t (t >= 1), with the union, reach every head's need of estimated mass.
static bool mass_met(const uint32_t * key, int64_t nb, uint32_t t, const float * w, const float * need, int64_t na) {
    for (int64_t a = 0; a < na; a++) {
        if (need[a] <= 0.0f) continue;
        const float * wa = w + a * nb;
        float s = 0.0f;
        for (int64_t b = 0; b < nb; b++) s += key[b] >= t ? wa[b] : 0.0f;
        if (s < need[a]) return false;
    }
    return true;
}

// Top-p budget: the number of blocks, taken in ranking order, whose estimated softmax mass together with
// the union's (sinks, window, top-k) reaches top_p of the row's estimated total for every head of the
// group. A block's mass is estimated from its summaries, to second order (keys Gaussian per dimension):
//   sum over its n visible keys of exp(s q.k)  ~=  n exp(s q.mean + s^2 q^2.var / 2)
// so a head whose mass sits in the window needs no block, and a diffuse head needs many. Covered blocks
// count by the share of their visible cells the union holds. The threshold is found bit by bit from the
// top over the ranking keys' upper 16 bits (coarser than the keys: it can only take a few blocks more).
// Returns 0..n_ok; the caller caps it at top_blocks.
static int64_t mass_blocks(const struct ice_head * h, struct ice_thread * th, int64_t na, float scale, float top_p,
        const float * bqk, const float * bsp, const uint32_t * key, const int32_t * cov) {
    const int64_t nb = h->n_blocks;
    const int32_t * bcnt = th->vis_bcnt;
    if (ICE_RESERVE(&th->bmass, &th->bmass_cap, na * nb + na, 0)) return -1;
    float * w = th->bmass, * need = th->bmass + na * nb;
    const float half_s2 = 0.5f * scale * scale;
    bool any = false;
    for (int64_t a = 0; a < na; a++) {
        float * wa = w + a * nb;
        float mx = -INFINITY;
        for (int64_t b = 0; b < nb; b++) {
            const int32_t n = bcnt[b];
            wa[b] = n > 0 ? scale * bqk[a * nb + b] + half_s2 * bsp[a * nb + b] +
                            (n < ICE_LOG_TABLE ? ice_log_table[n] : logf((float)n)) : -INFINITY;
            if (wa[b] > mx) mx = wa[b];
        }
        need[a] = 0.0f;
        if (!(mx > -INFINITY && mx < INFINITY)) continue;   // nothing visible, or a score overflowed
        const float z = ice_exp_sum(wa, nb, mx);            // wa[b] = exp(e_b - mx)
        float covered = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            if (cov[b] <= 0) continue;
            const float share = cov[b] >= bcnt[b] ? 1.0f : (float)cov[b] / (float)bcnt[b];
            covered += wa[b] * share;
            wa[b] -= wa[b] * share;   // choosing the block adds only its cells outside the union
        }
        need[a] = top_p * z - covered;
        any |= need[a] > 0.0f;
    }
    if (!any) return 0;
    uint32_t t = 0;
    for (int bit = 31; bit >= 16; bit--) {
        const uint32_t c = t | (1u << bit);
        if (mass_met(key, nb, c, w, need, na)) t = c;
    }
    return ice_count_ge_u32(key, nb, t > 0 ? t : 1u);
}

// The block of cell c: a shift for blocks of 2^bsh cells (bsh >= 0), else a division (one per union cell
// and pass, where the divisions measured a quarter of the block selection's time).
static inline int64_t block_of(int32_t c, int64_t B, int bsh) {
    return bsh >= 0 ? (int64_t)(c >> bsh) : c / B;
}

// Zeroes the counts of the union's blocks again (cov is all zero between calls).
static void clear_cov(int32_t * cov, const int32_t * uni, int64_t nu, int64_t B, int bsh) {
    for (int64_t i = 0; i < nu; i++) cov[block_of(uni[i], B, bsh)] = 0;
}

int64_t ice_block_select(const struct ice_head * h, const struct ice_kv * kv, struct ice_thread * th, int32_t n_sel,
        int32_t n_min, float top_p, float share, float scale, int64_t na, const float * q, const float * bqk,
        const float * bsp, const int32_t * uni, int64_t nu, uint32_t gen, int32_t * out) {
    const int64_t nb = h->n_blocks, B = h->B;
    const int bsh = (B & (B - 1)) == 0 ? __builtin_ctzll((unsigned long long)B) : -1;   // blocks of 2^bsh: shifts
    if (ICE_RESERVE(&th->bcov, &th->bcov_cap, nb + 1, 2) || ICE_RESERVE(&th->bkey, &th->bkey_cap, 3 * (nb + 1) + na, 0)) return -1;
    const int32_t * bcnt = th->vis_bcnt;
    // per block, its score as an ordered key, 0 where it cannot be chosen. The optimistic score of a fully
    // visible block is the mean key's score plus two standard deviations of q.k within the block, so a
    // spread-out block that may hold one strong key is not ranked below a tight one (measured: +0.4 to
    // +1.4 points of top-1 agreement at equal cost on the bundled model)
    uint32_t * key = th->bkey;
    float * mx = (float *)(void *)(th->bkey + 3 * (nb + 1));
    int64_t n_ok = na == 1 ? ice_block_keys(bqk, bsp, h->bcount, bcnt, nb, key)
                           : group_keys(h, bcnt, na, bqk, bsp, key, key + 2 * (nb + 1), mx);
    // a block the mask cuts is ranked by its best visible key, never by keys the row may not see
    for (int64_t j = 0; j < th->n_partial; j++) {
        const int32_t b = th->partial[j];
        float best = -INFINITY;
        for (int64_t a = 0; a < na; a++) {
            for (int32_t c = (int32_t)(b * B); c < (int32_t)(b * B) + h->bcount[b]; c++) {
                if (!ice_mask_visible(th->vis_mtype, th->vis_mrow, c)) continue;
                const float s = ice_kv_dot(kv, q + a * h->d_k, c) - (na == 1 ? 0.0f : mx[a]);
                if (s > best) best = s;
            }
        }
        key[b] = best > -INFINITY ? ice_score_key(best) : 0u;   // was 0: the row does not see it whole
        n_ok += key[b] != 0;
    }
    // fully visible blocks the union already covers (sinks, window, top-k) have nothing to add
    int32_t * cov = th->bcov;   // all zero between calls
    for (int64_t i = 0; i < nu; i++) cov[block_of(uni[i], B, bsh)]++;
    for (int64_t i = 0; i < nu; i++) {
        const int64_t b = block_of(uni[i], B, bsh);
        if (cov[b] == h->bcount[b] && bcnt[b] == h->bcount[b] && key[b] != 0) { key[b] = 0; n_ok--; }
    }
    if (share > 0.0f) {
        // a budget that grows with the context: at least `share` of the blocks this row can choose
        const int64_t want = (int64_t)ceil((double)share * (double)n_ok);
        if (want > n_sel) n_sel = (int32_t)want;
    }
    if (top_p > 0.0f && n_ok > 0) {
        // adaptive budget: as many blocks as the estimated mass asks for, from n_min up to n_sel
        const int64_t want = mass_blocks(h, th, na, scale, top_p, bqk, bsp, key, cov);
        if (want < 0) { clear_cov(cov, uni, nu, B, bsh); return -1; }
        const int64_t lo = want > n_min ? want : n_min;
        n_sel = (int32_t)(lo < n_sel ? lo : n_sel);
        if (n_sel == 0) { clear_cov(cov, uni, nu, B, bsh); return 0; }
    }
    // the n_sel best (ties: lower block first), emitted in block order so the cells are read in order
    uint32_t thr = 1;       // every eligible block
    int64_t ties = nb;
    if (n_ok > n_sel) {
        thr = kth_largest_key(key, nb, n_sel, key + nb + 1);
        ties = n_sel;
        for (int64_t b = 0; b < nb; b++) ties -= key[b] > thr;
    }
    int64_t added = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (!(key[b] > thr || (key[b] == thr && ties-- > 0))) continue;
        const int32_t n_b = h->bcount[b];   // a local: out may alias bcount as far as the compiler knows
        const bool cut = bcnt[b] != n_b;
        const int32_t c0 = (int32_t)(b * B);
        if (!cut && cov[b] == 0) {
            // fully visible and disjoint from the union: every cell, unstamped (stamps are read
            // later only for the blocks the mask cuts)
            for (int32_t i = 0; i < n_b; i++) out[added + i] = c0 + i;
            added += n_b;
            continue;
        }
        for (int32_t c = c0; c < c0 + n_b; c++) {
            if (th->stamp[c] == gen || (cut && !ice_mask_visible(th->vis_mtype, th->vis_mrow, c))) continue;
            th->stamp[c] = gen;
            out[added++] = c;
        }
    }
    clear_cov(cov, uni, nu, B, bsh);
    return added;
}

int ice_tail_row(const struct ice_head * h, const struct ice_kv * kv, struct ice_thread * th, float scale,
        const float * q, const int32_t * uni, int64_t nu, float * sc, float * o) {
    const int64_t nb = h->n_blocks, dk = h->d_k, dv = h->d_v, B = h->B;
    if (ICE_RESERVE(&th->w, &th->w_cap, 3 * nb + 1, 0) || ICE_RESERVE(&th->tmp, &th->tmp_cap, nu + 1, 0)) return -1;
    float * rest = th->w;            // n_rest per block
    float * qs   = th->w + nb;       // q . (sum of rest keys), then z_b
    float * coef = th->w + 2 * nb;   // P_b / n_rest
    const uint32_t gen = th->gen;
    const int32_t * bcnt = th->vis_bcnt;
    // q . (key sum) from the exact f32 sums: the union's keys are subtracted from them below
    ice_dots_rows(q, (const char *)h->bk, (size_t)dk * sizeof(float), ICE_TYPE_F32, NULL, nb, dk, qs);
    for (int64_t b = 0; b < nb; b++) {
        rest[b] = (float)bcnt[b];
        if (!(bcnt[b] > 0 && bcnt[b] == h->bcount[b])) qs[b] = 0.0f;
    }
    for (int64_t i = 0; i < nu; i++) {
        const int64_t b = uni[i] / B;
        rest[b] -= 1.0f;
        if (bcnt[b] == h->bcount[b]) qs[b] -= th->qk[i];   // q.k of union point i, from forward_row
    }
    // partial blocks: sum the visible rest directly, visiting only the blocks the mask cuts
    for (int64_t j = 0; j < th->n_partial; j++) {
        const int32_t b = th->partial[j];
        for (int32_t c = (int32_t)(b * B); c < (int32_t)(b * B) + h->bcount[b]; c++) {
            if (th->stamp[c] != gen && ice_mask_visible(th->vis_mtype, th->vis_mrow, c)) qs[b] += ice_kv_dot(kv, q, c);
        }
    }
    float mx = ice_max(sc, nu);
    for (int64_t b = 0; b < nb; b++) {
        if (rest[b] > 0.5f) {
            const int32_t r = (int32_t) rest[b];   // a whole count; log of small counts is tabled
            qs[b] = scale * qs[b] / rest[b] + (r < ICE_LOG_TABLE ? ice_log_table[r] : logf(rest[b]));
            if (qs[b] > mx) mx = qs[b];
        }
    }
    float sum = ice_exp_sum(sc, nu, mx);
    for (int64_t b = 0; b < nb; b++) {
        if (rest[b] > 0.5f) { coef[b] = expf(qs[b] - mx); sum += coef[b]; coef[b] /= rest[b]; }
        else coef[b] = 0.0f;
    }
    memset(o, 0, (size_t)dv * sizeof(float));
    float * wgt = th->tmp;
    for (int64_t i = 0; i < nu; i++) {
        const int64_t b = uni[i] / B;
        wgt[i] = sc[i] - (bcnt[b] == h->bcount[b] ? coef[b] : 0.0f);
    }
    ice_kv_axpys(kv, o, wgt, uni, nu);
    // fully visible blocks: their value sums, weighted (rest = 0 here: the partial blocks below)
    for (int64_t b = 0; b < nb; b++) rest[b] = bcnt[b] == h->bcount[b] ? coef[b] : 0.0f;
    ice_axpys_rows(o, rest, (const char *)h->bv, (size_t)dv * sizeof(float), ICE_TYPE_F32, NULL, nb, dv);
    for (int64_t j = 0; j < th->n_partial; j++) {
        const int32_t b = th->partial[j];
        if (coef[b] == 0.0f) continue;
        for (int32_t c = (int32_t)(b * B); c < (int32_t)(b * B) + h->bcount[b]; c++) {
            if (th->stamp[c] != gen && ice_mask_visible(th->vis_mtype, th->vis_mrow, c)) ice_kv_axpy(kv, o, coef[b], c);
        }
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < dv; d++) o[d] *= inv;
    return 0;
}

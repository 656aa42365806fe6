// attn_dense.c - io validation and exact dense attention read straight from the views.

#include "attn_internal.h"

static int view_ok(const struct ice_view * v) {
    if (!v->data) return 0;
    if (v->type != ICE_TYPE_F32 && v->type != ICE_TYPE_F16) return 0;
    for (int i = 0; i < 4; i++) if (v->ne[i] <= 0) return 0;
    return 1;
}

// Global stream of view stream 0: the lowest stream among the written cells (llama.cpp's views
// start at the ubatch's first stream).
static int64_t io_stream0(const struct ice_attn_io * io) {
    if (!io->written || io->n_written <= 0 || io->stream_cells <= 0) return 0;
    int64_t s0 = INT64_MAX;
    for (int64_t i = 0; i < io->n_written; i++) {
        if (io->written[i] < 0) continue;
        const int64_t s = io->written[i] / io->stream_cells;
        if (s < s0) s0 = s;
    }
    return s0 == INT64_MAX ? 0 : s0;
}

enum ice_status ice_attn_check_io(const struct ice_attn_io * io, struct ice_dims * dm, bool need_out) {
    if (!io) return ICE_STATUS_INVALID_ARG;
    if (!view_ok(&io->q) || !view_ok(&io->k) || !view_ok(&io->v) || !view_ok(&io->mask)) {
        return ICE_STATUS_INVALID_ARG;
    }
    if (need_out && !view_ok(&io->out)) return ICE_STATUS_INVALID_ARG;
    if (io->q.type != ICE_TYPE_F32 || (need_out && io->out.type != ICE_TYPE_F32)) return ICE_STATUS_UNSUPPORTED;
    if (!isfinite(io->scale)) return ICE_STATUS_INVALID_ARG;
    dm->d_k = io->q.ne[0]; dm->n_tok = io->q.ne[1]; dm->n_head = io->q.ne[2]; dm->n_stream = io->q.ne[3];
    dm->d_v = io->v.ne[0]; dm->n_kv = io->k.ne[1]; dm->n_head_kv = io->k.ne[2];
    if (io->k.ne[0] != dm->d_k || io->k.ne[3] != dm->n_stream) return ICE_STATUS_INVALID_ARG;
    if (io->v.ne[1] != dm->n_kv || io->v.ne[2] != dm->n_head_kv || io->v.ne[3] != dm->n_stream) return ICE_STATUS_INVALID_ARG;
    if (dm->n_head % dm->n_head_kv != 0) return ICE_STATUS_INVALID_ARG;
    dm->gqa = dm->n_head / dm->n_head_kv;
    if (io->mask.ne[0] < dm->n_kv || io->mask.ne[1] < dm->n_tok || io->mask.ne[2] != 1 ||
        (io->mask.ne[3] != 1 && io->mask.ne[3] != dm->n_stream)) {
        return ICE_STATUS_INVALID_ARG;
    }
    if (io->mask.nb[0] != ice_type_size(io->mask.type)) return ICE_STATUS_UNSUPPORTED;   // rows must be contiguous
    if (io->k.nb[0] != ice_type_size(io->k.type)) return ICE_STATUS_UNSUPPORTED;         // keys are read as rows
    if (io->written && (io->n_written < 0 || io->stream_cells < dm->n_kv)) return ICE_STATUS_INVALID_ARG;
    dm->stream0 = io_stream0(io);
    if (!need_out) return ICE_STATUS_OK;   // prepare never writes the output
    const struct ice_view * o = &io->out;
    if (o->ne[0] != dm->d_v || o->ne[1] != dm->n_head || o->ne[2] != dm->n_tok || o->ne[3] != dm->n_stream) {
        return ICE_STATUS_INVALID_ARG;
    }
    if (o->nb[0] != 4 || o->nb[1] != 4 * (size_t)o->ne[0] || o->nb[2] != o->nb[1] * (size_t)o->ne[1] ||
        o->nb[3] != o->nb[2] * (size_t)o->ne[2]) {
        return ICE_STATUS_INVALID_ARG;
    }
    if (dm->n_kv > INT32_MAX / 2 || dm->d_k > (1 << 16) || dm->d_v > (1 << 16)) return ICE_STATUS_UNSUPPORTED;
    return ICE_STATUS_OK;
}

enum ice_status ice_attn_dense(const struct ice_attn_io * io, int ith, int nth) {
    struct ice_dims dm;
    if (nth < 1 || ith < 0 || ith >= nth) return ICE_STATUS_INVALID_ARG;
    enum ice_status st = ice_attn_check_io(io, &dm, true);
    if (st != ICE_STATUS_OK) return st;
    const int64_t G = dm.gqa, dk = dm.d_k, dv = dm.d_v, n_kv = dm.n_kv;
    float * q   = malloc((size_t)(G * dk) * sizeof(float));
    float * kr  = malloc((size_t)(dk + dv) * sizeof(float));
    float * sc  = malloc((size_t)(G * n_kv) * sizeof(float));
    int32_t * vis = malloc((size_t)n_kv * sizeof(int32_t));
    float * mx  = malloc((size_t)(2 * G) * sizeof(float));
    if (!q || !kr || !sc || !vis || !mx) {
        free(q); free(kr); free(sc); free(vis); free(mx);
        return ICE_STATUS_NO_MEMORY;
    }
    float * vr = kr + dk;
    float * sum = mx + G;
    // units: (stream, token, kv head) groups, round-robin over threads
    const int64_t n_units = dm.n_stream * dm.n_tok * dm.n_head_kv;
    for (int64_t u = ith; u < n_units; u += nth) {
        const int64_t hk = u % dm.n_head_kv;
        const int64_t t  = (u / dm.n_head_kv) % dm.n_tok;
        const int64_t s  = u / (dm.n_head_kv * dm.n_tok);
        const void * mrow = ice_mask_row(io, t, s);
        int64_t nv = 0;
        for (int64_t j = 0; j < n_kv; j++) if (ice_mask_visible(io->mask.type, mrow, j)) vis[nv++] = (int32_t)j;
        for (int64_t g = 0; g < G; g++) {
            ice_view_load_row(&io->q, t, hk * G + g, s, q + g * dk);
            mx[g] = -INFINITY; sum[g] = 0;
            float * o = ice_out_row(io, s, t, hk * G + g);
            memset(o, 0, (size_t)dv * sizeof(float));
        }
        if (nv == 0) continue;
        for (int64_t i = 0; i < nv; i++) {
            const int64_t j = vis[i];
            ice_view_load_row(&io->k, j, hk, s, kr);
            const float mv = ice_mask_value(io->mask.type, mrow, j);
            for (int64_t g = 0; g < G; g++) {
                const float x = io->scale * ice_dot(q + g * dk, kr, dk) + mv;
                sc[g * n_kv + i] = x;
                if (x > mx[g]) mx[g] = x;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float * sg = sc + g * n_kv;
            float acc = 0;
            for (int64_t i = 0; i < nv; i++) { sg[i] = expf(sg[i] - mx[g]); acc += sg[i]; }
            sum[g] = acc;
        }
        for (int64_t i = 0; i < nv; i++) {
            ice_view_load_row(&io->v, vis[i], hk, s, vr);
            for (int64_t g = 0; g < G; g++) ice_axpy(ice_out_row(io, s, t, hk * G + g), sc[g * n_kv + i], vr, dv);
        }
        for (int64_t g = 0; g < G; g++) {
            float * o = ice_out_row(io, s, t, hk * G + g);
            const float inv = 1.0f / sum[g];
            for (int64_t d = 0; d < dv; d++) o[d] *= inv;
        }
    }
    free(q); free(kr); free(sc); free(vis); free(mx);
    return ICE_STATUS_OK;
}

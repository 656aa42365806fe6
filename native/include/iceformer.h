// iceformer.h - IceFormer embedded k-NN sparse attention for CPU inference.
//
// This library is free of llama.cpp and ggml. It offers two things:
//
//  1. An index API (hnswlib/faiss shape) for maximum-inner-product search:
//     ICE_INDEX_DCI is Prioritized DCI (Li and Malik) over the IceFormer embedding
//       key k -> [k ; sqrt(M^2 - |k|^2)], query q -> [q/|q| ; 0]
//     so the nearest embedded key is the key with the largest q.k;
//     ICE_INDEX_EXACT is a brute-force index with the same API: the oracle in tests.
//
//  2. An attention op that llama.cpp's graph calls through ggml_custom_4d, on
//     ggml's own threads (ith of nth). Each query attends exactly (one softmax) to
//     the union of the first n_sinks visible keys, the last `window` visible keys,
//     its top-k keys from the index (k-NN search, top_k > 0) and every visible key of
//     the top_blocks blocks of block_size cells with the best score (coarse block
//     search), optionally plus an estimate of the remaining keys from block
//     summaries (the "tail").
//
// Layouts. Tensors are described by struct ice_view, which mirrors ggml's: ne[0]
// is the fastest-varying dimension, nb[i] is the stride of dimension i in bytes.
// Plain pointer arguments are row-major: "keys: n*dim floats" means key i starts
// at keys + i*dim.
//
// Usage of the index:
//   struct ice_index_params p = ice_index_default_params();
//   p.dim = 64;
//   struct ice_index * idx;
//   if (ice_index_init(&p, &idx) != ICE_STATUS_OK) ...;
//   ice_index_add(idx, n, keys, NULL);           // ids 0..n-1
//   ice_index_search(idx, q, 20, NULL, labels, scores, &n_found);
//   ice_index_free(idx);
//
// Usage of the attention op (what the llama.cpp patch does per layer):
//   struct ice_attn_params ap = ice_attn_default_params();
//   struct ice_attn_scratch * sc; ice_attn_scratch_init(&sc);     // once: the layers' working memory
//   struct ice_attn_state * st;  ice_attn_state_init_shared(&ap, sc, &st);   // once per layer
//   // per graph evaluation, two ops in order (ggml runs them on its threads):
//   ice_attn_prepare(st, &io, ith, nth);   // builds (or, persistent, updates) per-KV-head summaries/indices
//   ice_attn_forward(st, &io, ith, nth);   // answers every (query row, head)
//   ice_attn_state_free(st);   // every state, then
//   ice_attn_scratch_free(sc);
//
// Status codes, never global error state; ice_status_str() names each code.

#ifndef ICEFORMER_H
#define ICEFORMER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ICE_API_VERSION 1

enum ice_status {
    ICE_STATUS_OK              = 0,
    ICE_STATUS_INVALID_ARG     = 1, // a pointer is NULL, a size is out of range, shapes disagree
    ICE_STATUS_NO_MEMORY       = 2, // an allocation failed; the object is unchanged
    ICE_STATUS_UNSUPPORTED     = 3, // the operation or tensor type is not supported by this index/op
    ICE_STATUS_NOT_FOUND       = 4, // remove: no such id
    ICE_STATUS_DUPLICATE_ID    = 5, // add: the id is already stored
};

const char * ice_status_str(enum ice_status status);

// The SIMD variant the kernels use in this process: "avx512", "avx512-ymm" (AVX-512 with the gathered
// rows converted 256 bits at a time, same results; AMD Zen 4), "avx2" or "scalar". Picked once from the
// CPU; the environment variable ICEFORMER_SIMD=avx512|avx512-ymm|avx2|scalar forces the AVX-512 form or
// caps the level (tests of every variant).
const char * ice_simd_name(void);

// Element types of tensors passed through struct ice_view.
enum ice_type {
    ICE_TYPE_F32 = 0,
    ICE_TYPE_F16 = 1, // IEEE half, as ggml stores the KV cache
};

// ---------------------------------------------------------------------------
// Index: maximum inner product search.
// ---------------------------------------------------------------------------

enum ice_index_kind {
    ICE_INDEX_DCI   = 0, // Prioritized DCI over the IceFormer embedding (approximate)
    ICE_INDEX_EXACT = 1, // brute force over all stored keys (exact; the oracle)
};

struct ice_index;   // opaque

struct ice_index_params {
    enum ice_index_kind kind; // which index
    int32_t  dim;             // dimension of keys and queries as the caller sees them (before embedding)
    int32_t  n_composite;     // DCI: L, number of composite indices
    int32_t  n_simple;        // DCI: m, simple (random projection) indices per composite index
    int32_t  visit_budget;    // DCI: max keys visited per composite index per query; 0 = automatic (m * max(16k, n/8))
    int32_t  retrieve_budget; // DCI: max candidates scored exactly per query; 0 = automatic (uncapped)
    uint64_t seed;            // DCI: seed of the random projections
};

struct ice_index_params ice_index_default_params(void);

// Visibility filter for a search: key id `i` is visible iff mask[i] is not -INFINITY
// (this is a row of llama.cpp's KQ mask). Ids >= n are not visible. NULL filter: all visible.
struct ice_filter {
    const void *  mask; // n elements of `type`
    enum ice_type type;
    int64_t       n;
};

// Creates an empty index. *out is owned by the caller and released with ice_index_free.
enum ice_status ice_index_init(const struct ice_index_params * params, struct ice_index ** out);

// Adds n keys. keys: n*dim floats. ids: n ids >= 0, or NULL for ids size()..size()+n-1.
// The keys are copied; the caller's buffers may be reused after the call.
enum ice_status ice_index_add(struct ice_index * index, int64_t n, const float * keys, const int64_t * ids);

// Finds up to k stored keys with the largest inner product with `query` (dim floats)
// among those visible through `filter` (may be NULL).
// labels: k ids, padded with -1; scores: k floats (q.k, unembedded), padded with -INFINITY;
// both sorted by decreasing score. *n_found receives the number of real results (<= k).
// Thread-safe against other searches on the same index (no writes to the index).
enum ice_status ice_index_search(
        const struct ice_index * index, const float * query, int32_t k, const struct ice_filter * filter,
        int64_t * labels, float * scores, int32_t * n_found);

// Removes one key by id. Returns ICE_STATUS_NOT_FOUND when absent.
enum ice_status ice_index_remove(struct ice_index * index, int64_t id);

// Number of keys stored.
int64_t ice_index_size(const struct ice_index * index);

// Bytes of memory the index holds (for memory reports).
size_t ice_index_memory(const struct ice_index * index);

void ice_index_free(struct ice_index * index);

// ---------------------------------------------------------------------------
// Attention op.
// ---------------------------------------------------------------------------

struct ice_attn_params {
    int32_t  top_k;           // keys retrieved by k-NN search per query and head
    int32_t  n_sinks;         // S: the first S visible keys are always attended (attention sinks)
    int32_t  window;          // W: the last W visible keys are always attended (recent window)
    int32_t  block_size;      // B: keys per block summary (coarse block search and tail estimate)
    int32_t  min_n_kv;        // rows with fewer visible keys than this run exact dense attention
    int32_t  n_composite;     // DCI L
    int32_t  n_simple;        // DCI m
    int32_t  visit_budget;    // DCI keys visited per composite index per query; 0 = automatic
    int32_t  retrieve_budget; // DCI candidates scored exactly per query; 0 = automatic
    int32_t  top_blocks;      // coarse search: the top_blocks blocks (block_size consecutive cells) with the
                              // largest q . mean key + 2 sd have all their visible keys attended exactly; 0 = off
    int32_t  min_blocks;      // top_p > 0: the fewest blocks a row attends (capped by top_blocks)
    float    top_p;           // 0 = off: every row attends top_blocks blocks. In (0, 1]: a row attends the
                              // fewest top-ranked blocks (min_blocks..top_blocks) whose estimated softmax
                              // mass, with the sinks' and window's, reaches top_p of its estimated total for
                              // every query head; a block's mass is estimated from its summaries to second
                              // order: n exp(scale q.mean + scale^2 q^2.var / 2)
    float    block_share;     // 0 = off. In (0, 1]: a row attends at least this share (rounded up) of the
                              // blocks it can choose, so its budget grows with the context; top_blocks is
                              // then the fewest it attends (top_p, if on, chooses at most this many)
    uint64_t seed;            // DCI projection seed
    bool     exact_search;    // use the brute-force index instead of DCI (oracle / debugging)
    bool     tail_estimate;   // add the block-summary estimate of keys not attended exactly
    bool     persistent;      // keep block summaries and the DCI index across evaluations, updating only
                              // what io->written names (needs io->epoch_*); false: rebuild on every call
    bool     group_blocks;    // the query heads sharing a KV head (GQA group) attend the same top_blocks
                              // blocks, chosen by the best of their scores (each head's relative to its
                              // best block), so each chosen block is read once for the group
};

// Defaults (README, "Results"; docs/results.md): the coarse block search, top_blocks 240 of block_size 16 per
// GQA group with window 128: on natural text (prose and code) at 4k and 8k tokens, within +1% perplexity of
// dense and 1.5 points of top-1 of llama.cpp's own floor on SmolLM2-135M and Qwen2.5-Coder-0.5B (160 blocks
// missed on one document at 8k; 80, the earlier default chosen on copy-heavy docstrings, missed on most).
// block_share 0.625: past about 6k keys a row attends at least 5/8 of the blocks it can choose, because a
// fixed count did not hold at 16k on Qwen2.5-Coder-0.5B (240 blocks: 2.9 points of top-1 below the floor;
// shares 0.4 / 0.5: 2.7 / 1.8; 5/8: 0.7). group_blocks: the heads of a GQA group share their blocks (80 shared
// blocks matched or beat 64 per head at 1k-8k while each group reads a sixth fewer keys); blocks of 16 beat
// blocks of 32 at the same number of keys attended. top_p 0 (a fixed count): the top-p budget lost to it at
// equal keys attended. top_k 0: Prioritized DCI k-NN search (top_k > 0) is kept, but on 2 cores it made a
// 4k-token prefill 3.6x slower than dense while the block search made it faster. DCI settings when it is
// used: L = 4, m = 1 (m = 1 beat m = 2 at equal visits on synthetic keys), automatic budgets (each simple
// index walks max(16 top_k, n/8) keys; candidates uncapped). tail_estimate false: with the block search it
// bought no agreement and cost 10-20% of speed.
// Rows whose visible keys fit in n_sinks + window, or number fewer than min_n_kv, run dense.
struct ice_attn_params ice_attn_default_params(void);

// A strided tensor view, as ggml describes tensors: ne[0] fastest, nb[] in bytes.
struct ice_view {
    void *        data;
    enum ice_type type;
    int64_t       ne[4];
    size_t        nb[4];
};

// Inputs and output of one attention evaluation (one layer, one ubatch).
//   q:    F32,     ne = [d_k, n_tokens, n_head,    n_stream]
//   k:    F16/F32, ne = [d_k, n_kv,     n_head_kv, n_stream]
//   v:    F16/F32, ne = [d_v, n_kv,     n_head_kv, n_stream]  (a transposed cache is passed with its nb swapped)
//   mask: F16/F32, ne = [n_kv, >= n_tokens, 1, n_stream or 1]; 0 = visible, -INFINITY = hidden
//   out:  F32,     ne = [d_v, n_head, n_tokens, n_stream], contiguous
// n_head must be a multiple of n_head_kv (GQA: query head h reads KV head h / (n_head/n_head_kv)).
struct ice_attn_io {
    struct ice_view q;
    struct ice_view k;
    struct ice_view v;
    struct ice_view mask;
    struct ice_view out;
    float           scale;  // multiplies q.k before the softmax
    // Persistence (prepare only; all zero: the state is rebuilt from the views on every call).
    // The caller numbers its cache's versions with increasing integers: epoch_after != 0 is the version
    // this evaluation creates (greater than any earlier one), and epoch_before the version since which
    // nothing changed the cache's cells but evaluations through this op that listed their writes.
    // The state of a (stream, KV head) last updated at version e continues incrementally when
    // epoch_before <= e < epoch_after (only the blocks of the written cells are recomputed and the DCI
    // index updated); otherwise (the cache was edited, shifted, reloaded, or written without this op)
    // it is rebuilt from the views. So a stream untouched by some evaluations keeps its state across
    // them: raise epoch_before past e to invalidate.
    const int64_t * written;        // n_written cells this evaluation writes, as llama.cpp's k_idxs:
                                    // global stream * stream_cells + cell; the lowest stream is view stream 0
    int64_t         n_written;
    int64_t         stream_cells;   // cells per stream in the cache (ids in `written`); >= k.ne[1]
    uint64_t        epoch_before;
    uint64_t        epoch_after;
};

struct ice_attn_state;    // opaque: per-layer indices and block summaries (and scratch, unless shared)
struct ice_attn_scratch;  // opaque: per-thread working memory of prepare and forward

// Working memory that the states of several layers can share. Its size follows the context and the
// thread count, not the layer count: one per layer would cost more than the summaries it serves. For
// evaluations of many rows (prefill) it also holds one layer's keys copied into tiles (2 bytes per key
// element of every KV head), which prepare writes and the same layer's forward reads.
// States sharing one scratch must never run prepare or forward at the same time (the layers of one
// llama.cpp graph run one node after another), and the scratch must outlive them.
enum ice_status ice_attn_scratch_init(struct ice_attn_scratch ** out);
// Bytes held by the scratch.
size_t ice_attn_scratch_memory(const struct ice_attn_scratch * scratch);
void ice_attn_scratch_free(struct ice_attn_scratch * scratch);

// Creates the per-layer state with scratch of its own. Owned by the caller; release with ice_attn_state_free.
enum ice_status ice_attn_state_init(const struct ice_attn_params * params, struct ice_attn_state ** out);
// The same, borrowing `scratch` (NULL: scratch of its own, as ice_attn_state_init).
enum ice_status ice_attn_state_init_shared(const struct ice_attn_params * params, struct ice_attn_scratch * scratch,
        struct ice_attn_state ** out);

// Replaces the parameters (between evaluations only).
enum ice_status ice_attn_state_set_params(struct ice_attn_state * state, const struct ice_attn_params * params);

// Phase 1 of one evaluation: builds or updates the per-KV-head search structures for `io`.
// Called by every thread ith in [0, nth); must complete on all threads before phase 2 starts
// (llama.cpp guarantees this by making phase 2 a graph node that depends on phase 1).
enum ice_status ice_attn_prepare(struct ice_attn_state * state, const struct ice_attn_io * io, int ith, int nth);

// Phase 2: writes io->out. The work is split over threads ith of nth by (token, GQA group): the query
// heads of one KV head are answered together (in one pass over their cells when they attend the same
// ones: group_blocks, or no block search, and no k-NN search or tail estimate; otherwise, without the tail
// estimate, the heads take turns over chunks of their own cells, so a chunk is read once). With fewer groups than
// 2*nth, a group's two halves of cells may fall to two threads, and whichever finishes second writes
// its rows (no barrier: the threads may run concurrently or one after another, but all nth must be
// called for each io). The output does not depend on nth.
enum ice_status ice_attn_forward(struct ice_attn_state * state, const struct ice_attn_io * io, int ith, int nth);

// Exact dense attention with the same io (the reference path; also used for dense layers
// and for rows below min_n_kv). Needs no state.
enum ice_status ice_attn_dense(const struct ice_attn_io * io, int ith, int nth);

// Bytes held by the state: indices, summaries, and its scratch unless borrowed (count a shared scratch
// once, with ice_attn_scratch_memory).
size_t ice_attn_state_memory(const struct ice_attn_state * state);

// What forward attended, summed over its calls since the state was created: the cost of a setting
// measured in keys (deterministic, unlike a timing). Read between evaluations.
struct ice_attn_counts {
    int64_t n_rows;      // (query row, query head) pairs answered by ice_attn_forward
    int64_t n_attended;  // keys those rows attended exactly (dense rows: all their visible keys)
    int64_t n_visible;   // keys visible to those rows (what dense attention would read)
};

enum ice_status ice_attn_state_counts(const struct ice_attn_state * state, struct ice_attn_counts * out);

void ice_attn_state_free(struct ice_attn_state * state);

#ifdef __cplusplus
}
#endif

#endif // ICEFORMER_H

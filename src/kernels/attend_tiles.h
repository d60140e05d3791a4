/* The online-softmax loop every attention kernel shares; each ISA supplies its row dot product
 * and row axpy for one KV type. Included only by the attention kernels. */
#ifndef QMIX_KERNELS_ATTEND_TILES_H
#define QMIX_KERNELS_ATTEND_TILES_H

#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

/* An ISA's pieces: dequantize one row of dim values of type kv (never F32) into float32, the dot
 * product of a query with a float32 row, and out += Σ_j p[j]·row_j over cnt float32 rows ld floats
 * apart, accumulated in j order for every element (so a register-blocked version rounds as a
 * row-by-row one does). */
typedef void (*kv_deq_fn)(qmix_kv_type kv, const uint8_t *row, float *out, int64_t dim);
typedef float (*kv_dot_fn)(const float *q, const float *row, int64_t dim);
typedef void (*kv_acc_fn)(const float *p, int cnt, const float *rows, size_t ld, float *out,
                          int64_t dim);

/* A tile's cnt rows as float32: in place for an F32 cache (rows are 4-byte aligned there), else
 * widened into buf once for all the queries (exact: a float16 scale times a small integer fits a
 * float32's mantissa). Returns the first row; *ld_floats the distance between rows. */
static inline __attribute__((always_inline)) const float *
tile_f32(qmix_kv_type kv, const uint8_t *rows, size_t ld, int cnt, float *buf, int64_t dim,
         kv_deq_fn deq, size_t *ld_floats)
{
    if (kv == QMIX_KV_F32) {
        *ld_floats = ld / sizeof(float);
        return (const float *)(const void *)rows;
    }
    for (int j = 0; j < cnt; j++) deq(kv, rows + (size_t)j * ld, buf + (size_t)j * dim, dim);
    *ld_floats = (size_t)dim;
    return buf;
}

/* Tile by tile, for every query: the tile's scores, then the running maximum m, the running
 * denominator l and the output accumulated so far rescaled by exp(m_old − m_new) when the
 * maximum grows (the flash-attention recurrence), so no score outlives its tile. The queries
 * share each tile of keys and values while it is in L1/L2 (a prefill's rows and a GQA group's
 * heads read the cache once, not once each; a quantized tile is widened once). Each query's
 * arithmetic is the same whatever the other queries: tiles start at multiples of QK_ATTN_TILE,
 * keys are taken in order, and every row is widened the same way. always_inline with constant kv
 * and pieces: each caller gets a loop specialised for one type. */
static inline __attribute__((always_inline)) void
attend_tiles(qmix_kv_type kv, int nq, const float *const *q, float *const *out, const int64_t *n,
             const void *keys, const void *values, size_t ld, int64_t dim, float scale,
             float *scratch, kv_deq_fn deq, kv_dot_fn dot, kv_acc_fn acc)
{
    const uint8_t *k = keys, *v = values;
    float *score = scratch, *m = scratch + (size_t)nq * QK_ATTN_TILE, *l = m + nq, *buf = l + nq;
    int64_t n_max = 0;
    for (int i = 0; i < nq; i++) {
        m[i] = -INFINITY;
        l[i] = 0;
        memset(out[i], 0, (size_t)dim * sizeof *out[i]);
        n_max = n[i] > n_max ? n[i] : n_max;
    }
    for (int64_t t0 = 0; t0 < n_max; t0 += QK_ATTN_TILE) {
        int cnt = n_max - t0 < QK_ATTN_TILE ? (int)(n_max - t0) : QK_ATTN_TILE;
        size_t rl;
        const float *rows = tile_f32(kv, k + (size_t)t0 * ld, ld, cnt, buf, dim, deq, &rl);
        for (int i = 0; i < nq; i++) {
            float *si = score + i * QK_ATTN_TILE, tile_max = -INFINITY;
            int lim = n[i] - t0 < cnt ? (int)(n[i] - t0) : cnt;
            for (int j = 0; j < lim; j++) {
                si[j] = scale * dot(q[i], rows + (size_t)j * rl, dim);
                tile_max = si[j] > tile_max ? si[j] : tile_max;
            }
            if (lim <= 0) continue;
            if (tile_max > m[i]) {
                float corr = expf(m[i] - tile_max); /* 0 on the first tile (m = -inf) */
                l[i] *= corr;
                for (int64_t d = 0; d < dim; d++) out[i][d] *= corr;
                m[i] = tile_max;
            }
            for (int j = 0; j < lim; j++) {
                si[j] = expf(si[j] - m[i]);
                l[i] += si[j];
            }
        }
        rows = tile_f32(kv, v + (size_t)t0 * ld, ld, cnt, buf, dim, deq, &rl);
        for (int i = 0; i < nq; i++) {
            int lim = n[i] - t0 < cnt ? (int)(n[i] - t0) : cnt;
            if (lim > 0) acc(score + i * QK_ATTN_TILE, lim, rows, rl, out[i], dim);
        }
    }
    for (int i = 0; i < nq; i++) {
        float inv = 1.0f / l[i];
        for (int64_t d = 0; d < dim; d++) out[i][d] *= inv;
    }
}

/* One specialised loop per type. */
static inline __attribute__((always_inline)) void
attend_dispatch(qmix_kv_type kv, int nq, const float *const *q, float *const *out,
                const int64_t *n, const void *keys, const void *values, size_t ld, int64_t dim,
                float scale, float *scratch, kv_deq_fn deq, kv_dot_fn dot, kv_acc_fn acc)
{
#define ATTEND(T)                                                                                  \
    attend_tiles(T, nq, q, out, n, keys, values, ld, dim, scale, scratch, deq, dot, acc)
    switch (kv) {
    case QMIX_KV_F16: ATTEND(QMIX_KV_F16); break;
    case QMIX_KV_Q8_0: ATTEND(QMIX_KV_Q8_0); break;
    case QMIX_KV_Q4_0: ATTEND(QMIX_KV_Q4_0); break;
    default: ATTEND(QMIX_KV_F32); break;
    }
#undef ATTEND
}

static inline float kv_block_scale(const uint8_t *block)
{
    uint16_t h;
    memcpy(&h, block, 2);
    return qk_f16_to_f32(h);
}

#define KV_Q8_BLOCK_BYTES (2 + QK_KV_BLOCK)
#define KV_Q4_BLOCK_BYTES (2 + QK_KV_BLOCK / 2)

#endif

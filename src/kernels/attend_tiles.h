/* The online-softmax loop every attention kernel shares; each ISA supplies its row dot product
 * and row axpy for one KV type. Included only by the attention kernels. */
#ifndef QMIX_KERNELS_ATTEND_TILES_H
#define QMIX_KERNELS_ATTEND_TILES_H

#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

typedef float (*kv_dot_fn)(qmix_kv_type kv, const float *q, const uint8_t *row, int64_t dim);
typedef void (*kv_axpy_fn)(qmix_kv_type kv, float a, const uint8_t *row, float *acc, int64_t dim);

/* Tile by tile: the tile's scores, then the running maximum m, the running denominator l and the
 * output accumulated so far rescaled by exp(m_old − m_new) when the maximum grows (the flash-
 * attention recurrence), so no score outlives its tile. always_inline with constant kv, dot and
 * axpy: each caller gets a loop specialised for one type. */
static inline __attribute__((always_inline)) void
attend_tiles(qmix_kv_type kv, const float *q, const void *keys, const void *values, size_t ld,
             int64_t n, int64_t dim, float scale, float *scratch, float *out, kv_dot_fn dot,
             kv_axpy_fn axpy)
{
    const uint8_t *k = keys, *v = values;
    float m = -INFINITY, l = 0;
    memset(out, 0, (size_t)dim * sizeof *out);
    for (int64_t t0 = 0; t0 < n; t0 += QK_ATTN_TILE) {
        int cnt = n - t0 < QK_ATTN_TILE ? (int)(n - t0) : QK_ATTN_TILE;
        float tile_max = -INFINITY;
        for (int j = 0; j < cnt; j++) {
            scratch[j] = scale * dot(kv, q, k + (size_t)(t0 + j) * ld, dim);
            tile_max = scratch[j] > tile_max ? scratch[j] : tile_max;
        }
        if (tile_max > m) {
            float corr = expf(m - tile_max); /* 0 on the first tile (m = -inf) */
            l *= corr;
            for (int64_t d = 0; d < dim; d++) out[d] *= corr;
            m = tile_max;
        }
        for (int j = 0; j < cnt; j++) {
            float p = expf(scratch[j] - m);
            l += p;
            axpy(kv, p, v + (size_t)(t0 + j) * ld, out, dim);
        }
    }
    float inv = 1.0f / l;
    for (int64_t d = 0; d < dim; d++) out[d] *= inv;
}

/* One specialised loop per type. */
static inline __attribute__((always_inline)) void
attend_dispatch(qmix_kv_type kv, const float *q, const void *keys, const void *values, size_t ld,
                int64_t n, int64_t dim, float scale, float *scratch, float *out, kv_dot_fn dot,
                kv_axpy_fn axpy)
{
    switch (kv) {
    case QMIX_KV_F16:
        attend_tiles(QMIX_KV_F16, q, keys, values, ld, n, dim, scale, scratch, out, dot, axpy);
        break;
    case QMIX_KV_Q8_0:
        attend_tiles(QMIX_KV_Q8_0, q, keys, values, ld, n, dim, scale, scratch, out, dot, axpy);
        break;
    case QMIX_KV_Q4_0:
        attend_tiles(QMIX_KV_Q4_0, q, keys, values, ld, n, dim, scale, scratch, out, dot, axpy);
        break;
    default:
        attend_tiles(QMIX_KV_F32, q, keys, values, ld, n, dim, scale, scratch, out, dot, axpy);
        break;
    }
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

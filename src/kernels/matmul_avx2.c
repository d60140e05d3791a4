/* AVX2 matmul: tiles of up to 4 weight rows × 2 tokens (16 ymm registers), weights widened to
 * float32 in registers. The column tail goes through zero-padded copies. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kernels_impl.h"

#define LANES 8

static inline __attribute__((always_inline)) __m256 widen(const void *p, qmix_dtype dt)
{
    if (dt == QMIX_F32) return _mm256_loadu_ps(p);
    __m128i h = _mm_loadu_si128(p);
    if (dt == QMIX_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void tile(int R, int T, qmix_dtype dt,
                                                       const uint8_t *w, size_t row_bytes,
                                                       const float *x, int64_t ldx, int64_t cols,
                                                       float *y, int64_t ldy)
{
    const size_t esz = dt == QMIX_F32 ? 4 : 2;
    __m256 acc[8][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= cols; k += LANES) {
        /* decode: fetch the next block of rows (see the AVX-512 kernel for why) */
        if (T == 1 && ((size_t)k * esz) % 64 == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(w + (size_t)(R + r) * row_bytes + (size_t)k * esz),
                             _MM_HINT_T0);
        __m256 wv[8];
        for (int r = 0; r < R; r++) wv[r] = widen(w + (size_t)r * row_bytes + k * esz, dt);
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    if (k < cols) {
        size_t rest = (size_t)(cols - k);
        uint8_t wbuf[8][LANES * 4] = {{0}};
        float xbuf[LANES] = {0};
        __m256 wv[8];
        for (int r = 0; r < R; r++) {
            memcpy(wbuf[r], w + (size_t)r * row_bytes + k * esz, rest * esz);
            wv[r] = widen(wbuf[r], dt);
        }
        for (int t = 0; t < T; t++) {
            memcpy(xbuf, x + t * ldx + k, rest * sizeof(float));
            __m256 xv = _mm256_loadu_ps(xbuf);
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + r] = hsum(acc[r][t]);
}

typedef void (*tile_fn)(const uint8_t *w, size_t row_bytes, const float *x, int64_t ldx,
                        int64_t cols, float *y, int64_t ldy);

#define TILE(R, T, DT, NAME)                                                                     \
    static void tile_##NAME##_##R##x##T(const uint8_t *w, size_t rb, const float *x, int64_t ldx, \
                                        int64_t cols, float *y, int64_t ldy)                     \
    {                                                                                            \
        tile(R, T, DT, w, rb, x, ldx, cols, y, ldy);                                             \
    }
#define TILES(DT, NAME)                                                                          \
    TILE(1, 1, DT, NAME) TILE(1, 2, DT, NAME) TILE(2, 1, DT, NAME) TILE(2, 2, DT, NAME)          \
    TILE(3, 1, DT, NAME) TILE(3, 2, DT, NAME) TILE(4, 1, DT, NAME) TILE(4, 2, DT, NAME)          \
    TILE(8, 1, DT, NAME)                                                                         \
    static const tile_fn tiles_##NAME[4][2] = {{tile_##NAME##_1x1, tile_##NAME##_1x2},           \
                                               {tile_##NAME##_2x1, tile_##NAME##_2x2},           \
                                               {tile_##NAME##_3x1, tile_##NAME##_3x2},           \
                                               {tile_##NAME##_4x1, tile_##NAME##_4x2}};

TILES(QMIX_F32, f32)
TILES(QMIX_BF16, bf16)
TILES(QMIX_F16, f16)

static void run(const tile_fn tiles[4][2], tile_fn tile8x1, const qk_mat *w, int64_t row_begin,
                int64_t row_end, const float *x, int n, int64_t ldx, float *y, int64_t ldy)
{
    const uint8_t *base = w->data;
    for (int t0 = 0; t0 < n; t0 += QK_TOKEN_CHUNK) {
        int tn = n - t0 < QK_TOKEN_CHUNK ? n - t0 : QK_TOKEN_CHUNK;
        int64_t r = row_begin;
        if (tn == 1) /* decode: more rows in flight to keep memory busy */
            for (; r + 8 <= row_end; r += 8)
                tile8x1(base + (size_t)r * w->row_bytes, w->row_bytes, x + (int64_t)t0 * ldx, ldx,
                        w->cols, y + (int64_t)t0 * ldy + r, ldy);
        for (; r < row_end; r += 4) {
            int R = row_end - r < 4 ? (int)(row_end - r) : 4;
            for (int t = 0; t < tn; t += 2) {
                int T = tn - t < 2 ? tn - t : 2;
                int64_t tt = t0 + t;
                tiles[R - 1][T - 1](base + (size_t)r * w->row_bytes, w->row_bytes, x + tt * ldx,
                                    ldx, w->cols, y + tt * ldy + r, ldy);
            }
        }
    }
}

void qk_matmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                    int64_t ldx, float *y, int64_t ldy)
{
    switch (w->dtype) {
    case QMIX_F32: run(tiles_f32, tile_f32_8x1, w, row_begin, row_end, x, n, ldx, y, ldy); break;
    case QMIX_BF16: run(tiles_bf16, tile_bf16_8x1, w, row_begin, row_end, x, n, ldx, y, ldy); break;
    case QMIX_F16: run(tiles_f16, tile_f16_8x1, w, row_begin, row_end, x, n, ldx, y, ldy); break;
    case QMIX_U32: qk_qmatmul_avx2(w, row_begin, row_end, x, n, ldx, y, ldy); break;
    case QMIX_U8: qk_gmatmul_avx2(w, row_begin, row_end, x, n, ldx, y, ldy); break;
    default: qk_matmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy); break;
    }
}

/* AVX-512 VNNI + VBMI quantized matrix × int8 vector for the widths whose codes straddle bytes
 * (3, 5, 6 bits; reference: qmatvec_q8.c). Eight consecutive B-bit codes fill exactly B bytes,
 * so 64 codes are 8·B bytes: one vpermb gives each quadword the B bytes of its eight codes, one
 * vpmultishiftqb moves code k of a quadword (bit offset k·B) into byte k, a mask drops the bits
 * above it, and vpdpbusd multiplies the bytes with int8 activations in their natural order. Lane j
 * then sums codes 4j..4j+3 of one 32-block of x, closed with s_group·d_block as in the VNNI
 * kernel. */
#include <string.h>

#include "kernels/q8_avx512.h"

#define SPAN 64 /* codes per step */
#define MAX_SPANS (QK_Q8_MAX_COLS / SPAN)

/* x quantized once per thread while calls bring the same values (as in the VNNI kernel). */
typedef struct xcache {
    int64_t cols;
    int group_size;
    float x[QK_Q8_MAX_COLS];
    int8_t xq[QK_Q8_MAX_COLS] __attribute__((aligned(64)));
    float dl[MAX_SPANS * 16];   /* d of the 32-block each lane covers */
    float gsum[QK_Q8_MAX_COLS / 32 + 16];
} xcache;

static _Thread_local xcache cache;

static void prepare(xcache *c, const float *x, int64_t cols, int gs)
{
    float d[QK_Q8_MAX_COLS / 32];
    qk_quantize_x_q8(x, cols, gs, c->xq, d, c->gsum);
    memset(c->gsum + cols / gs, 0, 16 * sizeof(float));
    for (int64_t s = 0; s < cols / SPAN; s++)
        for (int j = 0; j < 16; j++) c->dl[s * 16 + j] = d[(s * SPAN + 4 * j) / 32];
    memcpy(c->x, x, (size_t)cols * sizeof *x);
    c->cols = cols;
    c->group_size = gs;
}

/* The per-call constants: lane → group offset, and the byte gather / bit offsets of a width. */
typedef struct consts {
    __m512i pat, pidx, sidx;
} consts;

static inline __attribute__((always_inline)) void rows(int B, int R, const qk_mat *w, int64_t r0,
                                                       const xcache *c, const consts *k, float *y)
{
    const int gs = w->group_size;
    const int64_t ng = w->cols / gs, spans = w->cols / SPAN;
    const size_t rb = w->row_bytes, srb = w->scale_row_bytes;
    const qmix_dtype sdt = w->scale_dtype;
    const __m512i pidx = k->pidx, sidx = k->sidx, pat = k->pat;
    const __m512i low = _mm512_set1_epi8((char)((1 << B) - 1));
    const __mmask64 bytes = B == 8 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * B)) - 1);
    const uint8_t *codes = (const uint8_t *)w->data + (size_t)r0 * rb;
    const uint8_t *sp = (const uint8_t *)w->scales + (size_t)r0 * srb;
    const uint8_t *bp = (const uint8_t *)w->biases + (size_t)r0 * srb;
    __m512 acc[4], bacc[4], sw[4];
    for (int r = 0; r < R; r++) acc[r] = bacc[r] = sw[r] = _mm512_setzero_ps();
    int64_t g0 = -16;
    for (int64_t s = 0; s < spans; s++) {
        const int64_t gfirst = s * SPAN / gs, off = s * 8 * B;
        q8_scale_window(R, gfirst, &g0, ng, sp, bp, srb, sdt, c->gsum, sw, bacc);
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(gfirst - g0)), pat);
        const __m512 dv = _mm512_loadu_ps(c->dl + s * 16);
        const __m512i xv = _mm512_load_si512(c->xq + s * SPAN);
        for (int r = 0; r < R; r++) {
            const uint8_t *row = codes + (size_t)r * rb;
            _mm_prefetch((const char *)(row + (size_t)R * rb + off), _MM_HINT_T0);
            __m512i raw = _mm512_maskz_loadu_epi8(bytes, row + off);
            __m512i q = _mm512_and_si512(
                _mm512_multishift_epi64_epi8(sidx, _mm512_permutexvar_epi8(pidx, raw)), low);
            __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
            const __m512 f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sw[r]), dv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[r0 + r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(bacc[r]);
}

#define ROWS(B, R)                                                                               \
    static void rows_##B##_##R(const qk_mat *w, int64_t r0, const xcache *c, const consts *k,    \
                               float *y)                                                         \
    {                                                                                            \
        rows(B, R, w, r0, c, k, y);                                                              \
    }
ROWS(3, 1) ROWS(3, 4) ROWS(5, 1) ROWS(5, 4) ROWS(6, 1) ROWS(6, 4)

void qk_qmatvec_q8_vbmi(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y)
{
    const int B = w->bits, gs = w->group_size;
    const int64_t cols = w->cols; /* a multiple of 32; spans of 64 need a multiple of 64 */
    if (cols % SPAN || (B != 3 && B != 5 && B != 6)) {
        qk_qmatvec_q8_scalar(w, row_begin, row_end, x, y);
        return;
    }
    xcache *c = &cache;
    if (c->cols != cols || c->group_size != gs || memcmp(c->x, x, (size_t)cols * sizeof *x))
        prepare(c, x, cols, gs);
    int32_t pat[16];
    uint8_t perm[64], shift[64];
    for (int j = 0; j < 16; j++) pat[j] = 4 * j / gs;
    for (int i = 0; i < 64; i++) { /* quadword i/8 holds the B bytes of codes 8(i/8) .. +7 */
        perm[i] = (uint8_t)((i / 8) * B + (i % 8 < B ? i % 8 : 0));
        shift[i] = (uint8_t)((i % 8) * B);
    }
    const consts k = {_mm512_loadu_si512(pat), _mm512_loadu_si512(perm), _mm512_loadu_si512(shift)};
    void (*four)(const qk_mat *, int64_t, const xcache *, const consts *, float *) =
        B == 3 ? rows_3_4 : B == 5 ? rows_5_4 : rows_6_4;
    void (*one)(const qk_mat *, int64_t, const xcache *, const consts *, float *) =
        B == 3 ? rows_3_1 : B == 5 ? rows_5_1 : rows_6_1;
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4) four(w, r, c, &k, y);
    for (; r < row_end; r++) one(w, r, c, &k, y);
}

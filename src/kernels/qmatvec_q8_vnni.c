/* AVX-512 VNNI quantized matrix × int8 vector (the decode path; reference: qmatvec_q8.c).
 * A 64-byte load holds 64·8/B codes ("a span"). Splitting it into its 8/B bit planes (the codes at
 * bit 0, at bit B, …: masks and shifts) gives unsigned bytes that vpdpbusd multiplies with int8
 * activations laid out plane by plane to match, 4 products per int32 lane. Lane j then sums codes
 * of one 32-block of x, so one convert and one FMA with s_group·d_block per lane close the span.
 * Per 128 weights of a 4-bit row that is ~10 instructions instead of ~36 for dequantizing to
 * float, which moves low-bit decode from compute-bound back to memory-bound. */
#include <string.h>

#include "kernels/q8_avx512.h"

#define MAX_SPANS (QK_Q8_MAX_COLS / 64 + 1)

typedef struct xplan {
    const int8_t *xp;   /* [spans][planes][64]: x quantized, plane by plane */
    const float *dl;    /* [spans][16]: d of the block each lane covers */
    const float *gsum;  /* [groups, padded to 16]: Σx per weight group */
    __m512i pat;        /* lane → group offset inside a span */
    int64_t spans;
} xplan;

static inline __attribute__((always_inline)) void rows(int B, int R, const qk_mat *w, int64_t r0,
                                                       const xplan *xp, float *y)
{
    const int planes = 8 / B, gs = w->group_size;
    const int64_t span = 64 * planes, ng = w->cols / gs, code_bytes = w->cols * B / 8;
    const size_t rb = w->row_bytes, srb = w->scale_row_bytes;
    const qmix_dtype sdt = w->scale_dtype;
    const __m512i low = _mm512_set1_epi8((char)((1 << B) - 1));
    const uint8_t *codes = (const uint8_t *)w->data + (size_t)r0 * rb;
    const uint8_t *sp = (const uint8_t *)w->scales + (size_t)r0 * srb;
    const uint8_t *bp = (const uint8_t *)w->biases + (size_t)r0 * srb;
    __m512 acc[4], bacc[4], sw[4];
    for (int r = 0; r < R; r++) acc[r] = bacc[r] = sw[r] = _mm512_setzero_ps();
    int64_t g0 = -16;
    for (int64_t s = 0; s < xp->spans; s++) {
        const int64_t gfirst = s * span / gs, off = s * 64;
        q8_scale_window(R, gfirst, &g0, ng, sp, bp, srb, sdt, xp->gsum, sw, bacc);
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(gfirst - g0)), xp->pat);
        const __m512 dv = _mm512_loadu_ps(xp->dl + s * 16);
        __m512i xv[4];
        for (int p = 0; p < planes; p++) xv[p] = _mm512_load_si512(xp->xp + (s * planes + p) * 64);
        const int64_t left = code_bytes - off;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        for (int r = 0; r < R; r++) {
            const uint8_t *row = codes + (size_t)r * rb;
            _mm_prefetch((const char *)(row + (size_t)R * rb + off), _MM_HINT_T0);
            const __m512i raw = _mm512_maskz_loadu_epi8(m, row + off);
            __m512i isum = _mm512_setzero_si512();
            if (B == 8) {
                isum = _mm512_dpbusd_epi32(isum, raw, xv[0]);
            } else {
                for (int p = 0; p < planes; p++) {
                    /* 16-bit shifts move bits across byte borders; the mask drops them */
                    __m512i q = _mm512_and_si512(p ? _mm512_srli_epi16(raw, p * B) : raw, low);
                    isum = _mm512_dpbusd_epi32(isum, q, xv[p]);
                }
            }
            const __m512 f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sw[r]), dv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[r0 + r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(bacc[r]);
}

#define ROWS(B, R)                                                                               \
    static void rows_##B##_##R(const qk_mat *w, int64_t r0, const xplan *xp, float *y)           \
    {                                                                                            \
        rows(B, R, w, r0, xp, y);                                                                \
    }
ROWS(2, 1) ROWS(2, 4) ROWS(4, 1) ROWS(4, 4) ROWS(8, 1) ROWS(8, 4)

/* The activation side of a call, kept per thread: a decode step's matmul is split into many row
 * tasks over the same x (and a thread usually takes several of them), so x is quantized and laid
 * out once and reused while the next call brings the same values (compared exactly). */
typedef struct xcache {
    int64_t cols;
    int bits, group_size;
    float x[QK_Q8_MAX_COLS];
    int8_t xp[MAX_SPANS * 64 * 4] __attribute__((aligned(64)));
    float dl[MAX_SPANS * 16];
    float gsum[QK_Q8_MAX_COLS / 32 + 16];
} xcache;

static _Thread_local xcache cache;

static void prepare(xcache *c, const float *x, int64_t cols, int B, int gs)
{
    const int planes = 8 / B;
    const int64_t span = 64 * planes, spans = (cols + span - 1) / span, lane_codes = span / 16;
    int8_t xq[QK_Q8_MAX_COLS];
    float d[QK_Q8_MAX_COLS / 32];
    qk_quantize_x_q8(x, cols, gs, xq, d, c->gsum);
    memset(c->gsum + cols / gs, 0, 16 * sizeof(float));
    /* plane p of span s holds the codes at k ≡ p (mod planes): byte i of a 64-byte code load
     * carries codes i·planes + p, which is where vpdpbusd will meet them */
    for (int64_t s = 0; s < spans; s++) {
        for (int p = 0; p < planes; p++)
            for (int i = 0; i < 64; i++) {
                int64_t k = s * span + (int64_t)i * planes + p;
                c->xp[(s * planes + p) * 64 + i] = k < cols ? xq[k] : 0;
            }
        for (int j = 0; j < 16; j++) {
            int64_t k = s * span + j * lane_codes;
            c->dl[s * 16 + j] = k < cols ? d[k / 32] : 0.0f;
        }
    }
    memcpy(c->x, x, (size_t)cols * sizeof *x);
    c->cols = cols;
    c->bits = B;
    c->group_size = gs;
}

void qk_qmatvec_q8_vnni(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y)
{
    const int B = w->bits, gs = w->group_size;
    const int64_t cols = w->cols, span = 64 * (8 / B);
    xcache *c = &cache;
    if (c->cols != cols || c->bits != B || c->group_size != gs ||
        memcmp(c->x, x, (size_t)cols * sizeof *x))
        prepare(c, x, cols, B, gs);
    int32_t pat[16];
    for (int j = 0; j < 16; j++) pat[j] = (int32_t)(j * (span / 16) / gs);
    const xplan plan = {c->xp, c->dl, c->gsum, _mm512_loadu_si512(pat), (cols + span - 1) / span};

    void (*four)(const qk_mat *, int64_t, const xplan *, float *) =
        B == 2 ? rows_2_4 : B == 4 ? rows_4_4 : rows_8_4;
    void (*one)(const qk_mat *, int64_t, const xplan *, float *) =
        B == 2 ? rows_2_1 : B == 4 ? rows_4_1 : rows_8_1;
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4) four(w, r, &plan, y);
    for (; r < row_end; r++) one(w, r, &plan, y);
}

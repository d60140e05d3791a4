/* Pieces the AVX-512 int8-activation kernels share (qmatvec_q8_vnni.c, qmatvec_q8_vbmi.c). Only
 * for files compiled with AVX-512 enabled. */
#ifndef QMIX_KERNELS_Q8_AVX512_H
#define QMIX_KERNELS_Q8_AVX512_H

#include <immintrin.h>

#include "kernels/kernels_impl.h"

/* Widens cnt consecutive scales (or biases) of dtype dt, at most 16; lanes beyond cnt are 0. */
static inline __m512 q8_widen16(const uint8_t *p, int64_t cnt, qmix_dtype dt)
{
    __mmask16 m = cnt >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
    if (dt == QMIX_F32) return _mm512_maskz_loadu_ps(m, p);
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return dt == QMIX_F16 ? _mm512_cvtph_ps(h)
                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* At a span whose first group is gfirst: when it leaves the 16-group window starting at *g0,
 * moves the window there, widens the R rows' scales into sw and folds their biases times the
 * groups' Σx into bacc (the bias term of every group is added exactly once). */
static inline __attribute__((always_inline)) void q8_scale_window(
    int R, int64_t gfirst, int64_t *g0, int64_t ng, const uint8_t *sp, const uint8_t *bp,
    size_t srb, qmix_dtype sdt, const float *gsum, __m512 *sw, __m512 *bacc)
{
    if (gfirst < *g0 + 16) return;
    const size_t sesz = sdt == QMIX_F32 ? 4 : 2;
    *g0 = gfirst & ~(int64_t)15;
    const __m512 gv = _mm512_loadu_ps(gsum + *g0);
    for (int r = 0; r < R; r++) {
        const size_t o = (size_t)r * srb + (size_t)*g0 * sesz;
        sw[r] = q8_widen16(sp + o, ng - *g0, sdt);
        bacc[r] = _mm512_fmadd_ps(q8_widen16(bp + o, ng - *g0, sdt), gv, bacc[r]);
    }
}

#endif

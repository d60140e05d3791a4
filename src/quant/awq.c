/* AWQ scale search (see awq.h). */
#include "quant/awq.h"

#include <math.h>
#include <string.h>

#include "quant/affine.h"

void qmix_awq_scales(const float *act, int64_t k, double alpha, float *s)
{
    /* §4.1 step 3 (llm-awq form, RMS statistic per §4.4): a^α, floored, normalised */
    double mx = 0, mn = INFINITY;
    for (int64_t j = 0; j < k; j++) {
        double v = pow(act[j] > 0 ? (double)act[j] : 0.0, alpha);
        if (!(v >= 1e-4) || !isfinite(v)) v = 1e-4;
        s[j] = (float)v;
        mx = v > mx ? v : mx;
        mn = v < mn ? v : mn;
    }
    double norm = sqrt(mx * mn);
    for (int64_t j = 0; j < k; j++) {
        float v = (float)(s[j] / norm);
        s[j] = isfinite(v) && v > 0 ? v : 1.0f;
    }
}

int64_t qmix_awq_scratch(int64_t k) { return 4 * k + 64; }

void qmix_awq_row_loss(const float *w, const float *c, double weight, int64_t k,
                       const float *s_tab, int bits, int group, float *scratch, double *loss)
{
    float *x = scratch, *deq = scratch + k, *sc = scratch + 2 * k, *bi = sc + k / group;
    uint32_t *codes = (uint32_t *)(void *)(bi + k / group);
    for (int a = 0; a < QMIX_AWQ_GRID; a++) {
        const float *s = s_tab + (int64_t)a * k;
        for (int64_t j = 0; j < k; j++) x[j] = w[j] * s[j];
        qmix_affine_quantize_row(x, k, bits, group, codes, sc, bi);
        qmix_affine_dequantize_row(codes, sc, bi, QMIX_F32, k, bits, group, deq);
        double e = 0;
        for (int64_t j = 0; j < k; j++) {
            double d = (double)w[j] - (double)deq[j] / s[j];
            e += (c ? c[j] : 1.0) * d * d;
        }
        loss[a] += weight * e;
    }
}

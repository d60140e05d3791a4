/* Causal softmax attention of one query over n cached keys/values (one head). */
#include <math.h>

#include "kernels/kernels.h"

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void qk_attend(const float *q, const float *keys, const float *values, int64_t ld_kv, int64_t n,
               int64_t dim, float scale, float *scores, float *out)
{
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        const float *kj = keys + j * ld_kv;
        float acc[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += q[i + l] * kj[i + l];
        float dot = 0;
        for (int l = 0; l < 16; l++) dot += acc[l];
        for (; i < dim; i++) dot += q[i] * kj[i];
        scores[j] = dot * scale;
        mx = scores[j] > mx ? scores[j] : mx;
    }
    float sum = 0;
    for (int64_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float inv = 1.0f / sum;
    for (int64_t d = 0; d < dim; d++) out[d] = 0;
    for (int64_t j = 0; j < n; j++) {
        const float *vj = values + j * ld_kv;
        float w = scores[j] * inv;
        for (int64_t d = 0; d < dim; d++) out[d] += w * vj[d];
    }
}

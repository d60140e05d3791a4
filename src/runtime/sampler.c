#include "runtime/sampler.h"

#include <math.h>

void qmix_sampler_init(qmix_sampler *s, float temperature, uint64_t seed)
{
    s->temperature = temperature;
    /* splitmix64 of the seed, so nearby seeds give unrelated streams and 0 is a fine seed */
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    s->rng = (z ^ (z >> 31)) | 1;
}

static double uniform01(qmix_sampler *s)
{
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return (double)((s->rng * 2685821657736338717ull) >> 11) * 0x1.0p-53;
}

int32_t qmix_argmax(const float *logits, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int32_t qmix_sample(qmix_sampler *s, const float *logits, int n)
{
    if (s->temperature <= 0) return qmix_argmax(logits, n);
    float mx = logits[qmix_argmax(logits, n)];
    double total = 0;
    for (int i = 0; i < n; i++) total += exp((logits[i] - mx) / s->temperature);
    double r = uniform01(s) * total, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += exp((logits[i] - mx) / s->temperature);
        if (acc > r) return i;
    }
    return n - 1;
}

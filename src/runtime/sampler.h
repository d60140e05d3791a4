/* Picking the next token from logits. temperature 0 = greedy (argmax, lowest id on ties). */
#ifndef QMIX_RUNTIME_SAMPLER_H
#define QMIX_RUNTIME_SAMPLER_H

#include <stdint.h>

typedef struct qmix_sampler {
    float temperature;
    uint64_t rng;      /* xorshift64* state, from the seed */
} qmix_sampler;

void qmix_sampler_init(qmix_sampler *s, float temperature, uint64_t seed);
int32_t qmix_argmax(const float *logits, int n);
int32_t qmix_sample(qmix_sampler *s, const float *logits, int n);

#endif

/* Picking the next token: penalties, temperature, top-k, top-p, min-p, then a seeded draw.
 * Order as vLLM applies them: repetition penalty (prompt and output tokens), presence and
 * frequency penalties (output tokens), temperature, top-k, top-p, min-p. Temperature 0 is greedy
 * (argmax after penalties, lowest id on ties). */
#ifndef QMIX_RUNTIME_SAMPLER_H
#define QMIX_RUNTIME_SAMPLER_H

#include <stdint.h>

typedef struct qmix_sampling {
    float temperature;        /* 0: greedy */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off; relative to the most likely token */
    float presence_penalty;   /* 0: off; subtracted once from every generated token's logit */
    float frequency_penalty;  /* 0: off; subtracted per occurrence */
    float repetition_penalty; /* 1: off; divides positive / multiplies negative logits of seen tokens */
    uint64_t seed;
} qmix_sampling;

/* Greedy, every filter and penalty neutral. */
qmix_sampling qmix_sampling_greedy(void);

/* Named settings (the Qwen recommendations quoted in seed 002): "instruct-general",
 * "instruct-reasoning" (thinking off), "thinking-general", "thinking-coding" (thinking on).
 * Returns -1 for an unknown name. enable_thinking / max_tokens may be NULL. */
int qmix_sampling_profile(const char *name, qmix_sampling *out, int *enable_thinking,
                          int *max_tokens);
/* Profile names, NULL-terminated. */
extern const char *const qmix_sampling_profiles[];

typedef struct qmix_sampler qmix_sampler;

/* Allocates the sampler's history and scratch for n_vocab tokens (nothing after). */
qmix_sampler *qmix_sampler_new(const qmix_sampling *params, int n_vocab);
void qmix_sampler_free(qmix_sampler *s);
/* Forgets the history and restarts the random stream from the seed. */
void qmix_sampler_reset(qmix_sampler *s);
/* Tokens of the prompt: they count for the repetition penalty only. */
void qmix_sampler_add_prompt(qmix_sampler *s, const int32_t *ids, int n);
/* A generated token (sampled or forced): counts for every penalty. */
void qmix_sampler_accept(qmix_sampler *s, int32_t id);
/* Draws the next token from logits[n_vocab]; does not accept it. */
int32_t qmix_sampler_sample(qmix_sampler *s, const float *logits);
/* The distribution qmix_sampler_sample draws from: probs[n_vocab], 0 for filtered tokens (for
 * greedy, 1 at the argmax). */
void qmix_sampler_distribution(qmix_sampler *s, const float *logits, float *probs);

/* A uniform draw in [0, 1) from the sampler's seeded stream (speculative sampling's acceptance
 * test and residual draws use the same stream as the sampler). */
double qmix_sampler_uniform(qmix_sampler *s);

int32_t qmix_argmax(const float *logits, int n);

#endif

/* Comparing next-token distributions: log-softmax, KL divergence from full logits or from a
 * compact top-k form of the base distribution (what `qmix kld --save-base` stores). */
#ifndef QMIX_EVAL_KLD_H
#define QMIX_EVAL_KLD_H

#include <stdint.h>

#include "runtime/sampler.h" /* qmix_argmax */

#define QMIX_KLD_TOPK_DEFAULT 64

/* log Σ exp(logits[i]) over vocab, computed stably. */
double qmix_logsumexp(const float *logits, int64_t vocab);

/* KL(P_base || P_quant) in nats from two full logit rows. */
double qmix_kld_full(const float *base_logits, const float *quant_logits, int64_t vocab);

/* The compact base row: the top_k tokens by probability (ids[], descending log-probabilities
 * logp[]). ties broken by lower id. top_k ≤ vocab. */
void qmix_topk_logprobs(const float *logits, int64_t vocab, int top_k, int32_t *ids, float *logp);

/* KL(P_base || P_quant) with P_base known only on its top_k tokens: those terms exactly, the rest of
 * the vocabulary lumped into one bucket on both sides. By the data-processing inequality this is
 * ≤ the full KLD; the gap is bounded by the base mass outside the top k times the log-ratio spread
 * there, negligible once the top k hold almost all the mass. */
double qmix_kld_topk(const int32_t *ids, const float *logp, int top_k, const float *quant_logits,
                     int64_t vocab);


/* ---- runs over a token stream (the windows of src/eval/windows.h) ---------------------------- */

#include <signal.h>

#include "qmix.h"

typedef struct qmix_kld_result {
    int ctx, windows;            /* windows completed */
    int64_t n;                   /* tokens scored: windows · (ctx − 1) */
    double *kld;                 /* [n]: KL(base || quant) per token, nats */
    int64_t top1_same;           /* tokens where both models' most likely token agree */
    double dp_sum, dp_sq_sum;    /* Δp = p_quant − p_base of the token that actually followed */
    double base_nll_sum, quant_nll_sum; /* Σ −log p(next) of each model: their perplexities */
    int top_k;                   /* 0: exact (full base logits); else the saved base's k */
} qmix_kld_result;

/* The compact base of `qmix kld --save-base`: the token stream, and per scored token the base's
 * top-k log-probabilities and the log-probability of the token that followed. ~8·k bytes a token
 * instead of 4·vocab. Little-endian:
 *   "QMIXKLB1", u32 vocab, u32 ctx, u32 windows, u32 top_k,
 *   windows·(ctx−1) rows of { i32 ids[top_k], f32 logp[top_k] (descending), f32 logp_next },
 *   i32 tokens[windows·ctx]. */
typedef struct qmix_kld_base qmix_kld_base;
typedef struct qmix_kld_base_info {
    int vocab, ctx, windows, top_k;
    const int32_t *tokens;       /* [windows·ctx] */
} qmix_kld_base_info;

int qmix_kld_base_open(const char *path, qmix_kld_base **out, qmix_err *err);
const qmix_kld_base_info *qmix_kld_base_get_info(const qmix_kld_base *b);
void qmix_kld_base_close(qmix_kld_base *b);

/* Runs base over n_windows windows of tokens and writes the compact base to path; *done counts
 * the windows written (a stop keeps the file valid with those). Returns 0, 1 (stopped), -1. */
int qmix_kld_save_base(qmix_session *base, const int32_t *tokens, int ctx, int n_windows,
                       int top_k, const char *path,
                       void (*progress)(void *user, int done, int total), void *user,
                       const volatile sig_atomic_t *stop, int *done, qmix_err *err);

/* Compares quant with base over the windows: base is a session over the base model (exact KLD
 * from full logits, tokens/ctx/n_windows as given), or NULL and base_file supplies the tokens, ctx,
 * windows and top-k rows (n_windows ≤ 0: all of the file's). Returns 0, 1 (stopped: the result
 * holds the complete windows), -1. Free the result with qmix_kld_result_free. */
int qmix_kld_compare(qmix_session *quant, qmix_session *base, qmix_kld_base *base_file,
                     const int32_t *tokens, int ctx, int n_windows,
                     void (*progress)(void *user, int done, int total), void *user,
                     const volatile sig_atomic_t *stop, qmix_kld_result *out, qmix_err *err);
void qmix_kld_result_free(qmix_kld_result *r);

#endif

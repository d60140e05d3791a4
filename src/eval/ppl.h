/* Perplexity over non-overlapping windows of ctx tokens, each a fresh sequence. Two ways to
 * score a window: every token but the first (the WikiText-2-raw protocol of model cards), or only
 * its second half, each token then predicted from at least ctx/2 tokens of context — how
 * llama.cpp's llama-perplexity scores, so the two tools' numbers compare on the same text. */
#ifndef QMIX_EVAL_PPL_H
#define QMIX_EVAL_PPL_H

#include <signal.h>
#include <stdint.h>

#include "qmix.h"

typedef struct qmix_ppl_result {
    int ctx;
    int windows;             /* windows completed */
    int score_from;          /* first scored logits row of a window: 0 (every token but the
                                first) or ctx/2 (second half) */
    int64_t tokens_scored;   /* windows · (ctx − 1 − score_from) */
    double nll_sum;          /* Σ −log p(next token), nats */
    double *window_nll;      /* [windows]: mean loss of each window */
} qmix_ppl_result;

/* Runs n_windows windows of tokens (n_windows·ctx of them) through session, scoring the tokens
 * after logits rows [score_from, ctx − 1) of each (score_from 0: all but the first; ctx/2: the
 * second half). progress as in
 * qmix_eval_windows. Returns 0 when all ran, 1 when *stop ended it early (the result holds the
 * complete windows), -1 on error. Free the result with qmix_ppl_result_free. */
int qmix_ppl(qmix_session *session, const int32_t *tokens, int ctx, int n_windows, int score_from,
             void (*progress)(void *user, int done, int total), void *user,
             const volatile sig_atomic_t *stop, qmix_ppl_result *out, qmix_err *err);
void qmix_ppl_result_free(qmix_ppl_result *r);

#endif

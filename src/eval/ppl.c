#include "eval/ppl.h"

#include <stdlib.h>
#include <string.h>

#include "eval/kld.h"
#include "eval/windows.h"
#include "runtime/session.h"
#include "util/err.h"

typedef struct ppl_acc {
    qmix_ppl_result *r;
    int64_t vocab;
    double window_sum;
} ppl_acc;

static int on_rows(void *user, int window, int row0, int n_rows, const float *logits,
                   const int32_t *win, qmix_err *err)
{
    ppl_acc *a = user;
    if (row0 == 0) a->window_sum = 0;
    for (int i = 0; i < n_rows; i++) {
        if (row0 + i < a->r->score_from) continue;
        const float *row = logits + (int64_t)i * a->vocab;
        a->window_sum += qmix_logsumexp(row, a->vocab) - row[win[row0 + i + 1]];
    }
    if (row0 + n_rows == a->r->ctx - 1) { /* the window is complete */
        a->r->window_nll[window] = a->window_sum / (a->r->ctx - 1 - a->r->score_from);
        a->r->nll_sum += a->window_sum;
    }
    return 0;
}

int qmix_ppl(qmix_session *s, const int32_t *tokens, int ctx, int n_windows, int score_from,
             void (*progress)(void *user, int done, int total), void *user,
             const volatile sig_atomic_t *stop, qmix_ppl_result *out, qmix_err *err)
{
    memset(out, 0, sizeof *out);
    out->ctx = ctx;
    out->score_from = score_from;
    if (n_windows < 1) return qmix_errf(err, "no window of %d tokens to evaluate", ctx);
    if (score_from < 0 || score_from > ctx - 2)
        return qmix_errf(err, "cannot score from row %d of a %d-token window", score_from, ctx);
    out->window_nll = calloc((size_t)n_windows, sizeof *out->window_nll);
    if (!out->window_nll) return qmix_errf(err, "out of memory");
    ppl_acc acc = {.r = out, .vocab = s->model->cfg.vocab_size};
    int done = 0;
    int rc = qmix_eval_windows(s, tokens, ctx, n_windows, on_rows, &acc, progress, user, stop,
                               &done, err);
    out->windows = done;
    out->tokens_scored = (int64_t)done * (ctx - 1 - score_from);
    return rc;
}

void qmix_ppl_result_free(qmix_ppl_result *r)
{
    free(r->window_nll);
    r->window_nll = NULL;
}

#include "eval/windows.h"

#include <stdlib.h>

#include "runtime/session.h"
#include "util/err.h"

int qmix_eval_n_windows(int64_t n_tokens, int ctx, int max_windows)
{
    if (ctx < 2) return 0;
    int64_t n = n_tokens / ctx;
    if (n > 1 << 30) n = 1 << 30;
    if (max_windows > 0 && n > max_windows) n = max_windows;
    return (int)n;
}

int qmix_eval_chunk_rows(int64_t vocab)
{
    int64_t rows = QMIX_EVAL_LOGIT_BYTES / (vocab * (int64_t)sizeof(float));
    if (rows > QMIX_MAX_BATCH) rows = QMIX_MAX_BATCH; /* a whole prefill batch per call */
    if (rows < 16) rows = 16;
    return (int)rows;
}

int qmix_eval_windows(qmix_session *s, const int32_t *tokens, int ctx, int n_windows,
                      qmix_eval_fn fn, void *fn_user,
                      void (*progress)(void *user, int done, int total), void *user,
                      const volatile sig_atomic_t *stop, int *done_windows,
                      qmix_err *err)
{
    int64_t V = s->model->cfg.vocab_size;
    *done_windows = 0;
    if (ctx < 2) return qmix_errf(err, "a window needs at least 2 tokens, got ctx %d", ctx);
    if (ctx > s->max_ctx)
        return qmix_errf(err, "windows of %d tokens do not fit the session's max_ctx %d", ctx,
                         s->max_ctx);
    int chunk = qmix_eval_chunk_rows(V);
    float *logits = malloc((size_t)chunk * V * sizeof *logits);
    if (!logits)
        return qmix_errf(err, "out of memory for %d rows of %lld logits", chunk, (long long)V);
    int rc = 0;
    for (int w = 0; w < n_windows && !rc; w++) {
        const int32_t *win = tokens + (int64_t)w * ctx;
        qmix_session_reset(s);
        /* The last token of a window predicts nothing scored: feed ctx-1 tokens. */
        for (int row0 = 0; row0 < ctx - 1; row0 += chunk) {
            if (stop && *stop) {
                rc = 1;
                break;
            }
            int n = ctx - 1 - row0 < chunk ? ctx - 1 - row0 : chunk;
            if (qmix_session_prefill(s, win + row0, n, logits, err) ||
                fn(fn_user, w, row0, n, logits, win, err)) {
                rc = -1;
                break;
            }
        }
        if (rc) break;
        *done_windows = w + 1;
        if (progress) progress(user, w + 1, n_windows);
    }
    free(logits);
    return rc;
}

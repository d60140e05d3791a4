/* Running a model over a long token stream the way perplexity protocols do: non-overlapping
 * windows of ctx tokens, each a fresh sequence, logits handed out a chunk of rows at a time so
 * memory stays bounded for a 248k vocabulary. */
#ifndef QMIX_EVAL_WINDOWS_H
#define QMIX_EVAL_WINDOWS_H

#include <signal.h>
#include <stdint.h>

#include "qmix.h"

/* Logits held at once: rows per chunk are as many as fit (at most one prefill batch, at least 16):
 * 512 rows of a 4k vocabulary, ~270 of Qwen3.5's 248k. */
#define QMIX_EVAL_LOGIT_BYTES ((int64_t)256 << 20)
int qmix_eval_chunk_rows(int64_t vocab);

/* Called for rows [row0, row0 + n_rows) of window `window`: logits[n_rows][vocab]; row i predicts
 * window_tokens[row0 + i + 1] (the last row of a window predicts nothing and is not passed, so
 * every row has a next token). Return non-zero (with err set) to stop. */
typedef int (*qmix_eval_fn)(void *user, int window, int row0, int n_rows, const float *logits,
                            const int32_t *window_tokens, qmix_err *err);

/* Number of whole windows of ctx tokens in n_tokens (capped at max_windows if > 0). */
int qmix_eval_n_windows(int64_t n_tokens, int ctx, int max_windows);

/* Runs windows [0, n_windows) of ctx tokens each (tokens[w·ctx …]) over session, reset before each
 * window (its max_ctx must be ≥ ctx). *stop (if non-NULL) is checked between chunks: once set, the
 * window in progress is abandoned and the call returns 1; *done_windows counts the windows handed
 * out completely. fn gets fn_user; progress(user, done, n_windows) runs after each window, if
 * non-NULL.
 * Returns 0 when all ran, 1 when stopped, -1 on error. */
int qmix_eval_windows(qmix_session *session, const int32_t *tokens, int ctx, int n_windows,
                      qmix_eval_fn fn, void *fn_user,
                      void (*progress)(void *user, int done, int total), void *user, const volatile sig_atomic_t *stop, int *done_windows,
                      qmix_err *err);

#endif

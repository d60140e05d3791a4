#include "runtime/generate.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/err.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Text not yet emitted because it may be the start of a stop string. */
typedef struct pending {
    char *buf;
    size_t len, cap, hold; /* hold: longest stop string - 1 */
} pending;

static int is_cont(unsigned char c) { return (c & 0xc0) == 0x80; }

/* Emits what can no longer become part of a stop string; returns 1 if a stop string was found
 * (the text before it is emitted, the rest dropped). */
static int release(pending *p, const qmix_gen_opts *o, qmix_gen_text_fn fn, void *user, int final)
{
    size_t stop_at = p->len;
    for (int i = 0; i < o->n_stop_strings; i++) {
        const char *s = o->stop_strings[i];
        size_t n = strlen(s);
        if (!n || n > p->len) continue;
        for (size_t at = 0; at + n <= p->len && at < stop_at; at++)
            if (!memcmp(p->buf + at, s, n)) {
                stop_at = at;
                break;
            }
    }
    if (stop_at < p->len) {
        if (stop_at && fn) fn(user, p->buf, stop_at);
        p->len = 0;
        return 1;
    }
    size_t emit = final ? p->len : p->len > p->hold ? p->len - p->hold : 0;
    while (emit > 0 && emit < p->len && is_cont((unsigned char)p->buf[emit])) emit--;
    if (emit) {
        if (fn) fn(user, p->buf, emit);
        memmove(p->buf, p->buf + emit, p->len - emit);
        p->len -= emit;
    }
    return 0;
}

static int append(pending *p, const char *text, size_t n)
{
    if (!n) return 0; /* p->buf may still be NULL: memcpy must not see it */
    if (p->len + n > p->cap) {
        size_t cap = (p->len + n) * 2 + 64;
        char *grown = realloc(p->buf, cap);
        if (!grown) return -1;
        p->buf = grown;
        p->cap = cap;
    }
    memcpy(p->buf + p->len, text, n);
    p->len += n;
    return 0;
}

int qmix_generate(qmix_session *s, qmix_sampler *smp, const qmix_tokenizer *tok,
                  const int32_t *prompt, int n_prompt, int32_t *history, int *n_history,
                  const qmix_gen_opts *o, qmix_gen_text_fn on_text, void *user,
                  qmix_gen_result *res, qmix_err *err)
{
    memset(res, 0, sizeof *res);
    res->n_prompt = n_prompt;
    if (n_prompt <= 0) return qmix_errf(err, "empty prompt");
    /* Reuse the session only if it holds exactly a prefix of this prompt (the recurrent state
     * cannot be rewound, so any divergence means starting over). */
    int common = 0;
    while (common < *n_history && common < n_prompt && history[common] == prompt[common]) common++;
    if (common < *n_history || common == n_prompt) {
        qmix_session_reset(s);
        common = 0;
    }
    res->n_prompt_reused = common;
    double t0 = now();
    if (qmix_session_prefill(s, prompt + common, n_prompt - common, NULL, err)) {
        *n_history = 0;
        qmix_session_reset(s);
        return -1;
    }
    memcpy(history, prompt, sizeof *history * (size_t)n_prompt);
    *n_history = n_prompt;
    double t1 = now();
    res->prefill_s = t1 - t0;
    qmix_sampler_add_prompt(smp, prompt, n_prompt);

    pending p = {0};
    for (int i = 0; i < o->n_stop_strings; i++) {
        size_t n = strlen(o->stop_strings[i]);
        if (n > p.hold + 1) p.hold = n - 1;
    }
    size_t cap = qmix_tok_stream_max(tok);
    char *piece = malloc(cap);
    if (!piece) return qmix_errf(err, "out of memory");
    qmix_tok_stream stream;
    qmix_tok_stream_init(&stream, tok, 1);
    int rc = 0, hit_stop_string = 0;
    res->finish = QMIX_FINISH_LENGTH;
    for (int step = 0; step < o->max_tokens; step++) {
        if (o->cancel && *o->cancel) {
            res->finish = QMIX_FINISH_CANCEL;
            break;
        }
        int32_t id = qmix_sampler_sample(smp, qmix_session_logits(s));
        int stop = 0;
        for (int i = 0; i < o->n_stop_ids; i++) stop |= id == o->stop_ids[i];
        if (stop) {
            res->finish = QMIX_FINISH_STOP;
            break;
        }
        qmix_sampler_accept(smp, id);
        res->n_generated++;
        size_t n;
        if (qmix_tok_stream_push(&stream, id, piece, cap, &n, err) || append(&p, piece, n)) {
            rc = -1;
            break;
        }
        if (release(&p, o, on_text, user, 0)) {
            res->finish = QMIX_FINISH_STOP;
            hit_stop_string = 1;
            break;
        }
        if (step + 1 == o->max_tokens) break;
        qmix_err full;
        if (qmix_session_decode(s, id, &full)) break; /* context full: finish "length" */
        history[(*n_history)++] = id;
    }
    if (!rc && !hit_stop_string) { /* what was held back is text after all */
        size_t n = qmix_tok_stream_flush(&stream, piece);
        if (append(&p, piece, n) == 0) release(&p, o, on_text, user, 1);
    }
    res->decode_s = now() - t1;
    free(piece);
    free(p.buf);
    return rc;
}

void qmix_gen_sampling_defaults(qmix_sampling *sp, const qmix_generation_config *gen)
{
    if (gen->has_temperature) sp->temperature = (float)gen->temperature;
    if (gen->has_top_p) sp->top_p = (float)gen->top_p;
    if (gen->has_top_k) sp->top_k = gen->top_k;
}

int qmix_gen_chat_stop_ids(const qmix_generation_config *gen, const qmix_tokenizer *tok,
                           int32_t *out)
{
    int n = 0;
    for (int i = 0; i < gen->n_eos && i < QMIX_MAX_EOS; i++) out[n++] = gen->eos[i];
    int32_t im_end = qmix_tok_special_ids(tok)->im_end;
    if (im_end >= 0) out[n++] = im_end;
    return n;
}

#include "runtime/generate.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/session.h"
#include "runtime/speculative.h"
#include "util/err.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int is_cont(unsigned char c) { return (c & 0xc0) == 0x80; }

/* Emits what can no longer become part of a stop string; returns 1 if a stop string was found
 * (the text before it is emitted, the rest dropped). */
static int release(qmix_gen_stream *g, int final)
{
    const qmix_gen_opts *o = g->opts;
    size_t stop_at = g->pending_len;
    for (int i = 0; i < o->n_stop_strings; i++) {
        const char *s = o->stop_strings[i];
        size_t n = strlen(s);
        if (!n || n > g->pending_len) continue;
        for (size_t at = 0; at + n <= g->pending_len && at < stop_at; at++)
            if (!memcmp(g->pending + at, s, n)) {
                stop_at = at;
                break;
            }
    }
    if (stop_at < g->pending_len) {
        if (stop_at && g->on_text) g->on_text(g->user, g->pending, stop_at);
        g->pending_len = 0;
        return 1;
    }
    size_t len = g->pending_len;
    size_t emit = final ? len : len > g->hold ? len - g->hold : 0;
    while (emit > 0 && emit < len && is_cont((unsigned char)g->pending[emit])) emit--;
    if (emit) {
        if (g->on_text) g->on_text(g->user, g->pending, emit);
        memmove(g->pending, g->pending + emit, len - emit);
        g->pending_len -= emit;
    }
    return 0;
}

static int append(qmix_gen_stream *g, const char *text, size_t n)
{
    if (!n) return 0; /* pending may still be NULL: memcpy must not see it */
    if (g->pending_len + n > g->pending_cap) {
        size_t cap = (g->pending_len + n) * 2 + 64;
        char *grown = realloc(g->pending, cap);
        if (!grown) return -1;
        g->pending = grown;
        g->pending_cap = cap;
    }
    memcpy(g->pending + g->pending_len, text, n);
    g->pending_len += n;
    return 0;
}

int qmix_gen_stream_init(qmix_gen_stream *g, qmix_sampler *smp, const qmix_tokenizer *tok,
                         const int32_t *prompt, int n_prompt, const qmix_gen_opts *o,
                         qmix_gen_text_fn on_text, void *user, qmix_err *err)
{
    memset(g, 0, sizeof *g);
    g->sampler = smp;
    g->opts = o;
    g->on_text = on_text;
    g->user = user;
    g->finish = QMIX_FINISH_LENGTH;
    for (int i = 0; i < o->n_stop_strings; i++) {
        size_t n = strlen(o->stop_strings[i]);
        if (n > g->hold + 1) g->hold = n - 1;
    }
    g->piece_cap = qmix_tok_stream_max(tok);
    if (!(g->piece = malloc(g->piece_cap))) return qmix_errf(err, "out of memory");
    qmix_tok_stream_init(&g->tok_stream, tok, 1);
    qmix_sampler_add_prompt(smp, prompt, n_prompt);
    return 0;
}

int qmix_gen_stream_next(qmix_gen_stream *g, const float *logits, int32_t *id_out, qmix_err *err)
{
    const qmix_gen_opts *o = g->opts;
    if (g->n_generated >= o->max_tokens) {
        g->finish = QMIX_FINISH_LENGTH;
        return 1;
    }
    int32_t id = qmix_sampler_sample(g->sampler, logits);
    *id_out = id;
    return qmix_gen_stream_push(g, id, logits, err);
}

int qmix_gen_stream_push(qmix_gen_stream *g, int32_t id, const float *logits, qmix_err *err)
{
    const qmix_gen_opts *o = g->opts;
    if (g->n_generated >= o->max_tokens) {
        g->finish = QMIX_FINISH_LENGTH;
        return 1;
    }
    for (int i = 0; i < o->n_stop_ids; i++)
        if (id == o->stop_ids[i]) {
            g->finish = QMIX_FINISH_STOP;
            return 1;
        }
    qmix_sampler_accept(g->sampler, id);
    g->n_generated++;
    if (g->on_token) g->on_token(g->user, id, logits);
    size_t n;
    if (qmix_tok_stream_push(&g->tok_stream, id, g->piece, g->piece_cap, &n, err)) return -1;
    if (append(g, g->piece, n)) return qmix_errf(err, "out of memory");
    if (release(g, 0)) {
        g->finish = QMIX_FINISH_STOP;
        g->hit_stop_string = 1;
        return 1;
    }
    if (g->n_generated == o->max_tokens) {
        g->finish = QMIX_FINISH_LENGTH;
        return 1;
    }
    return 0;
}

void qmix_gen_stream_end(qmix_gen_stream *g, int flush)
{
    if (flush && !g->hit_stop_string && g->piece) { /* what was held back is text after all */
        size_t n = qmix_tok_stream_flush(&g->tok_stream, g->piece);
        if (append(g, g->piece, n) == 0) release(g, 1);
    }
    free(g->piece);
    free(g->pending);
    g->piece = g->pending = NULL;
}

static int spec_emit(void *user, int32_t id, const float *logits, qmix_err *err)
{
    return qmix_gen_stream_push(user, id, logits, err);
}

int qmix_generate(qmix_session *s, qmix_sampler *smp, const qmix_tokenizer *tok,
                  const int32_t *prompt, int n_prompt, int32_t *history, int *n_history,
                  const qmix_gen_opts *o, qmix_gen_text_fn on_text, void *user,
                  qmix_gen_result *res, qmix_err *err)
{
    return qmix_generate_mm(s, smp, tok, prompt, NULL, NULL, n_prompt, history, n_history, o,
                            on_text, user, res, err);
}

int qmix_generate_mm(qmix_session *s, qmix_sampler *smp, const qmix_tokenizer *tok,
                     const int32_t *prompt, const float *const *embeds, const int32_t *pos3,
                     int n_prompt, int32_t *history, int *n_history, const qmix_gen_opts *o,
                     qmix_gen_text_fn on_text, void *user, qmix_gen_result *res, qmix_err *err)
{
    memset(res, 0, sizeof *res);
    res->n_prompt = n_prompt;
    if (n_prompt <= 0) return qmix_errf(err, "empty prompt");
    /* Reuse the session only if it holds exactly a prefix of this prompt (the recurrent state
     * cannot be rewound, so any divergence means starting over). */
    int common = 0;
    while (common < *n_history && common < n_prompt && history[common] == prompt[common]) common++;
    if (common < *n_history || common == n_prompt) {
        if (o->spec) qmix_spec_reset(o->spec);
        else qmix_session_reset(s);
        common = 0;
    }
    res->n_prompt_reused = common;
    double t0 = now();
    int failed = o->spec ? qmix_spec_prefill(o->spec, prompt + common, n_prompt - common, err)
                 : pos3  ? qmix_session_prefill_mm(s, prompt + common, n_prompt - common,
                                                   embeds ? embeds + common : NULL,
                                                   pos3 + 3 * (int64_t)common, NULL, err)
                         : qmix_session_prefill(s, prompt + common, n_prompt - common, NULL, err);
    if (failed) {
        *n_history = 0;
        if (o->spec) qmix_spec_reset(o->spec);
        else qmix_session_reset(s);
        return -1;
    }
    memcpy(history, prompt, sizeof *history * (size_t)n_prompt);
    *n_history = n_prompt;
    double t1 = now();
    res->prefill_s = t1 - t0;

    qmix_gen_stream g;
    if (qmix_gen_stream_init(&g, smp, tok, prompt, n_prompt, o, on_text, user, err)) return -1;
    int rc = 0, cancelled = 0;
    if (o->spec) {
        rc = qmix_spec_generate(o->spec, smp, spec_emit, &g, o->cancel, history, n_history, err);
        cancelled = rc == 0 && o->cancel && *o->cancel && g.n_generated < o->max_tokens &&
                    g.finish == QMIX_FINISH_LENGTH;
    }
    for (; !o->spec;) {
        if (o->cancel && *o->cancel) {
            cancelled = 1;
            break;
        }
        int32_t id;
        int r = qmix_gen_stream_next(&g, qmix_session_logits(s), &id, err);
        if (r) {
            rc = r < 0 ? -1 : 0;
            break;
        }
        qmix_err full;
        if (qmix_session_decode(s, id, &full)) break; /* context full: finish "length" */
        history[(*n_history)++] = id;
    }
    qmix_gen_stream_end(&g, rc == 0);
    res->finish = cancelled ? QMIX_FINISH_CANCEL : g.finish;
    res->n_generated = g.n_generated;
    res->decode_s = now() - t1;
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

/* One generation: prefill a prompt (reusing what the session already holds of it), then sample,
 * decode and stream text until a stop token, a stop string, max_tokens, the context end or a
 * cancel request. Shared by `qmix generate -p`, `qmix chat` and (later) the server. */
#ifndef QMIX_RUNTIME_GENERATE_H
#define QMIX_RUNTIME_GENERATE_H

#include <signal.h>
#include <stdint.h>

#include "formats/config.h"
#include "qmix.h"
#include "runtime/sampler.h"
#include "text/tokenizer.h"

typedef struct qmix_gen_opts {
    int max_tokens;
    const int32_t *stop_ids;          /* end-of-generation tokens (not emitted) */
    int n_stop_ids;
    const char *const *stop_strings;  /* the text stops before any of these (not emitted) */
    int n_stop_strings;
    volatile sig_atomic_t *cancel;    /* set (e.g. by SIGINT) to stop after the current token */
    struct qmix_spec *spec;           /* NULL, or MTP speculative decoding over the session
                                         (runtime/speculative.h), which then drives it */
} qmix_gen_opts;

typedef enum qmix_finish { QMIX_FINISH_STOP, QMIX_FINISH_LENGTH, QMIX_FINISH_CANCEL } qmix_finish;

typedef struct qmix_gen_result {
    qmix_finish finish;
    int n_prompt, n_prompt_reused, n_generated;
    double prefill_s, decode_s;
} qmix_gen_result;

/* Receives text as soon as it is complete UTF-8 and known not to start a stop string. */
typedef void (*qmix_gen_text_fn)(void *user, const char *text, size_t len);

/* The generation loop's text side, one token at a time, for callers that run the model
 * themselves (the server decodes many sequences in one batch): sampling, stop ids, stop strings,
 * max_tokens and streaming complete UTF-8 text. */
typedef struct qmix_gen_stream {
    qmix_sampler *sampler;
    const qmix_gen_opts *opts;
    qmix_gen_text_fn on_text;
    void *user;
    /* optional: each generated token (not a stop token) with the logits it was drawn from,
     * before its text */
    void (*on_token)(void *user, int32_t id, const float *logits);
    qmix_tok_stream tok_stream;
    char *pending;        /* text held back: it may be the start of a stop string */
    size_t pending_len, pending_cap, hold; /* hold: longest stop string - 1 */
    char *piece;
    size_t piece_cap;
    int n_generated, hit_stop_string;
    qmix_finish finish;
} qmix_gen_stream;

/* The prompt counts for the sampler's repetition penalty. */
int qmix_gen_stream_init(qmix_gen_stream *g, qmix_sampler *sampler, const qmix_tokenizer *tok,
                         const int32_t *prompt, int n_prompt, const qmix_gen_opts *opts,
                         qmix_gen_text_fn on_text, void *user, qmix_err *err);
/* Samples the next token from logits and streams its text. Returns 0 when *id is to be fed to the
 * model next, 1 when the generation is over (g->finish says why; a stop token is not fed, nor the
 * max_tokens-th), -1 on error. */
int qmix_gen_stream_next(qmix_gen_stream *g, const float *logits, int32_t *id, qmix_err *err);
/* The same for a token chosen by the caller (speculative decoding): stop ids, max_tokens,
 * sampler history, text. Returns 0 when id is to be fed, 1 when the generation is over. */
int qmix_gen_stream_push(qmix_gen_stream *g, int32_t id, const float *logits, qmix_err *err);
/* Emits what was held back (unless a stop string or an error ended it) and frees. */
void qmix_gen_stream_end(qmix_gen_stream *g, int flush);

/* history/n_history: the token ids the session holds (in/out; capacity max_ctx): the prompt's
 * common prefix with them is not recomputed, and on return they are the prompt plus the
 * generated tokens fed back. */
int qmix_generate(qmix_session *session, qmix_sampler *sampler, const qmix_tokenizer *tok,
                  const int32_t *prompt, int n_prompt, int32_t *history, int *n_history,
                  const qmix_gen_opts *opts, qmix_gen_text_fn on_text, void *user,
                  qmix_gen_result *result, qmix_err *err);

/* The same for a prompt with images (qmix_mm_prompt): embeds[n_prompt] replace image tokens'
 * embeddings, pos3[n_prompt][3] are the M-RoPE positions. The caller resets the session when the
 * images differ from those of the history it holds (the ids alone cannot tell). */
int qmix_generate_mm(qmix_session *session, qmix_sampler *sampler, const qmix_tokenizer *tok,
                     const int32_t *prompt, const float *const *embeds, const int32_t *pos3,
                     int n_prompt, int32_t *history, int *n_history, const qmix_gen_opts *opts,
                     qmix_gen_text_fn on_text, void *user, qmix_gen_result *result, qmix_err *err);

/* The model's own sampling defaults: generation_config.json's temperature, top_p and top_k, where
 * it gives them, over sp (for callers whose user set no sampling flag). */
void qmix_gen_sampling_defaults(qmix_sampling *sp, const qmix_generation_config *gen);

/* The ids that end a chat turn: generation_config.json's eos ids, then <|im_end|> if the tokenizer
 * has it. out holds QMIX_MAX_EOS + 1; returns the count. */
int qmix_gen_chat_stop_ids(const qmix_generation_config *gen, const qmix_tokenizer *tok,
                           int32_t *out);

#endif

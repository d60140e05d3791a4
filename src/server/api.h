/* The OpenAI-compatible API over the engine: request bodies validated and turned into jobs,
 * generated text turned into chat.completion / text_completion objects or server-sent-event
 * chunks. Nothing here knows about HTTP connections (server.c does). */
#ifndef QMIX_SERVER_API_H
#define QMIX_SERVER_API_H

#include <jansson.h>
#include <pthread.h>
#include <stddef.h>

#include "runtime/sampler.h"
#include "server/engine.h"
#include "text/tokenizer.h"

typedef struct api_ctx {
    srv_engine *eng;         /* NULL: requests are checked and built, never run (fuzzing) */
    qmix_tokenizer *tok;
    pthread_mutex_t *tok_mu; /* encoding fills the tokenizer's word cache: one at a time */
    const char *model_id;    /* what /v1/models lists and requests must name */
    const char *model_path;  /* accepted as a model name too */
    qmix_sampling defaults;
    int seed_given;
    const json_t *template_args;
    int ctx;
    /* images: the model's vision tower (NULL: none), the threads encoding images and the lock
     * that runs one encoding at a time, the most images one request may carry */
    const struct qmix_vision *vision;
    struct qmix_pool *vision_pool;
    pthread_mutex_t *vision_mu;
    int max_images;
} api_ctx;

typedef struct api_reply {
    int status;       /* HTTP status when there is no job (or before one could be submitted) */
    char *body;       /* malloc'd JSON body, when there is no job */
    srv_job *job;     /* the request was accepted and submitted */
    int stream;       /* the job's output is a server-sent-event stream */
    int retry_after;  /* seconds, for a 503 */
} api_reply;

void api_chat_completions(const api_ctx *ctx, const char *body, size_t len, api_reply *r);
void api_completions(const api_ctx *ctx, const char *body, size_t len, api_reply *r);
/* GET /v1/models and /health bodies. */
char *api_models(const api_ctx *ctx);
char *api_health(const api_ctx *ctx);
/* The response body of a finished non-streaming job; *status is 200 or 500. */
char *api_final(srv_job *job, int *status);
/* {"error": {"message", "type", "param", "code"}} (param and code may be NULL). */
char *api_error(const char *type, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif

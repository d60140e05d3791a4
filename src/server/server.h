/* `qmix serve`: an OpenAI-compatible HTTP server (libmicrohttpd) over one model.
 * Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/chat/completions,
 * POST /v1/completions. */
#ifndef QMIX_SERVER_SERVER_H
#define QMIX_SERVER_SERVER_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "qmix.h"
#include "runtime/sampler.h"

typedef struct qmix_server_opts {
    const char *model_path;  /* as given (weights file or directory) */
    const char *model_dir;   /* the checkpoint directory: tokenizer.json, generation_config.json */
    const char *model_id;    /* the name clients use; NULL: the directory's last component */
    const char *host;        /* address to bind (default 127.0.0.1) */
    int port;                /* 0: any free port (qmix_server_port tells which) */
    const char *api_key;     /* NULL: no authentication (never ""; the CLI refuses it) */
    const char *cors_origin; /* NULL: cross-origin requests refused; "*" or one origin */
    unsigned max_connections; /* open connections at most (0: 1024) */
    unsigned per_ip_limit;   /* connections per non-loopback client address (0: no limit) */
    unsigned idle_timeout;   /* seconds a connection may stay silent before its request is
                              * complete or between requests (0: 10) */
    int ctx;                 /* tokens per slot */
    int parallel;            /* slots: requests generated at the same time */
    int threads;             /* compute threads; 0: all cores */
    int prefill_chunk;       /* prompt tokens per step while others decode (0: 128) */
    size_t prefix_cache_bytes; /* prefix snapshot budget; 0: none */
    qmix_kv_type kv_type;    /* KV cache storage of the slots (0: f32) */
    int max_queue;           /* requests waiting for a slot before 503 */
    size_t max_body;         /* request body limit in bytes */
    const json_t *template_args; /* default chat_template_kwargs (an object) or NULL */
    qmix_sampling sampling;  /* defaults for fields a request leaves out */
    int sampling_given;      /* 0: the model's generation_config.json overrides temp/top-p/top-k */
    int seed_given;          /* 0: requests without a seed get a fresh random one */
    int max_images;          /* images one request may carry (0: 8); with a vision tower */
    const char *mmproj;      /* the vision tower as a separate mmproj GGUF, or NULL */
} qmix_server_opts;

typedef struct qmix_server qmix_server;

/* Loads the model, starts the slots and the HTTP listener; returns once it accepts requests. */
int qmix_server_start(const qmix_server_opts *opts, qmix_server **out, qmix_err *err);
int qmix_server_port(const qmix_server *srv);
const char *qmix_server_model_id(const qmix_server *srv);
/* Graceful shutdown: stops accepting, cancels running generations (their responses end
 * cleanly), waits for connections and workers, frees everything. */
void qmix_server_stop(qmix_server *srv);

#endif

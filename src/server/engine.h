/* The server's generation side: one model, N slots (a sequence state and its token history each)
 * and one scheduler thread that runs them all together (continuous batching). Each step it gathers
 * the active slots — one token of every decoding slot, a chunk of the prompt of slots still in
 * prefill — and runs them as one batched forward pass (one pass over the weights per step), then
 * samples each slot with its own sampler and streams its text. Requests join and leave between
 * steps; prompts are prefilled in chunks so running streams are not stalled for long. A job runs
 * on the free slot whose history is the longest prefix of its prompt, or resumes from the longest
 * matching snapshot in the prefix cache (KV rows + conv/delta-rule state at a prefix, shared by
 * all slots, LRU within a byte budget); when every slot is busy it waits in a bounded FIFO. */
#ifndef QMIX_SERVER_ENGINE_H
#define QMIX_SERVER_ENGINE_H

#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "formats/config.h"
#include "qmix.h"
#include "runtime/generate.h"
#include "runtime/sampler.h"
#include "text/tokenizer.h"

typedef struct srv_engine srv_engine;
typedef struct srv_job srv_job;

struct srv_job {
    /* the request, filled in before srv_engine_submit (the job owns prompt and stop) */
    int32_t *prompt;
    int n_prompt;
    qmix_sampling sampling;
    int max_tokens;
    char **stop;
    int n_stop;
    int chat; /* chat stops at <|im_end|> too; completions only at the model's eos ids */
    int ignore_eos; /* vLLM's extension: run to max_tokens (benchmarks, tests) */
    /* a prompt with images, or NULL: then prompt holds its keys (image rows negative, unique per
     * image content, so prefix reuse and the prefix cache tell images apart) and mm its real
     * tokens, embeddings and M-RoPE positions; the job owns and frees it */
    struct qmix_mm_request *mm;
    /* called on the scheduler thread: text as it is generated, then once at the end (res is set);
     * on_token (may be NULL) for each generated token with the logits it was drawn from, before
     * its text */
    void (*on_text)(srv_job *job, const char *text, size_t len);
    void (*on_token)(srv_job *job, int32_t id, const float *logits);
    void (*on_done)(srv_job *job);
    void *user;
    void (*free_user)(void *user);

    /* set by the worker; read by the HTTP side once srv_job_wait_done says it is done */
    volatile sig_atomic_t cancel; /* a disconnect or shutdown: stop after the current token */
    qmix_gen_result res;
    int failed;
    char error[QMIX_ERR_LEN];

    /* private to engine.c */
    srv_engine *eng;
    char *out;
    size_t out_len, out_cap, out_sent;
    int done, refs, oom;
    int reused, used_snapshot; /* prompt tokens not recomputed; whether a snapshot gave them */
    int prefilled;             /* prompt tokens the slot holds so far */
    pthread_cond_t cond;
    srv_job *next;
};

typedef struct srv_engine_opts {
    int n_slots;
    int ctx;       /* tokens per slot */
    int n_threads; /* compute threads of the batched forward pass; 0: all cores */
    int max_queue; /* requests waiting for a slot before new ones get 503 */
    int prefill_chunk;  /* prompt tokens per step while other slots decode (0: 128) */
    size_t cache_bytes; /* prefix cache budget; 0: no prefix cache */
    qmix_kv_type kv_type; /* the slots' KV cache storage (0: f32); snapshots keep that form */
} srv_engine_opts;

/* Takes no ownership of model and tok; they must outlive the engine. gen: the model's
 * end-of-generation ids (completions stop there; chat jobs also at <|im_end|>). */
int srv_engine_new(qmix_model *model, const qmix_tokenizer *tok,
                   const qmix_generation_config *gen, const srv_engine_opts *opts,
                   srv_engine **out, qmix_err *err);
/* Cancels everything running or queued, waits for the workers, frees. */
void srv_engine_free(srv_engine *eng);
/* Cancels running and queued jobs and refuses new ones (shutdown, before the HTTP side stops). */
void srv_engine_stop(srv_engine *eng);
int srv_engine_ctx(const srv_engine *eng);

srv_job *srv_job_new(void);
/* Hands the job to a slot or the queue. Returns 0, or 1 when the queue is full or the engine is
 * stopping (the job is untouched: the caller still owns it and frees it with srv_job_release). */
int srv_engine_submit(srv_engine *eng, srv_job *job);
/* Drops the caller's reference; the job is freed when the worker is done with it too. */
void srv_job_release(srv_job *job);
/* Worker side: appends bytes for the HTTP side to send (streaming). */
void srv_job_emit(srv_job *job, const char *data, size_t len);
/* Waits up to timeout_ms for the job to finish; 1 if it has. */
int srv_job_wait_done(srv_job *job, int timeout_ms);
/* Copies up to max emitted bytes not yet read into buf, waiting up to timeout_ms for some.
 * Returns the count; 0 with *eof = 1 when the job is done and everything was read. */
size_t srv_job_read(srv_job *job, char *buf, size_t max, int timeout_ms, int *eof);

/* Slots, queue and prefix-reuse counters, for /health. */
json_t *srv_engine_stats(srv_engine *eng);
/* The same counters and more in the Prometheus text format, for /metrics (malloc'd). */
char *srv_engine_metrics(srv_engine *eng);

#endif

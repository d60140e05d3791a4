/* A session: one sequence's state over a model (recurrent state, conv state, KV cache) and every
 * scratch buffer the forward pass needs, all allocated up front so decoding allocates nothing. */
#ifndef QMIX_RUNTIME_SESSION_H
#define QMIX_RUNTIME_SESSION_H

#include "model/model.h"
#include "runtime/threadpool.h"

/* Longest batch one forward call processes; longer prefills are split into batches this size. */
#define QMIX_MAX_BATCH 512
/* Gated DeltaNet prefill runs the chunked delta rule on blocks of this many tokens, for batches
 * of at least QMIX_GDN_CHUNK_MIN tokens (shorter ones go token by token). */
#define QMIX_GDN_CHUNK 64
#define QMIX_GDN_CHUNK_MIN 8

typedef struct qmix_layer_state {
    float *conv;      /* linear: [Kc-1][C], oldest first */
    float *ssm;       /* linear: [nv][dk][dv] */
    float *k_cache;   /* full: [max_ctx][KV*hd] */
    float *v_cache;   /* full: [max_ctx][KV*hd] */
} qmix_layer_state;

/* One matmul of a batched step: y = W·x for n tokens. */
typedef struct qmix_mm_job {
    const qk_mat *w;
    const float *x;
    int n;
    int64_t ldx;
    float *y;
    int64_t ldy;
} qmix_mm_job;

typedef struct qmix_mm_task { int job; int64_t row_begin, row_end; } qmix_mm_task;

struct qmix_session {
    qmix_model *model;
    qmix_pool *pool;
    int max_ctx, max_batch, pos;
    qmix_layer_state *state;

    /* activations, [max_batch][...] */
    float *x, *h, *out;                  /* [B][D] */
    float *qkv, *z, *gdn_a, *gdn_b, *gdn_o;  /* linear attention */
    float *q, *k, *v, *attn;             /* full attention */
    float *scores;                       /* [threads][max_ctx] */
    float *gdn_scratch;                  /* [threads][gdn_scratch_per_thread] */
    int64_t gdn_scratch_per_thread;
    float *router;                       /* [B][E] */
    int *top_expert;                     /* [B][k] */
    float *top_weight;                   /* [B][k] */
    int *expert_count, *expert_start;    /* [E] */
    int *slot_token;                     /* [B*k]: token of each routed slot, grouped by expert */
    int *token_slot;                     /* [B][k]: slot of each (token, choice) */
    float *moe_x, *moe_gate, *moe_up, *moe_y; /* [B*k][D or F] */
    float *sh_gate, *sh_up, *sh_y, *sh_g; /* shared expert */
    float *logits;                       /* [V]: the last token's */
    float *norm_last;                    /* [D] */

    void *arena;                         /* every buffer above, one allocation */
    size_t arena_bytes;

    qmix_mm_job *jobs;
    int max_jobs;
    qmix_mm_task *tasks;
    int max_tasks;

    /* Observer of every matmul step, called after the step ran (NULL in normal use): the
     * sensitivity analysis reads the real activations entering the matrices it perturbs. It may
     * call qmix_run_matmuls itself once it has cleared mm_tap (the step's tasks are finished). */
    void (*mm_tap)(void *user, qmix_session *s, const qmix_mm_job *jobs, int n_jobs);
    void *mm_tap_user;
};

/* What a session over a model of geometry cfg, holding max_ctx tokens with n_threads threads
 * (<= 0: all cores, as qmix_session_new), allocates — computed by the same code that carves the
 * session's buffers, without allocating them, so a planner and the session cannot disagree.
 * arena = kv + state + scratch (the one aligned allocation); other: the session struct, layer
 * state table, matmul job/task lists; total = arena + other. The thread pool's stacks are not
 * counted (its workers touch a few KiB of them). */
typedef struct qmix_session_sizes {
    size_t kv;       /* float32 K and V caches of the full-attention layers, max_ctx tokens */
    size_t state;    /* Gated DeltaNet conv + recurrent state: fixed, independent of max_ctx */
    size_t scratch;  /* activations for min(max_ctx, QMIX_MAX_BATCH) tokens, per-thread buffers,
                        logits */
    size_t arena, other, total;
} qmix_session_sizes;
void qmix_session_size(const qmix_config *cfg, int max_ctx, int n_threads, qmix_session_sizes *out);
size_t qmix_session_bytes(const qmix_config *cfg, int max_ctx, int n_threads);

/* Runs n_jobs matmuls as one parallel step over the pool. */
void qmix_run_matmuls(qmix_session *s, const qmix_mm_job *jobs, int n_jobs);

#endif

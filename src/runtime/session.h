/* A session: the scratch buffers and thread pool the forward pass needs, plus its own sequence
 * (recurrent state, conv state, KV cache), all allocated up front so decoding allocates nothing.
 * More sequences (qmix_seq) can share one session's scratch: qmix_forward_batch runs tokens of
 * several of them in one pass over the weights (the server's continuous batching). */
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

/* One sequence's state: where it is and what the layers carry from token to token. */
typedef struct qmix_seq {
    int max_ctx, pos;
    qmix_layer_state *state; /* [n_layers] */
    void *arena;             /* owned buffers (NULL for a session's own sequence) */
    /* Optional (speculative decoding's rollback; NULL normally): a forward pass over this
     * sequence then runs the delta rule token by token and saves every linear-attention layer's
     * conv window and delta-rule state after each of its first row_state_rows rows: for the
     * l-th linear-attention layer (counting only those) at
     * row_state + (l * row_state_rows + row) * qmix_seq_layer_state_floats(cfg), conv first. */
    float *row_state;
    int row_state_rows;
} qmix_seq;

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
    int max_ctx, max_batch;
    qmix_seq seq;                        /* the session's own sequence */

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
    int *row_seg;                        /* [B]: segment of each row of a batch */
    int *seg_row;                        /* [B]: first row of each segment */

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

/* A session for qmix_forward_batch only: scratch and threads, no sequence of its own (its
 * qmix_session_* calls must not be used). */
int qmix_session_new_shared(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                            qmix_err *err);

/* A sequence of up to max_ctx tokens over cfg's geometry, at position 0. */
int qmix_seq_new(const qmix_config *cfg, int max_ctx, qmix_seq **out, qmix_err *err);
void qmix_seq_free(qmix_seq *seq);
/* Back to position 0 with zero recurrent state. */
void qmix_seq_reset(qmix_seq *seq, const qmix_config *cfg);
/* Bytes of a snapshot of a sequence at n tokens: KV rows [0, n) of the full-attention layers plus
 * the recurrent (conv + delta-rule) state of the linear-attention layers. */
size_t qmix_seq_snapshot_bytes(const qmix_config *cfg, int n);
/* Copies the sequence's state at its position pos into buf (qmix_seq_snapshot_bytes(pos)), or
 * back (restore: the sequence is then at position n). */
void qmix_seq_save(const qmix_seq *seq, const qmix_config *cfg, float *buf);
void qmix_seq_restore(qmix_seq *seq, const qmix_config *cfg, const float *buf, int n);
/* Floats of one linear-attention layer's conv window plus delta-rule state. */
size_t qmix_seq_layer_state_floats(const qmix_config *cfg);

#endif

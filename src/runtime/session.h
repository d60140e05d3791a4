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
    uint8_t *k_cache; /* full: [max_ctx] rows of kv_row_bytes: KV heads × hd values of kv_type */
    uint8_t *v_cache; /* full: likewise */
} qmix_layer_state;

/* One sequence's state: where it is and what the layers carry from token to token. */
typedef struct qmix_seq {
    int max_ctx, pos;
    qmix_kv_type kv_type;    /* how its KV cache stores keys and values (never DEFAULT) */
    size_t kv_row_bytes;     /* one token's K (or V) row of one layer: qmix_kv_row_bytes */
    int rope_delta;          /* rotary position of the token at index p is p + rope_delta (images
                                take fewer positions than tokens: M-RoPE) */
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
    qmix_kv_type kv_type;                /* of the session's own sequence */
    qmix_seq seq;                        /* the session's own sequence */

    /* activations, [max_batch][...] */
    float *x, *h, *out;                  /* [B][D] */
    float *qkv, *z, *gdn_a, *gdn_b, *gdn_o;  /* linear attention */
    float *q, *k, *v, *attn;             /* full attention */
    float *scores;                       /* [threads][attn_scratch_per_thread]: attention's
                                            score tiles and row, whatever the context */
    int64_t attn_scratch_per_thread;
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
    size_t kv;       /* K and V caches of the full-attention layers, max_ctx tokens of kv_type */
    size_t state;    /* Gated DeltaNet conv + recurrent state: fixed, independent of max_ctx */
    size_t scratch;  /* activations for min(max_ctx, QMIX_MAX_BATCH) tokens, per-thread buffers,
                        logits */
    size_t arena, other, total;
} qmix_session_sizes;
void qmix_session_size(const qmix_config *cfg, int max_ctx, int n_threads, qmix_kv_type kv,
                       qmix_session_sizes *out);
size_t qmix_session_bytes(const qmix_config *cfg, int max_ctx, int n_threads, qmix_kv_type kv);

/* Bytes of one token's K (or V) row of one full-attention layer stored as kv (DEFAULT: f32), and
 * of one token in every full-attention layer, K and V: the planner's KV per token. */
size_t qmix_kv_row_bytes(const qmix_config *cfg, qmix_kv_type kv);
size_t qmix_kv_token_bytes(const qmix_config *cfg, qmix_kv_type kv);
/* Whether the model's heads can be stored as kv (quantized types need head_dim % 32 == 0). */
int qmix_kv_check(const qmix_config *cfg, qmix_kv_type kv, qmix_err *err);

/* Prefill with image rows (qmix_forward_batch_mm): embeds[n] (NULL entries: text) and
 * pos3[n][3] M-RoPE positions of the prompt's tokens, in batches. */
int qmix_session_prefill_mm(qmix_session *s, const int32_t *tokens, int n, const float *const *embeds,
                            const int32_t *pos3, float *all_logits, qmix_err *err);

/* Whether n tokens can be fed to the session's own sequence next: at least one, room for them in
 * max_ctx, every id inside the vocabulary; -1 with err saying which does not hold. */
int qmix_session_check_tokens(const qmix_session *s, const int32_t *tokens, int n, qmix_err *err);

/* Runs n_jobs matmuls as one parallel step over the pool. */
void qmix_run_matmuls(qmix_session *s, const qmix_mm_job *jobs, int n_jobs);

/* A session for qmix_forward_batch only: scratch and threads, no sequence of its own (its
 * qmix_session_* calls must not be used). */
int qmix_session_new_shared(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                            qmix_err *err);

/* A sequence of up to max_ctx tokens over cfg's geometry, at position 0, its KV cache stored as
 * kv (DEFAULT: f32). A sequence run by a shared session keeps its own type. */
int qmix_seq_new(const qmix_config *cfg, int max_ctx, qmix_kv_type kv, qmix_seq **out,
                 qmix_err *err);
void qmix_seq_free(qmix_seq *seq);
/* Back to position 0 with zero recurrent state. */
void qmix_seq_reset(qmix_seq *seq, const qmix_config *cfg);
/* Bytes of a snapshot of a sequence at n tokens: KV rows [0, n) of the full-attention layers in
 * their stored form (kv) plus the recurrent (conv + delta-rule) state of the linear-attention
 * layers. */
size_t qmix_seq_snapshot_bytes(const qmix_config *cfg, qmix_kv_type kv, int n);
/* Copies the sequence's state at its position pos into buf (qmix_seq_snapshot_bytes(its kv type,
 * pos)), or back (restore: the sequence, of the same kv type, is then at position n). rope_delta
 * is not part of the snapshot: a caller restoring a prefix with images sets it from the prompt's
 * positions. */
void qmix_seq_save(const qmix_seq *seq, const qmix_config *cfg, void *buf);
void qmix_seq_restore(qmix_seq *seq, const qmix_config *cfg, const void *buf, int n);
/* Floats of one linear-attention layer's conv window plus delta-rule state. */
size_t qmix_seq_layer_state_floats(const qmix_config *cfg);

#endif

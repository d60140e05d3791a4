/* Memory planning: what a model (a checkpoint, or a built-in geometry) needs in memory with a
 * given recipe, context length and thread count, and the longest context that fits in a memory
 * budget. Every figure comes from the code that allocates or writes it: weights from the
 * quantizer's own plan (qmix_quantize dry run, qmix_quant_estimate), the session from
 * qmix_session_size, the model's heap from qmix_model_heap_bytes. Library code: no printing. */
#ifndef QMIX_EVAL_PLAN_H
#define QMIX_EVAL_PLAN_H

#include <stdint.h>

#include "qmix.h"
#include "quant/recipe.h"

/* The process itself: code and data of the binary and its shared libraries, libc's heap, thread
 * stacks in use. Measured: `qmix presets` peaks at 3.3 MiB RSS, `qmix bench` on the 2.6 MiB
 * tiny-a fixture at 5.4 MiB. */
#define QMIX_PLAN_PROCESS_BYTES ((uint64_t)4 << 20)
/* Heap per tensor of an opened checkpoint (its parsed header entry and name). */
#define QMIX_PLAN_TENSOR_BYTES 512u

/* Contexts of the KV table (seed-card style: "32K" = 32768 tokens, "100K" = 102400). */
#define QMIX_PLAN_N_TABLE_CTX 5
extern const int qmix_plan_table_ctx[QMIX_PLAN_N_TABLE_CTX];
/* KV element widths of the table's rows: qmix's own caches, f32, f16, q8_0, q4_0. */
#define QMIX_PLAN_N_TABLE_BITS 4
extern const int qmix_plan_table_bits[QMIX_PLAN_N_TABLE_BITS];

typedef struct qmix_plan_opts {
    const qmix_recipe *recipe; /* NULL: the weights as stored */
    int kv_bits;               /* 32 (f32; also when 0), 16 (f16), 8 (q8_0) or 4 (q4_0) */
    int ctx;                   /* context to predict the peak for; <= 0: 4096 (a session's default) */
    int vision;                /* count the vision tower */
    int n_threads;             /* <= 0: all cores, as a session would */
    uint64_t memory, reserve;  /* the budget: memory − reserve is what the process may use */
} qmix_plan_opts;

typedef struct qmix_plan {
    qmix_config cfg;
    int n_full, n_linear;      /* full-attention / Gated DeltaNet layers */
    int n_threads, kv_bits, ctx;
    int from_checkpoint;       /* 0: a built-in geometry (--like) */
    int vision_estimated;      /* vision bytes from the vision-config geometry, not tensors */
    int recipe_applied;

    /* weights: the text model's tensors the engine maps (MTP and vision excluded) */
    uint64_t weight_bytes, weight_params;
    double bpw;                /* 8·bytes/params (mlx-lm's count) */
    uint64_t embed_bytes;      /* the untied embedding table, part of weight_bytes: counted whole,
                                  though only the rows of tokens seen so far become resident */
    uint64_t skipped_bytes;    /* in the checkpoint but never read (MTP; vision without --vision) */
    int skipped_vision;        /* skipped_bytes includes a vision tower */
    uint64_t vision_bytes;     /* 0 unless opts.vision */
    uint64_t engine_bytes;     /* the process, the model's heap (widened 1-D parameters, views),
                                  the parsed checkpoint header */
    uint64_t runtime_bytes;    /* the session minus KV and GDN state: activations for the batch,
                                  per-thread buffers, logits, job lists (at ctx) */
    uint64_t state_bytes;      /* Gated DeltaNet conv + recurrent state, float32, fixed */
    uint64_t kv_bytes_per_token; /* full layers × 2 × KV heads × head_dim values, scales included */
    uint64_t kv_bytes;         /* at ctx */
    uint64_t fixed_bytes;      /* everything but the KV cache, at ctx */
    uint64_t peak_bytes;       /* fixed + KV, at ctx */
    uint64_t available;        /* memory − reserve (0 if the reserve exceeds the memory) */
    int64_t headroom;          /* available − fixed: what is left for the KV cache (< 0: short) */
    int64_t max_context;       /* longest context whose peak fits in available; 0: none */
    int max_context_is_model_limit; /* max_context stopped at max_position_embeddings */
    int fits;                  /* peak_bytes <= available */
} qmix_plan;

/* Plans for the checkpoint in directory dir (HF or MLX layout). With a recipe the weights are
 * sized by the quantizer's own plan (`qmix quantize` run dry). */
int qmix_plan_checkpoint(const char *dir, const qmix_plan_opts *o, qmix_plan *out, qmix_err *err);
/* Plans for a built-in geometry ("35b-a3b", "122b-a10b", "397b-a17b", "tiny") with its real
 * layer count; without a recipe the weights are bf16 as released. */
int qmix_plan_like(const char *like, const qmix_plan_opts *o, qmix_plan *out, qmix_err *err);

/* The KV cache type of a width: 32 f32, 16 f16, 8 q8_0, 4 q4_0. */
qmix_kv_type qmix_plan_kv_type(int kv_bits);
/* Bytes per token of qmix's KV cache at that width (qmix_kv_token_bytes: 8.5 and 4.5 bits per
 * value at 8 and 4, block scales included). */
uint64_t qmix_plan_kv_per_token(const qmix_config *cfg, int kv_bits);
/* The peak for another context (or kv width) of a finished plan. */
uint64_t qmix_plan_peak_at(const qmix_plan *p, int64_t ctx, int kv_bits);
/* The longest context (tokens) whose peak fits in the plan's available memory at kv_bits; 0 if
 * none. *is_model_limit (may be NULL) is set when it stopped at max_position_embeddings. */
int64_t qmix_plan_max_context(const qmix_plan *p, int kv_bits, int *is_model_limit);
/* Parameters of the Qwen3.5 vision tower whose merger projects to out_hidden (the LM's hidden
 * size); geometry of shared/assets/qwen3.5/vision-config.md. */
uint64_t qmix_plan_vision_params(int out_hidden);

/* "16G", "3.5G", "512M", "11GiB", "64k", "1000": bytes, every unit binary (K = 1024, and
 * KB = KiB = K). -1 with a message on anything else. */
int qmix_parse_bytes(const char *s, uint64_t *out, qmix_err *err);

#endif

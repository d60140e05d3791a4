/* qmix — the public API: open a Qwen3.5-MoE checkpoint, run sessions over it.
 *
 * Errors: every call that can fail returns 0 on success and -1 on failure, with a message that
 * names the file / tensor / field in the caller's qmix_err. */
#ifndef QMIX_H
#define QMIX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library's version. The minor number grows with every release that adds to the API; while
 * the major number is 0 the ABI may change between minor versions (rebuild against the new
 * header), never within one. */
#define QMIX_VERSION_MAJOR 0
#define QMIX_VERSION_MINOR 14
#define QMIX_VERSION_PATCH 0
#define QMIX_VERSION "0.14.0"

/* The version the library was built as (QMIX_VERSION of its build). */
const char *qmix_version(void);
/* What this build is and what it found on this CPU, one "key: value" line each: version, git
 * revision, compiler, the SIMD paths compiled in and which are used here. Returns the length
 * written (truncated to len - 1), as snprintf. */
int qmix_build_info(char *buf, size_t len);

#define QMIX_ERR_LEN 1024
typedef struct qmix_err { char msg[QMIX_ERR_LEN]; } qmix_err;

typedef enum qmix_dtype {
    QMIX_DTYPE_UNKNOWN = 0,
    QMIX_F32, QMIX_F16, QMIX_BF16,
    QMIX_U32, QMIX_I32, QMIX_U8, QMIX_I8, QMIX_I64, QMIX_U16, QMIX_I16, QMIX_F64, QMIX_BOOL,
    QMIX_DTYPE_COUNT
} qmix_dtype;

const char *qmix_dtype_name(qmix_dtype dtype);
size_t qmix_dtype_size(qmix_dtype dtype);

#define QMIX_MAX_LAYERS 512

/* The text model's geometry, read from config.json (text_config or the flat text-only form). */
typedef struct qmix_config {
    int hidden_size;             /* D */
    int n_layers;                /* L */
    int vocab_size;              /* V */
    int n_heads, n_kv_heads, head_dim;        /* full attention: H, KV, hd */
    int rot_dim;                 /* head_dim * partial_rotary_factor */
    double rope_theta;
    int mrope_section[3];        /* M-RoPE (t, h, w) sections in rotary pairs; 0 0 0: text-only */
    int lin_n_k_heads, lin_n_v_heads;         /* nk, nv */
    int lin_k_head_dim, lin_v_head_dim;       /* dk, dv */
    int conv_kernel;             /* Kc */
    int n_experts, n_experts_used;            /* E, top-k */
    int moe_ffn, shared_ffn;     /* F, Fs */
    float rms_eps;
    int tie_embeddings;
    int mtp_layers;
    int eos_token_id;            /* -1 if absent */
    int max_position_embeddings;
    uint8_t layer_is_full[QMIX_MAX_LAYERS]; /* 1: gated full attention, 0: Gated DeltaNet */
} qmix_config;

typedef struct qmix_model qmix_model;
typedef struct qmix_session qmix_session;

/* path: a checkpoint directory (config.json + model.safetensors or a sharded index), or a
 * .safetensors file with config.json beside it. Weights are mmapped, not copied. */
int qmix_model_open(const char *path, qmix_model **out, qmix_err *err);
void qmix_model_close(qmix_model *model);
const qmix_config *qmix_model_config(const qmix_model *model);

/* How the KV cache of the full-attention layers stores keys and values: written once when a
 * token enters the cache, read in that form by attention. Q8_0 and Q4_0 are blocks of 32 values
 * of one head with a float16 scale, symmetric (8.5 and 4.5 bits per value); they need a head_dim
 * that is a multiple of 32. */
typedef enum qmix_kv_type {
    QMIX_KV_DEFAULT = 0, /* QMIX_KV_F32 */
    QMIX_KV_F32, QMIX_KV_F16, QMIX_KV_Q8_0, QMIX_KV_Q4_0,
    QMIX_KV_COUNT
} qmix_kv_type;

/* "f32", "f16", "q8_0", "q4_0". */
const char *qmix_kv_type_name(qmix_kv_type kv);
/* The type of a name ("f32", "f16", "q8_0", "q4_0") or of a width in bits ("32", "16", "8", "4");
 * QMIX_KV_DEFAULT if neither. */
qmix_kv_type qmix_kv_type_parse(const char *name);
/* Bits per value including the scales (32, 16, 8.5, 4.5). */
double qmix_kv_type_bits(qmix_kv_type kv);

typedef struct qmix_session_opts {
    int max_ctx;     /* longest sequence the session holds (KV cache size) */
    int n_threads;   /* 0: all cores */
    qmix_kv_type kv_type; /* 0: QMIX_KV_F32 */
} qmix_session_opts;

int qmix_session_new(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                     qmix_err *err);
void qmix_session_free(qmix_session *session);
/* Forget the sequence: position 0, recurrent state and KV cache cleared. */
void qmix_session_reset(qmix_session *session);
/* Feed n_tokens in one batched pass. all_logits, if non-NULL, receives [n_tokens, vocab]
 * row-major; the last row is always available from qmix_session_logits. */
int qmix_session_prefill(qmix_session *session, const int32_t *tokens, int n_tokens,
                         float *all_logits, qmix_err *err);
/* Feed one token. Allocates nothing. */
int qmix_session_decode(qmix_session *session, int32_t token, qmix_err *err);
/* Logits after the last token fed: [vocab]. */
const float *qmix_session_logits(const qmix_session *session);
int qmix_session_pos(const qmix_session *session);
int qmix_session_threads(const qmix_session *session);

#ifdef __cplusplus
}
#endif
#endif

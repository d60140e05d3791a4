/* The bound text model: every weight the forward pass reads, as views into the mapped
 * checkpoint. Only small 1-D parameters (norms, A_log, dt_bias, conv1d) are widened to float32
 * copies, with the per-tensor transforms (1 + w, -exp) applied once at load. */
#ifndef QMIX_MODEL_MODEL_H
#define QMIX_MODEL_MODEL_H

#include "formats/safetensors.h"
#include "kernels/kernels.h"
#include "model/roles.h"
#include "qmix.h"

typedef struct qmix_expert { qk_mat gate, up, down; } qmix_expert;

typedef struct qmix_layer {
    int is_full;
    float *input_norm, *post_norm;       /* [D], stored as 1 + w */
    /* Gated DeltaNet */
    qk_mat in_qkv, in_z, in_b, in_a, out_proj;
    float *conv_w;                       /* [C][Kc] */
    float *neg_exp_A;                    /* [nv], -exp(A_log) */
    float *dt_bias;                      /* [nv] */
    float *gdn_norm;                     /* [dv], plain weight */
    /* gated full attention */
    qk_mat q_proj, k_proj, v_proj, o_proj;
    float *q_norm, *k_norm;              /* [hd], 1 + w */
    /* MoE */
    qk_mat router;                       /* [E, D] */
    qmix_expert *experts;                /* [E] */
    qk_mat shared_gate, shared_up, shared_down, shared_expert_gate; /* last: [1, D] */
} qmix_layer;

/* The Multi-Token Prediction block (mtp.*), used only for speculative decoding: from the trunk's
 * final-normed hidden state at t and the embedding of token t+1 it predicts token t+2 through
 * u = fc · [norm_embed(embed); norm_hidden(h)], one gated full-attention MoE layer (its own KV
 * cache), norm and the shared lm_head. */
typedef struct qmix_mtp {
    qk_mat fc;                           /* [D, 2D] */
    float *norm_embed, *norm_hidden, *norm; /* [D], stored as 1 + w */
    qmix_layer layer;                    /* is_full = 1 */
    qmix_expert *experts;                /* [E], layer.experts */
    float *f32_pool;                     /* its widened norms */
} qmix_mtp;

/* Floats of the MTP block's widened 1-D parameters (its norms and the layer's). */
static inline size_t qmix_mtp_f32_floats(const qmix_config *c)
{
    return (size_t)(5 * c->hidden_size + 2 * c->head_dim);
}
/* A zeroed MTP block with its expert views and 1-D parameter pool, set as m->mtp (freed with the
 * model); NULL with err when out of memory. */
qmix_mtp *qmix_mtp_alloc(qmix_model *m, qmix_err *err);

struct qmix_model {
    qmix_config cfg;
    char *dir;
    qmix_st_store *store;
    qk_mat embed, lm_head;
    float *final_norm;                   /* [D], 1 + w */
    qmix_layer *layers;
    qmix_expert *expert_pool;            /* all layers' expert views */
    float *f32_pool;                     /* all widened small parameters */
    int experts_fused;                   /* 1: 3-D gate_up_proj/down_proj; 0: per-expert */
    int experts_switch;                  /* 1: MLX stacked switch_mlp.{gate,up,down}_proj */
    int mlx_layout;                      /* MLX checkpoint (names, quantization block) */
    int norms_shifted;                   /* norms stored as 1 + w (MLX) */
    struct qmix_qconfig *qconfig;        /* MLX quantization block of config.json, or NULL */
    const char *prefix;                  /* "model.language_model.", "language_model.model." or "model." */
    struct qmix_gguf *gguf;              /* GGUF checkpoint (then store is NULL), or NULL */
    int gdn_v_tiled;                     /* GDN value heads in GGUF's tiled order (key head p % nk) */
    struct qmix_gptq_info *gptq;         /* GPTQ quantization_config, or NULL */
    void **repacked;                     /* GPTQ modules repacked at load (codes, scales, biases) */
    size_t n_repacked, cap_repacked;
    qmix_mtp *mtp;                       /* the MTP block, or NULL if the checkpoint has none */
};

/* Opens path as a qwen35moe GGUF and binds every weight (model_gguf.c); fills m->cfg. */
int qmix_model_bind_gguf(qmix_model *m, const char *path, qmix_err *err);

/* Heap bytes qmix_model_open allocates for a geometry besides the mapped weights: the widened
 * float32 parameters (f32_pool) and the layer / expert views (for planners). */
size_t qmix_model_heap_bytes(const qmix_config *c);

/* Calls fn for every matrix the forward pass reads (embedding, lm_head, each layer's projections,
 * router, shared and routed experts; no lm_head when it is the embedding), with its role and layer (-1
 * for embed / lm_head) and expert (-1 unless routed). */
typedef void (*qmix_matrix_fn)(void *user, qmix_role role, int layer, int expert, const qk_mat *w);
void qmix_model_for_each_matrix(const qmix_model *m, qmix_matrix_fn fn, void *user);
/* Bytes of a bound matrix: codes or values, plus scales and biases where quantized. */
uint64_t qmix_mat_bytes(const qk_mat *w);

/* Bytes of weights one decoded token reads: everything but the unused experts (and only one
 * embedding row). */
uint64_t qmix_model_decode_bytes(const qmix_model *m);

#endif

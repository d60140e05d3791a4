/* Tensor roles: the unit recipes, `qmix info` and sensitivity reports talk about. */
#ifndef QMIX_MODEL_ROLES_H
#define QMIX_MODEL_ROLES_H

typedef enum qmix_role {
    QMIX_ROLE_EMBED, QMIX_ROLE_LM_HEAD,
    QMIX_ROLE_ATTN_Q, QMIX_ROLE_ATTN_K, QMIX_ROLE_ATTN_V, QMIX_ROLE_ATTN_O,
    QMIX_ROLE_GDN_QKV, QMIX_ROLE_GDN_Z, QMIX_ROLE_GDN_A, QMIX_ROLE_GDN_B, QMIX_ROLE_GDN_OUT,
    QMIX_ROLE_GDN_PARAMS, QMIX_ROLE_NORM, QMIX_ROLE_ROUTER, QMIX_ROLE_SHARED_EXPERT,
    QMIX_ROLE_SHARED_EXPERT_GATE, QMIX_ROLE_EXPERTS_GATE_UP, QMIX_ROLE_EXPERTS_DOWN,
    QMIX_ROLE_VISION, QMIX_ROLE_MTP, QMIX_ROLE_OTHER,
    QMIX_ROLE_COUNT
} qmix_role;

qmix_role qmix_role_of(const char *tensor_name);
const char *qmix_role_name(qmix_role role);
/* The role of a tensor of a qwen35moe GGUF ("blk.3.ffn_down_exps.weight"); blocks from n_layers
 * on are the MTP layers. */
qmix_role qmix_role_of_gguf(const char *tensor_name, int n_layers);
/* Layer index in the name ("...layers.12...."), or -1. */
int qmix_layer_of(const char *tensor_name);

#endif

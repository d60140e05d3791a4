#include "model/roles.h"

#include <stdlib.h>
#include <string.h>

static const char *role_names[QMIX_ROLE_COUNT] = {
    "embed", "lm_head", "attn_q", "attn_k", "attn_v", "attn_o", "gdn_qkv", "gdn_z", "gdn_a",
    "gdn_b", "gdn_out", "gdn_params", "norm", "router", "shared_expert", "shared_expert_gate",
    "experts_gate_up", "experts_down", "vision", "mtp", "other"};

const char *qmix_role_name(qmix_role role)
{
    return (unsigned)role < QMIX_ROLE_COUNT ? role_names[role] : "?";
}

static int has(const char *s, const char *part) { return strstr(s, part) != NULL; }

qmix_role qmix_role_of(const char *n)
{
    if (!strncmp(n, "mtp.", 4)) return QMIX_ROLE_MTP;
    if (has(n, "visual.") || !strncmp(n, "vision_tower.", 13)) return QMIX_ROLE_VISION;
    if (has(n, "embed_tokens")) return QMIX_ROLE_EMBED;
    if (!strncmp(n, "lm_head", 7) || has(n, ".lm_head.")) return QMIX_ROLE_LM_HEAD;
    if (has(n, "linear_attn.")) {
        if (has(n, ".in_proj_qkv")) return QMIX_ROLE_GDN_QKV;
        if (has(n, ".in_proj_z")) return QMIX_ROLE_GDN_Z;
        if (has(n, ".in_proj_a")) return QMIX_ROLE_GDN_A;
        if (has(n, ".in_proj_b")) return QMIX_ROLE_GDN_B;
        if (has(n, ".out_proj")) return QMIX_ROLE_GDN_OUT;
        if (has(n, ".norm.")) return QMIX_ROLE_NORM;
        return QMIX_ROLE_GDN_PARAMS; /* A_log, dt_bias, conv1d */
    }
    if (has(n, "self_attn.")) {
        if (has(n, "_norm")) return QMIX_ROLE_NORM;
        if (has(n, ".q_proj")) return QMIX_ROLE_ATTN_Q;
        if (has(n, ".k_proj")) return QMIX_ROLE_ATTN_K;
        if (has(n, ".v_proj")) return QMIX_ROLE_ATTN_V;
        if (has(n, ".o_proj")) return QMIX_ROLE_ATTN_O;
    }
    if (has(n, "mlp.shared_expert_gate")) return QMIX_ROLE_SHARED_EXPERT_GATE;
    if (has(n, "mlp.shared_expert.")) return QMIX_ROLE_SHARED_EXPERT;
    if (has(n, "mlp.gate.")) return QMIX_ROLE_ROUTER;
    if (has(n, "mlp.experts.") || has(n, "mlp.switch_mlp.")) {
        if (has(n, "down_proj")) return QMIX_ROLE_EXPERTS_DOWN;
        if (has(n, "gate_up_proj") || has(n, "gate_proj") || has(n, "up_proj"))
            return QMIX_ROLE_EXPERTS_GATE_UP;
    }
    if (has(n, "norm")) return QMIX_ROLE_NORM;
    return QMIX_ROLE_OTHER;
}

int qmix_layer_of(const char *n)
{
    const char *p = strstr(n, "layers.");
    if (!p) return -1;
    p += 7;
    if (*p < '0' || *p > '9') return -1;
    return (int)strtol(p, NULL, 10);
}

qmix_role qmix_role_of_gguf(const char *n, int n_layers)
{
    if (!strncmp(n, "token_embd.", 11)) return QMIX_ROLE_EMBED;
    if (!strncmp(n, "output.", 7)) return QMIX_ROLE_LM_HEAD;
    if (!strncmp(n, "v.", 2) || !strncmp(n, "mm.", 3)) return QMIX_ROLE_VISION;
    if (strncmp(n, "blk.", 4)) return has(n, "norm") ? QMIX_ROLE_NORM : QMIX_ROLE_OTHER;
    char *end;
    long layer = strtol(n + 4, &end, 10);
    if (end == n + 4 || *end != '.') return QMIX_ROLE_OTHER;
    if (layer >= n_layers || has(end, ".nextn.")) return QMIX_ROLE_MTP;
    static const struct { const char *part; qmix_role role; } map[] = {
        /* longest names first: ffn_gate_inp_shexp before ffn_gate_inp and _shexp */
        {".ffn_gate_inp_shexp.", QMIX_ROLE_SHARED_EXPERT_GATE},
        {".ffn_gate_inp.", QMIX_ROLE_ROUTER},
        {"_shexp.", QMIX_ROLE_SHARED_EXPERT},
        {".ffn_down_exps.", QMIX_ROLE_EXPERTS_DOWN},
        {"_exps.", QMIX_ROLE_EXPERTS_GATE_UP},
        {".attn_qkv.", QMIX_ROLE_GDN_QKV},
        {".attn_gate.", QMIX_ROLE_GDN_Z},
        {".ssm_alpha.", QMIX_ROLE_GDN_A},
        {".ssm_beta.", QMIX_ROLE_GDN_B},
        {".ssm_out.", QMIX_ROLE_GDN_OUT},
        {"_norm.", QMIX_ROLE_NORM},
        {".ssm_", QMIX_ROLE_GDN_PARAMS},
        {".attn_q.", QMIX_ROLE_ATTN_Q},
        {".attn_k.", QMIX_ROLE_ATTN_K},
        {".attn_v.", QMIX_ROLE_ATTN_V},
        {".attn_output.", QMIX_ROLE_ATTN_O},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (has(end, map[i].part)) return map[i].role;
    return QMIX_ROLE_OTHER;
}

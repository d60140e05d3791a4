/* Binds a qwen35moe GGUF (spec/quant-formats.md §5.5–5.6, §5.9) onto qmix's layers as views into
 * the mapped file, undoing what llama.cpp's converter did:
 *   - norms are stored as 1 + w and ssm_a as -exp(A_log): exactly the float32 forms the forward
 *     pass uses, so they are widened as they are;
 *   - ssm_conv1d is the squeezed [C, Kc] kernel: qmix's own layout;
 *   - the routed experts are split ffn_gate_exps / ffn_up_exps (or the fused ffn_gate_up_exps
 *     llama.cpp also accepts), sliced per expert;
 *   - the GDN value heads are stored tiled (GGUF position j·nk + g holds HF head g·r + j). The
 *     permutation is consistent across every tensor it touches (qkv V rows, z, b, a, A, dt_bias,
 *     conv V channels, out_proj columns), so instead of moving bytes (impossible in place for
 *     K-quant ssm_out rows) the model keeps the tiled order and the forward pass pairs value head
 *     p with key head p mod nk (m->gdn_v_tiled), as llama.cpp does.
 * Float tensors (F32/F16/BF16) become plain qk_mat views; block-quantized ones QMIX_U8 views. */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/config.h"
#include "formats/gguf.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"
#include "util/err.h"

typedef struct gbinder {
    qmix_model *m;
    const qmix_gguf *g;
    qmix_err *err;
    float *f32_next, *f32_end;
    char name[128];
} gbinder;

static const qmix_gguf_tensor *gfind(gbinder *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static const qmix_gguf_tensor *gfind(gbinder *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    return qmix_gguf_find(b->g, b->name);
}

/* Checks b->name's tensor t has logical ne {cols, rows, nmat} (trailing 1-dims are equivalent)
 * and a type qmix runs. */
static int check(gbinder *b, const qmix_gguf_tensor *t, int64_t cols, int64_t rows, int64_t nmat)
{
    if (!t) return qmix_errf(b->err, "missing tensor '%s'", b->name);
    if (!qmix_ggml_type_supported(t->type))
        return qmix_errf(b->err, "tensor '%s': unsupported type %s", b->name,
                         qmix_ggml_type_name(t->type));
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != nmat || t->ne[3] != 1)
        return qmix_errf(b->err, "tensor '%s' has ne {%lld, %lld, %lld, %lld}, expected {%lld, "
                         "%lld, %lld}", b->name, (long long)t->ne[0], (long long)t->ne[1],
                         (long long)t->ne[2], (long long)t->ne[3], (long long)cols,
                         (long long)rows, (long long)nmat);
    return 0;
}

static qk_mat view(const qmix_gguf_tensor *t, int64_t rows, int64_t cols, int64_t mat)
{
    size_t row_bytes = qmix_ggml_row_bytes(t->type, cols);
    const uint8_t *data = (const uint8_t *)t->data + (size_t)mat * (size_t)rows * row_bytes;
    qk_mat w = {.rows = rows, .cols = cols, .row_bytes = row_bytes, .data = data};
    switch (t->type) {
    case QMIX_GGML_F32: w.dtype = QMIX_F32; break;
    case QMIX_GGML_F16: w.dtype = QMIX_F16; break;
    case QMIX_GGML_BF16: w.dtype = QMIX_BF16; break;
    default: w.dtype = QMIX_U8; w.ggml_type = t->type; break;
    }
    return w;
}

static int gmat(gbinder *b, qk_mat *out, int64_t rows, int64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int gmat(gbinder *b, qk_mat *out, int64_t rows, int64_t cols, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    const qmix_gguf_tensor *t = qmix_gguf_find(b->g, b->name);
    if (check(b, t, cols, rows, 1)) return -1;
    *out = view(t, rows, cols, 0);
    return 0;
}

/* A small parameter of n elements, widened to float32 in the model's pool. */
static int gvec(gbinder *b, float **out, int64_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int gvec(gbinder *b, float **out, int64_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    const qmix_gguf_tensor *t = qmix_gguf_find(b->g, b->name);
    if (check(b, t, n, 1, 1)) return -1;
    if (b->f32_end - b->f32_next < n) return qmix_errf(b->err, "internal: f32 pool exhausted");
    qmix_ggml_dequant_row(t->type, t->data, n, b->f32_next);
    *out = b->f32_next;
    b->f32_next += n;
    return 0;
}

/* Block i into ly (a trunk layer, or the MTP block's layer at block n_layers). */
static int bind_block(gbinder *b, qmix_layer *ly, int i, int is_full, qmix_expert *experts)
{
    const qmix_config *c = &b->m->cfg;
    int64_t D = c->hidden_size, E = c->n_experts, F = c->moe_ffn, Fs = c->shared_ffn;
    ly->is_full = is_full;
    if (gvec(b, &ly->input_norm, D, "blk.%d.attn_norm.weight", i) ||
        gvec(b, &ly->post_norm, D, "blk.%d.post_attention_norm.weight", i))
        return -1;
    if (ly->is_full) {
        int64_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
        if (gmat(b, &ly->q_proj, H * hd * 2, D, "blk.%d.attn_q.weight", i) ||
            gmat(b, &ly->k_proj, KV * hd, D, "blk.%d.attn_k.weight", i) ||
            gmat(b, &ly->v_proj, KV * hd, D, "blk.%d.attn_v.weight", i) ||
            gmat(b, &ly->o_proj, D, H * hd, "blk.%d.attn_output.weight", i) ||
            gvec(b, &ly->q_norm, hd, "blk.%d.attn_q_norm.weight", i) ||
            gvec(b, &ly->k_norm, hd, "blk.%d.attn_k_norm.weight", i))
            return -1;
    } else {
        int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
                dv = c->lin_v_head_dim, Kc = c->conv_kernel;
        int64_t C = 2 * nk * dk + nv * dv;
        if (gmat(b, &ly->in_qkv, C, D, "blk.%d.attn_qkv.weight", i) ||
            gmat(b, &ly->in_z, nv * dv, D, "blk.%d.attn_gate.weight", i) ||
            gmat(b, &ly->in_b, nv, D, "blk.%d.ssm_beta.weight", i) ||
            gmat(b, &ly->in_a, nv, D, "blk.%d.ssm_alpha.weight", i) ||
            gmat(b, &ly->out_proj, D, nv * dv, "blk.%d.ssm_out.weight", i) ||
            gvec(b, &ly->neg_exp_A, nv, "blk.%d.ssm_a", i) ||
            gvec(b, &ly->dt_bias, nv, "blk.%d.ssm_dt.bias", i) ||
            gvec(b, &ly->gdn_norm, dv, "blk.%d.ssm_norm.weight", i))
            return -1;
        /* ne {Kc, C}: row-major [C][Kc], qmix's conv layout */
        const qmix_gguf_tensor *t = gfind(b, "blk.%d.ssm_conv1d.weight", i);
        if (check(b, t, Kc, C, 1)) return -1;
        if (b->f32_end - b->f32_next < C * Kc) return qmix_errf(b->err, "internal: f32 pool");
        ly->conv_w = b->f32_next;
        qk_mat cw = view(t, C, Kc, 0);
        for (int64_t r = 0; r < C; r++) qk_mat_row_f32(&cw, r, ly->conv_w + r * Kc);
        b->f32_next += C * Kc;
    }
    if (gmat(b, &ly->router, E, D, "blk.%d.ffn_gate_inp.weight", i) ||
        gmat(b, &ly->shared_gate, Fs, D, "blk.%d.ffn_gate_shexp.weight", i) ||
        gmat(b, &ly->shared_up, Fs, D, "blk.%d.ffn_up_shexp.weight", i) ||
        gmat(b, &ly->shared_down, D, Fs, "blk.%d.ffn_down_shexp.weight", i) ||
        gmat(b, &ly->shared_expert_gate, 1, D, "blk.%d.ffn_gate_inp_shexp.weight", i))
        return -1;
    ly->experts = experts;
    const qmix_gguf_tensor *gate = gfind(b, "blk.%d.ffn_gate_exps.weight", i);
    if (gate) {
        const qmix_gguf_tensor *up;
        if (check(b, gate, D, F, E)) return -1;
        up = gfind(b, "blk.%d.ffn_up_exps.weight", i);
        if (check(b, up, D, F, E)) return -1;
        for (int64_t e = 0; e < E; e++) {
            ly->experts[e].gate = view(gate, F, D, e);
            ly->experts[e].up = view(up, F, D, e);
        }
    } else {
        const qmix_gguf_tensor *gu = gfind(b, "blk.%d.ffn_gate_up_exps.weight", i);
        if (!gu) {
            snprintf(b->name, sizeof b->name, "blk.%d.ffn_gate_exps.weight", i);
            return qmix_errf(b->err, "missing tensor '%s' (nor a fused ffn_gate_up_exps)",
                             b->name);
        }
        if (check(b, gu, D, 2 * F, E)) return -1;
        for (int64_t e = 0; e < E; e++) { /* per expert: F gate rows, then F up rows */
            ly->experts[e].gate = view(gu, 2 * F, D, e);
            ly->experts[e].gate.rows = F;
            ly->experts[e].up = ly->experts[e].gate;
            ly->experts[e].up.data = (const uint8_t *)ly->experts[e].gate.data +
                                     (size_t)F * ly->experts[e].gate.row_bytes;
        }
    }
    const qmix_gguf_tensor *down = gfind(b, "blk.%d.ffn_down_exps.weight", i);
    if (check(b, down, F, D, E)) return -1;
    for (int64_t e = 0; e < E; e++) ly->experts[e].down = view(down, D, F, e);
    return 0;
}

static int bind_layer(gbinder *b, int i)
{
    qmix_model *m = b->m;
    return bind_block(b, &m->layers[i], i, m->cfg.layer_is_full[i],
                      m->expert_pool + (size_t)i * (size_t)m->cfg.n_experts);
}

/* The MTP block (nextn_predict_layers 1): block n_layers is a full-attention MoE layer plus
 * nextn.eh_proj (mtp.fc), nextn.enorm / hnorm / shared_head_norm (the MTP norms, stored 1 + w
 * like every GGUF norm); embeddings and lm_head are the trunk's. */
static int bind_nextn(gbinder *b)
{
    qmix_model *m = b->m;
    const qmix_config *c = &m->cfg;
    if (c->mtp_layers < 1) return 0;
    int L = c->n_layers;
    int64_t D = c->hidden_size;
    qmix_mtp *mtp = qmix_mtp_alloc(m, b->err);
    if (!mtp) return -1;
    float *next = b->f32_next, *end = b->f32_end;
    b->f32_next = mtp->f32_pool;
    b->f32_end = mtp->f32_pool + qmix_mtp_f32_floats(c);
    int rc = gmat(b, &mtp->fc, D, 2 * D, "blk.%d.nextn.eh_proj.weight", L) ||
             gvec(b, &mtp->norm_embed, D, "blk.%d.nextn.enorm.weight", L) ||
             gvec(b, &mtp->norm_hidden, D, "blk.%d.nextn.hnorm.weight", L) ||
             gvec(b, &mtp->norm, D, "blk.%d.nextn.shared_head_norm.weight", L) ||
             bind_block(b, &mtp->layer, L, 1, mtp->experts);
    b->f32_next = next;
    b->f32_end = end;
    if (rc) qmix_err_prefix(b->err, "MTP block");
    return rc ? -1 : 0;
}

/* Reads a required positive integer KV "qwen35moe.<key>" into the JSON config being built. */
static int arch_int(const qmix_gguf *g, const char *key, const char *json_key, json_t *cfg,
                    int64_t *out, qmix_err *err)
{
    char full[128];
    snprintf(full, sizeof full, "qwen35moe.%s", key);
    int64_t v;
    int r = qmix_gguf_get_int(g, full, &v, err);
    if (r < 0) return -1;
    if (!r) return qmix_errf(err, "missing KV '%s'", full);
    if (v <= 0 || v > INT32_MAX) return qmix_errf(err, "KV '%s' = %lld is out of range", full,
                                                  (long long)v);
    if (json_key) json_object_set_new(cfg, json_key, json_integer(v));
    if (out) *out = v;
    return 0;
}

/* The qwen35moe KVs as a flat config.json, so qmix_config_parse applies every geometry check
 * the safetensors path has. */
static int gguf_config(const qmix_gguf *g, qmix_config *c, qmix_err *err)
{
    const char *arch;
    uint64_t alen;
    int r = qmix_gguf_get_str(g, "general.architecture", &arch, &alen, err);
    if (r < 0) return -1;
    if (!r) return qmix_errf(err, "missing KV 'general.architecture'");
    if (alen != 9 || memcmp(arch, "qwen35moe", 9))
        return qmix_errf(err, "architecture '%.*s' is not supported (qmix runs qwen35moe)",
                         (int)(alen > 64 ? 64 : alen), arch);
    json_t *cfg = json_object();
    int64_t blocks, hd, vlen, state, inner, interval, nv, nextn = 0, rot, eos;
    int rc = -1;
    const qmix_gguf_tensor *embd = qmix_gguf_find(g, "token_embd.weight");
    if (!cfg) return qmix_errf(err, "out of memory");
    if (arch_int(g, "block_count", NULL, cfg, &blocks, err) ||
        arch_int(g, "embedding_length", "hidden_size", cfg, NULL, err) ||
        arch_int(g, "attention.head_count", "num_attention_heads", cfg, NULL, err) ||
        arch_int(g, "attention.head_count_kv", "num_key_value_heads", cfg, NULL, err) ||
        arch_int(g, "attention.key_length", "head_dim", cfg, &hd, err) ||
        arch_int(g, "attention.value_length", NULL, cfg, &vlen, err) ||
        arch_int(g, "rope.dimension_count", NULL, cfg, &rot, err) ||
        arch_int(g, "ssm.group_count", "linear_num_key_heads", cfg, NULL, err) ||
        arch_int(g, "ssm.time_step_rank", "linear_num_value_heads", cfg, &nv, err) ||
        arch_int(g, "ssm.state_size", "linear_key_head_dim", cfg, &state, err) ||
        arch_int(g, "ssm.inner_size", NULL, cfg, &inner, err) ||
        arch_int(g, "ssm.conv_kernel", "linear_conv_kernel_dim", cfg, NULL, err) ||
        arch_int(g, "expert_count", "num_experts", cfg, NULL, err) ||
        arch_int(g, "expert_used_count", "num_experts_per_tok", cfg, NULL, err) ||
        arch_int(g, "expert_feed_forward_length", "moe_intermediate_size", cfg, NULL, err) ||
        arch_int(g, "expert_shared_feed_forward_length", "shared_expert_intermediate_size", cfg,
                 NULL, err) ||
        arch_int(g, "full_attention_interval", NULL, cfg, &interval, err))
        goto out;
    if ((r = qmix_gguf_get_int(g, "qwen35moe.nextn_predict_layers", &nextn, err)) < 0) goto out;
    if (nextn < 0 || nextn >= blocks) {
        qmix_errf(err, "KV 'qwen35moe.nextn_predict_layers' = %lld with %lld blocks",
                  (long long)nextn, (long long)blocks);
        goto out;
    }
    if (vlen != hd) {
        qmix_errf(err, "attention.key_length %lld != value_length %lld", (long long)hd,
                  (long long)vlen);
        goto out;
    }
    if (inner != nv * state) { /* llama.cpp assumes d_k = d_v = ssm.state_size */
        qmix_errf(err, "ssm.inner_size %lld != ssm.time_step_rank %lld x ssm.state_size %lld",
                  (long long)inner, (long long)nv, (long long)state);
        goto out;
    }
    if (!embd || embd->n_dims < 2 || embd->ne[1] <= 0 || embd->ne[1] > INT32_MAX) {
        qmix_errf(err, "missing or malformed tensor 'token_embd.weight' (it gives the vocabulary "
                  "size)");
        goto out;
    }
    int64_t n_layers = blocks - nextn;
    json_object_set_new(cfg, "num_hidden_layers", json_integer(n_layers));
    json_object_set_new(cfg, "linear_value_head_dim", json_integer(state));
    json_object_set_new(cfg, "vocab_size", json_integer(embd->ne[1]));
    json_object_set_new(cfg, "partial_rotary_factor", json_real((double)rot / (double)hd));
    json_object_set_new(cfg, "mtp_num_hidden_layers", json_integer(nextn));
    json_object_set_new(cfg, "tie_word_embeddings",
                        json_boolean(!qmix_gguf_find(g, "output.weight")));
    double v;
    if ((r = qmix_gguf_get_float(g, "qwen35moe.rope.freq_base", &v, err)) < 0) goto out;
    if (r) json_object_set_new(cfg, "rope_theta", json_real(v));
    const qmix_gguf_kv *sec = qmix_gguf_kv_find(g, "qwen35moe.rope.dimension_sections");
    if (sec && sec->type == QMIX_GGUF_ARRAY && sec->arr_type != QMIX_GGUF_STRING && sec->arr_n >= 3) {
        json_t *a = json_array();
        for (uint64_t i = 0; i < 3; i++) json_array_append_new(a, json_integer(qmix_gguf_arr_int(sec, i)));
        json_object_set_new(cfg, "mrope_section", a);
    }
    if ((r = qmix_gguf_get_float(g, "qwen35moe.attention.layer_norm_rms_epsilon", &v, err)) < 0)
        goto out;
    if (r) json_object_set_new(cfg, "rms_norm_eps", json_real(v));
    int64_t ctx;
    if ((r = qmix_gguf_get_int(g, "qwen35moe.context_length", &ctx, err)) < 0) goto out;
    if (r && ctx > 0 && ctx <= INT32_MAX)
        json_object_set_new(cfg, "max_position_embeddings", json_integer(ctx));
    if ((r = qmix_gguf_get_int(g, "tokenizer.ggml.eos_token_id", &eos, err)) < 0) goto out;
    if (r && eos >= 0 && eos <= INT32_MAX)
        json_object_set_new(cfg, "eos_token_id", json_integer(eos));
    if (n_layers > QMIX_MAX_LAYERS) {
        qmix_errf(err, "%lld layers (at most %d supported)", (long long)n_layers, QMIX_MAX_LAYERS);
        goto out;
    }
    /* per-layer recurrent flags if given, else the interval rule (§0.2) */
    json_t *types = json_array();
    const qmix_gguf_kv *rec = qmix_gguf_kv_find(g, "qwen35moe.attention.recurrent_layers");
    if (rec && (rec->type != QMIX_GGUF_ARRAY || rec->arr_n < (uint64_t)n_layers ||
                rec->arr_type == QMIX_GGUF_STRING)) {
        json_decref(types);
        qmix_errf(err, "KV 'qwen35moe.attention.recurrent_layers' is not a per-layer flag array");
        goto out;
    }
    for (int64_t i = 0; i < n_layers; i++) {
        int full = rec ? !qmix_gguf_arr_int(rec, (uint64_t)i) : (i + 1) % interval == 0;
        json_array_append_new(types, json_string(full ? "full_attention" : "linear_attention"));
    }
    json_object_set_new(cfg, "layer_types", types);
    char *text = json_dumps(cfg, JSON_COMPACT);
    if (!text) {
        qmix_errf(err, "out of memory");
        goto out;
    }
    rc = qmix_config_parse(text, strlen(text), "GGUF metadata", c, err);
    free(text);
    if (!rc && c->rot_dim != rot) rc = qmix_errf(err, "rope.dimension_count %lld is not usable "
                                                 "with head_dim %lld", (long long)rot, (long long)hd);
out:
    json_decref(cfg);
    return rc;
}

static size_t gguf_pool_floats(const qmix_config *c)
{
    size_t C = (size_t)2 * c->lin_n_k_heads * c->lin_k_head_dim +
               (size_t)c->lin_n_v_heads * c->lin_v_head_dim;
    size_t per_linear = C * c->conv_kernel + 2 * (size_t)c->lin_n_v_heads + c->lin_v_head_dim;
    size_t total = c->hidden_size;
    for (int i = 0; i < c->n_layers; i++)
        total += 2 * (size_t)c->hidden_size + (c->layer_is_full[i] ? 2 * (size_t)c->head_dim
                                                                    : per_linear);
    return total;
}

int qmix_model_bind_gguf(qmix_model *m, const char *path, qmix_err *err)
{
    if (qmix_gguf_open(path, &m->gguf, err) || gguf_config(m->gguf, &m->cfg, err)) return -1;
    const qmix_config *c = &m->cfg;
    gbinder b = {.m = m, .g = m->gguf, .err = err};
    m->norms_shifted = 1;
    m->gdn_v_tiled = 1;
    m->prefix = "";
    /* the geometry sizes the allocations: check the big tensors' shapes against it first */
    const qmix_gguf_tensor *t = gfind(&b, "token_embd.weight");
    if (check(&b, t, c->hidden_size, c->vocab_size, 1)) return -1;
    t = gfind(&b, "blk.0.ffn_gate_inp.weight");
    if (check(&b, t, c->hidden_size, c->n_experts, 1)) return -1;
    t = gfind(&b, "blk.%d.attn_norm.weight", c->n_layers - 1);
    if (check(&b, t, c->hidden_size, 1, 1)) return -1;
    size_t pool = gguf_pool_floats(c);
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    m->expert_pool = calloc((size_t)c->n_layers * (size_t)c->n_experts, sizeof *m->expert_pool);
    m->f32_pool = malloc(pool * sizeof(float));
    if (!m->layers || !m->expert_pool || !m->f32_pool) return qmix_errf(err, "out of memory");
    b.f32_next = m->f32_pool;
    b.f32_end = m->f32_pool + pool;
    int64_t V = c->vocab_size, D = c->hidden_size;
    if (gmat(&b, &m->embed, V, D, "token_embd.weight") ||
        gvec(&b, &m->final_norm, D, "output_norm.weight"))
        return -1;
    if (!qmix_gguf_find(m->gguf, "output.weight")) m->lm_head = m->embed;
    else if (gmat(&b, &m->lm_head, V, D, "output.weight")) return -1;
    for (int i = 0; i < c->n_layers; i++)
        if (bind_layer(&b, i)) return -1;
    return bind_nextn(&b);
}

/* Model -> GGUF. The source is the bound model (model/model.h), so every input layout qmix reads
 * works the same way: each GGUF tensor is described as a stack of qk_mat views (1-D parameters
 * are the model's widened float32 copies, which already carry the 1 + w and -exp transforms) plus
 * a row and a column permutation (the value-head reorder), then written row by row. */
#include "quant/gguf_export.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "formats/gguf_write.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"
#include "text/chat.h"
#include "text/tok_gguf.h"
#include "util/err.h"
#include "util/fileio.h"

/* Destination index -> source index over a head axis (§5.9): entries [off, off + nv·d) are nv
 * heads of d; GGUF position p holds HF head (p mod nk)·r + p div nk. */
typedef struct perm { int active; int64_t off, nv, nk, d; } perm;

static int64_t perm_src(const perm *p, int64_t i)
{
    if (!p->active || i < p->off || i >= p->off + p->nv * p->d) return i;
    int64_t x = i - p->off, pos = x / p->d;
    int64_t head = (pos % p->nk) * (p->nv / p->nk) + pos / p->nk;
    return p->off + head * p->d + x % p->d;
}

typedef struct item {
    char name[QMIX_GGUF_MAX_NAME];
    int force_f32;
    int n_dims;
    int64_t ne[3];
    const qk_mat *mat;     /* first matrix */
    size_t stride;         /* bytes between consecutive matrices (experts) */
    qk_mat own;            /* the source when mat is NULL (a float32 vector or the conv) */
    perm rows, cols;
} item;

typedef struct plan { item *items; size_t n, cap; int oom; } plan;

static item *add(plan *p, const char *name, const qk_mat *m, int64_t nmat, size_t stride, int f32)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        item *g = realloc(p->items, cap * sizeof *g);
        if (!g) {
            p->oom = 1;
            return NULL;
        }
        p->items = g;
        p->cap = cap;
    }
    item *it = &p->items[p->n++];
    memset(it, 0, sizeof *it);
    snprintf(it->name, sizeof it->name, "%s", name);
    it->force_f32 = f32;
    it->mat = m;
    it->stride = stride;
    it->n_dims = nmat > 1 || stride ? 3 : 2;
    it->ne[0] = m->cols;
    it->ne[1] = m->rows;
    it->ne[2] = nmat;
    return it;
}

/* A float32 vector of n as a 1-D tensor (always F32). */
static item *add_vec(plan *p, const char *name, const float *v, int64_t n)
{
    item *it = add(p, name, &(qk_mat){.rows = 1, .cols = n}, 1, 0, 1);
    if (!it) return NULL;
    /* kept by value: the item array moves as it grows */
    it->own = (qk_mat){.dtype = QMIX_F32, .rows = 1, .cols = n, .row_bytes = (size_t)n * 4,
                       .data = v};
    it->mat = NULL;
    it->n_dims = 1;
    return it;
}

static void build_plan(const qmix_model *m, plan *p)
{
    const qmix_config *c = &m->cfg;
    int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dv = c->lin_v_head_dim;
    /* a GGUF source is already tiled; an HF/MLX one is grouped and gets the reorder */
    int reorder = !m->gdn_v_tiled && nk != nv;
    char n[QMIX_GGUF_MAX_NAME];
    add(p, "token_embd.weight", &m->embed, 1, 0, 0);
    add_vec(p, "output_norm.weight", m->final_norm, c->hidden_size);
    if (m->lm_head.data != m->embed.data) add(p, "output.weight", &m->lm_head, 1, 0, 0);
    for (int i = 0; i < c->n_layers && !p->oom; i++) {
        const qmix_layer *ly = &m->layers[i];
#define NAME(s) (snprintf(n, sizeof n, "blk.%d." s, i), n)
        add_vec(p, NAME("attn_norm.weight"), ly->input_norm, c->hidden_size);
        add_vec(p, NAME("post_attention_norm.weight"), ly->post_norm, c->hidden_size);
        if (ly->is_full) {
            add(p, NAME("attn_q.weight"), &ly->q_proj, 1, 0, 0);
            add(p, NAME("attn_k.weight"), &ly->k_proj, 1, 0, 0);
            add(p, NAME("attn_v.weight"), &ly->v_proj, 1, 0, 0);
            add(p, NAME("attn_output.weight"), &ly->o_proj, 1, 0, 0);
            add_vec(p, NAME("attn_q_norm.weight"), ly->q_norm, c->head_dim);
            add_vec(p, NAME("attn_k_norm.weight"), ly->k_norm, c->head_dim);
        } else {
            int64_t qk = 2 * nk * c->lin_k_head_dim;
            perm v_rows = {reorder, qk, nv, nk, dv}, heads = {reorder, 0, nv, nk, dv},
                 scalars = {reorder, 0, nv, nk, 1};
            item *it;
            if ((it = add(p, NAME("attn_qkv.weight"), &ly->in_qkv, 1, 0, 0))) it->rows = v_rows;
            if ((it = add(p, NAME("attn_gate.weight"), &ly->in_z, 1, 0, 0))) it->rows = heads;
            if ((it = add(p, NAME("ssm_beta.weight"), &ly->in_b, 1, 0, 0))) it->rows = scalars;
            if ((it = add(p, NAME("ssm_alpha.weight"), &ly->in_a, 1, 0, 0))) it->rows = scalars;
            if ((it = add(p, NAME("ssm_out.weight"), &ly->out_proj, 1, 0, 0))) it->cols = heads;
            if ((it = add_vec(p, NAME("ssm_a"), ly->neg_exp_A, nv))) it->cols = scalars;
            if ((it = add_vec(p, NAME("ssm_dt.bias"), ly->dt_bias, nv))) it->cols = scalars;
            add_vec(p, NAME("ssm_norm.weight"), ly->gdn_norm, dv);
            int64_t C = qk + nv * dv;
            if ((it = add_vec(p, NAME("ssm_conv1d.weight"), ly->conv_w, C * c->conv_kernel))) {
                it->own.rows = C; /* [C][Kc] float32 rows, ne {Kc, C} */
                it->own.cols = c->conv_kernel;
                it->own.row_bytes = (size_t)c->conv_kernel * 4;
                it->ne[0] = c->conv_kernel;
                it->ne[1] = C;
                it->n_dims = 2;
                it->rows = v_rows;
            }
        }
        add(p, NAME("ffn_gate_inp.weight"), &ly->router, 1, 0, 1);
        item *sg = add(p, NAME("ffn_gate_inp_shexp.weight"), &ly->shared_expert_gate, 1, 0, 1);
        if (sg) sg->n_dims = 1;
        add(p, NAME("ffn_gate_shexp.weight"), &ly->shared_gate, 1, 0, 0);
        add(p, NAME("ffn_up_shexp.weight"), &ly->shared_up, 1, 0, 0);
        add(p, NAME("ffn_down_shexp.weight"), &ly->shared_down, 1, 0, 0);
        add(p, NAME("ffn_gate_exps.weight"), &ly->experts[0].gate, c->n_experts,
            sizeof(qmix_expert), 0);
        add(p, NAME("ffn_up_exps.weight"), &ly->experts[0].up, c->n_experts, sizeof(qmix_expert),
            0);
        add(p, NAME("ffn_down_exps.weight"), &ly->experts[0].down, c->n_experts,
            sizeof(qmix_expert), 0);
#undef NAME
    }
}

static int item_type(const item *it, int want)
{
    if (it->force_f32 || it->n_dims == 1) return QMIX_GGML_F32;
    if (!qmix_ggml_row_bytes(want, it->ne[0])) return QMIX_GGML_F16; /* llama-quantize's fallback */
    return want;
}

static void encode(int type, const float *x, int64_t n, uint8_t *out)
{
    switch (type) {
    case QMIX_GGML_F32: memcpy(out, x, (size_t)n * 4); break;
    case QMIX_GGML_Q8_0: qmix_ggml_quantize_row_q8_0(x, n, out); break;
    default:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = type == QMIX_GGML_BF16 ? qk_f32_to_bf16(x[i]) : qk_f32_to_f16(x[i]);
            out[2 * i] = (uint8_t)h;
            out[2 * i + 1] = (uint8_t)(h >> 8);
        }
    }
}

/* The interval k with layer i full iff (i + 1) % k == 0, or 0 if the pattern has none. */
static int attention_interval(const qmix_config *c)
{
    for (int k = 1; k <= c->n_layers; k++) {
        int ok = 1;
        for (int i = 0; i < c->n_layers && ok; i++) ok = c->layer_is_full[i] == ((i + 1) % k == 0);
        if (ok) return k;
    }
    return 0;
}

static char *json_token_name(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

static int declare_tokenizer(qmix_ggw *w, const qmix_model *m, const char *in, qmix_err *err)
{
    char *json = NULL, *tmpl = NULL, path[4096];
    size_t len = 0, tlen = 0;
    const char *tdir = m->gguf ? in : m->dir;
    if (m->gguf) {
        if (qmix_tok_gguf_json(m->gguf, &json, &len, err)) return -1;
    } else {
        snprintf(path, sizeof path, "%s/tokenizer.json", m->dir);
        if (qmix_read_file(path, (size_t)1 << 30, &json, &len, err)) return -1;
    }
    char *eos = NULL, *pad = NULL;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", m->dir);
    json_t *tc = m->gguf ? NULL : json_load_file(path, 0, NULL);
    if (tc) {
        eos = json_token_name(tc, "eos_token");
        pad = json_token_name(tc, "pad_token");
        json_decref(tc);
    }
    qmix_err terr;
    if (qmix_chat_template_load(tdir, false, &tmpl, &tlen, NULL, 0, &terr)) tmpl = NULL;
    int rc = qmix_tok_gguf_declare(w, json, len, m->cfg.vocab_size, eos ? eos : "<|im_end|>",
                                   pad ? pad : "<|endoftext|>", tmpl, tlen, err);
    free(json);
    free(tmpl);
    free(eos);
    free(pad);
    return rc;
}

static void declare_model(qmix_ggw *w, const qmix_model *m, const char *in, int type, int interval)
{
    const qmix_config *c = &m->cfg;
    const char *base = strrchr(in, '/');
    base = base && base[1] ? base + 1 : in;
    qmix_ggw_kv_str(w, "general.architecture", "qwen35moe");
    qmix_ggw_kv_str(w, "general.name", base);
    uint32_t ft = type == QMIX_GGML_F32 ? 0 : type == QMIX_GGML_F16 ? 1 : type == QMIX_GGML_BF16 ? 32 : 7;
    qmix_ggw_kv_u32(w, "general.file_type", ft);
    qmix_ggw_kv_u32(w, "general.quantization_version", 2);
#define A(k) "qwen35moe." k
    qmix_ggw_kv_u32(w, A("block_count"), (uint32_t)c->n_layers);
    qmix_ggw_kv_u32(w, A("context_length"), (uint32_t)c->max_position_embeddings);
    qmix_ggw_kv_u32(w, A("embedding_length"), (uint32_t)c->hidden_size);
    qmix_ggw_kv_u32(w, A("attention.head_count"), (uint32_t)c->n_heads);
    qmix_ggw_kv_u32(w, A("attention.head_count_kv"), (uint32_t)c->n_kv_heads);
    qmix_ggw_kv_u32(w, A("attention.key_length"), (uint32_t)c->head_dim);
    qmix_ggw_kv_u32(w, A("attention.value_length"), (uint32_t)c->head_dim);
    qmix_ggw_kv_f32(w, A("attention.layer_norm_rms_epsilon"), c->rms_eps);
    qmix_ggw_kv_f32(w, A("rope.freq_base"), (float)c->rope_theta);
    qmix_ggw_kv_u32(w, A("rope.dimension_count"), (uint32_t)c->rot_dim);
    static const int32_t sections[4] = {11, 11, 10, 0};
    qmix_ggw_kv_arr(w, A("rope.dimension_sections"), QMIX_GGUF_I32, 4, sections);
    qmix_ggw_kv_u32(w, A("expert_count"), (uint32_t)c->n_experts);
    qmix_ggw_kv_u32(w, A("expert_used_count"), (uint32_t)c->n_experts_used);
    qmix_ggw_kv_u32(w, A("expert_feed_forward_length"), (uint32_t)c->moe_ffn);
    qmix_ggw_kv_u32(w, A("expert_shared_feed_forward_length"), (uint32_t)c->shared_ffn);
    qmix_ggw_kv_u32(w, A("ssm.conv_kernel"), (uint32_t)c->conv_kernel);
    qmix_ggw_kv_u32(w, A("ssm.state_size"), (uint32_t)c->lin_k_head_dim);
    qmix_ggw_kv_u32(w, A("ssm.group_count"), (uint32_t)c->lin_n_k_heads);
    qmix_ggw_kv_u32(w, A("ssm.time_step_rank"), (uint32_t)c->lin_n_v_heads);
    qmix_ggw_kv_u32(w, A("ssm.inner_size"), (uint32_t)(c->lin_n_v_heads * c->lin_v_head_dim));
    qmix_ggw_kv_u32(w, A("full_attention_interval"), (uint32_t)interval);
#undef A
}

int qmix_gguf_export(const char *in, const char *out, const qmix_gguf_export_opts *o,
                     qmix_err *err)
{
    int type = o->type;
    if (type != QMIX_GGML_F32 && type != QMIX_GGML_F16 && type != QMIX_GGML_BF16 &&
        type != QMIX_GGML_Q8_0)
        return qmix_errf(err, "GGUF output type %s is not supported yet (f32, f16, bf16, q8_0)",
                         qmix_ggml_type_name(type) ? qmix_ggml_type_name(type) : "?");
    qmix_model *m;
    if (qmix_model_open(in, &m, err)) return -1;
    const qmix_config *c = &m->cfg;
    int interval = attention_interval(c);
    plan p = {0};
    qmix_ggw *w = NULL;
    float *row = NULL, *tmp = NULL;
    uint8_t *enc = NULL;
    int rc = -1;
    if (c->lin_k_head_dim != c->lin_v_head_dim) {
        qmix_errf(err, "%s: linear_key_head_dim %d != linear_value_head_dim %d: GGUF's "
                  "qwen35moe has one ssm.state_size", in, c->lin_k_head_dim, c->lin_v_head_dim);
        goto done;
    }
    if (!interval) {
        qmix_errf(err, "%s: the layer pattern is not every k-th layer full attention, which "
                  "qwen35moe.full_attention_interval cannot express", in);
        goto done;
    }
    build_plan(m, &p);
    w = qmix_ggw_new();
    if (p.oom || !w) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    declare_model(w, m, in, type, interval);
    if (declare_tokenizer(w, m, in, err)) goto done;
    int64_t max_cols = 0;
    for (size_t i = 0; i < p.n; i++) {
        item *it = &p.items[i];
        int64_t ne[3] = {it->ne[0], it->ne[1], it->ne[2]};
        qmix_ggw_tensor(w, it->name, item_type(it, type), it->n_dims, ne);
        if (it->ne[0] > max_cols) max_cols = it->ne[0];
    }
    row = malloc((size_t)max_cols * sizeof *row);
    tmp = malloc((size_t)max_cols * sizeof *tmp);
    enc = malloc((size_t)max_cols * 4);
    if (!row || !tmp || !enc) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    if (qmix_ggw_open(w, out, err)) goto done;
    for (size_t i = 0; i < p.n; i++) {
        const item *it = &p.items[i];
        int t = item_type(it, type);
        size_t rb = qmix_ggml_row_bytes(t, it->ne[0]);
        if (o->progress)
            fprintf(stderr, "\rqmix convert: tensor %zu/%zu %-40s", i + 1, p.n, it->name);
        for (int64_t e = 0; e < it->ne[2]; e++) {
            const qk_mat *src =
                it->mat ? (const qk_mat *)((const uint8_t *)it->mat + (size_t)e * it->stride)
                        : &it->own;
            for (int64_t r = 0; r < it->ne[1]; r++) {
                qk_mat_row_f32(src, perm_src(&it->rows, r), row);
                const float *x = row;
                if (it->cols.active) {
                    for (int64_t k = 0; k < it->ne[0]; k++) tmp[k] = row[perm_src(&it->cols, k)];
                    x = tmp;
                }
                encode(t, x, it->ne[0], enc);
                if (qmix_ggw_write(w, enc, rb, err)) goto done;
            }
        }
    }
    if (o->progress) fprintf(stderr, "\n");
    rc = qmix_ggw_close(w, err);
    w = NULL;
done:
    qmix_ggw_discard(w);
    free(p.items);
    free(row);
    free(tmp);
    free(enc);
    qmix_model_close(m);
    if (rc) qmix_err_prefix(err, "converting %s to %s", in, out);
    return rc;
}

/* Model -> Hugging Face bf16 (see hf_export.h). Like gguf_export.c the source is the bound model,
 * so every input qmix reads works the same way; each HF tensor is described as where its rows
 * come from (a stack of qk_mat views, the gate/up pair of the fused experts, a float32 vector, the
 * conv kernel), which transform its values need (norms: (1 + w) − 1; A_log = log(−ssm_a)) and
 * the permutation that undoes GGUF's tiled value heads, then streamed row by row. */
#include "quant/hf_export.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "formats/gguf.h"
#include "formats/safetensors_write.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "text/chat.h"
#include "text/tok_gguf.h"
#include "text/tokenizer.h"
#include "util/err.h"
#include "util/fileio.h"

/* HF index -> source index over a head axis when the source keeps GGUF's tiled order: entries
 * [off, off + nv·d) are nv heads of d; HF head g·r + j sits at tiled position j·nk + g. */
typedef struct untile { int active; int64_t off, nv, nk, d; } untile;

static int64_t untile_src(const untile *u, int64_t i)
{
    if (!u->active || i < u->off || i >= u->off + u->nv * u->d) return i;
    int64_t x = i - u->off, head = x / u->d, r = u->nv / u->nk;
    int64_t pos = (head % r) * u->nk + head / r;
    return u->off + pos * u->d + x % u->d;
}

enum { K_MAT, K_GATE_UP, K_VEC, K_CONV };
enum { XF_NONE, XF_MINUS1, XF_ALOG };

typedef struct hft {
    char name[160];
    int ndim;
    int64_t shape[3];
    int kind;
    const qk_mat *mat, *mat2;   /* K_MAT (mat2 NULL) / K_GATE_UP (gate, up) */
    size_t stride;              /* bytes between experts' views */
    int64_t nmat;
    const float *vec;           /* K_VEC: [n]; K_CONV: [C][Kc] */
    int xform;
    untile rows, cols;
} hft;

typedef struct hplan { hft *t; size_t n, cap; int oom; } hplan;

static hft *push(hplan *p, const char *prefix, const char *name)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        hft *g = realloc(p->t, cap * sizeof *g);
        if (!g) {
            p->oom = 1;
            return NULL;
        }
        p->t = g;
        p->cap = cap;
    }
    hft *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s%s", prefix, name);
    t->nmat = 1;
    return t;
}

static void mat2d(hplan *p, const char *prefix, const char *name, const qk_mat *m)
{
    hft *t = push(p, prefix, name);
    if (!t) return;
    t->kind = K_MAT;
    t->mat = m;
    t->ndim = 2;
    t->shape[0] = m->rows;
    t->shape[1] = m->cols;
}

static hft *vec(hplan *p, const char *prefix, const char *name, const float *v, int64_t n, int xf)
{
    hft *t = push(p, prefix, name);
    if (!t) return NULL;
    t->kind = K_VEC;
    t->vec = v;
    t->ndim = 1;
    t->shape[0] = n;
    t->xform = xf;
    return t;
}

static void build(const qmix_model *m, hplan *p)
{
    const qmix_config *c = &m->cfg;
    int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dv = c->lin_v_head_dim;
    int tiled = m->gdn_v_tiled && nk != nv;
    char pre[96];
    mat2d(p, "model.language_model.", "embed_tokens.weight", &m->embed);
    vec(p, "model.language_model.", "norm.weight", m->final_norm, c->hidden_size, XF_MINUS1);
    if (m->lm_head.data != m->embed.data) mat2d(p, "", "lm_head.weight", &m->lm_head);
    for (int i = 0; i < c->n_layers && !p->oom; i++) {
        const qmix_layer *ly = &m->layers[i];
        snprintf(pre, sizeof pre, "model.language_model.layers.%d.", i);
        vec(p, pre, "input_layernorm.weight", ly->input_norm, c->hidden_size, XF_MINUS1);
        vec(p, pre, "post_attention_layernorm.weight", ly->post_norm, c->hidden_size, XF_MINUS1);
        if (ly->is_full) {
            mat2d(p, pre, "self_attn.q_proj.weight", &ly->q_proj);
            mat2d(p, pre, "self_attn.k_proj.weight", &ly->k_proj);
            mat2d(p, pre, "self_attn.v_proj.weight", &ly->v_proj);
            mat2d(p, pre, "self_attn.o_proj.weight", &ly->o_proj);
            vec(p, pre, "self_attn.q_norm.weight", ly->q_norm, c->head_dim, XF_MINUS1);
            vec(p, pre, "self_attn.k_norm.weight", ly->k_norm, c->head_dim, XF_MINUS1);
        } else {
            int64_t qk = 2 * nk * c->lin_k_head_dim, C = qk + nv * dv;
            untile v_rows = {tiled, qk, nv, nk, dv}, heads = {tiled, 0, nv, nk, dv},
                   scalars = {tiled, 0, nv, nk, 1};
            hft *t;
            mat2d(p, pre, "linear_attn.in_proj_qkv.weight", &ly->in_qkv);
            if (!p->oom) p->t[p->n - 1].rows = v_rows;
            mat2d(p, pre, "linear_attn.in_proj_z.weight", &ly->in_z);
            if (!p->oom) p->t[p->n - 1].rows = heads;
            mat2d(p, pre, "linear_attn.in_proj_b.weight", &ly->in_b);
            if (!p->oom) p->t[p->n - 1].rows = scalars;
            mat2d(p, pre, "linear_attn.in_proj_a.weight", &ly->in_a);
            if (!p->oom) p->t[p->n - 1].rows = scalars;
            mat2d(p, pre, "linear_attn.out_proj.weight", &ly->out_proj);
            if (!p->oom) p->t[p->n - 1].cols = heads;
            if ((t = vec(p, pre, "linear_attn.A_log", ly->neg_exp_A, nv, XF_ALOG))) t->cols = scalars;
            if ((t = vec(p, pre, "linear_attn.dt_bias", ly->dt_bias, nv, XF_NONE))) t->cols = scalars;
            vec(p, pre, "linear_attn.norm.weight", ly->gdn_norm, dv, XF_NONE);
            if ((t = push(p, pre, "linear_attn.conv1d.weight"))) {
                t->kind = K_CONV;
                t->vec = ly->conv_w;
                t->ndim = 3;
                t->shape[0] = C;
                t->shape[1] = 1;
                t->shape[2] = c->conv_kernel;
                t->rows = v_rows;
            }
        }
        mat2d(p, pre, "mlp.gate.weight", &ly->router);
        mat2d(p, pre, "mlp.shared_expert_gate.weight", &ly->shared_expert_gate);
        mat2d(p, pre, "mlp.shared_expert.gate_proj.weight", &ly->shared_gate);
        mat2d(p, pre, "mlp.shared_expert.up_proj.weight", &ly->shared_up);
        mat2d(p, pre, "mlp.shared_expert.down_proj.weight", &ly->shared_down);
        hft *t;
        if ((t = push(p, pre, "mlp.experts.gate_up_proj"))) {
            t->kind = K_GATE_UP;
            t->mat = &ly->experts[0].gate;
            t->mat2 = &ly->experts[0].up;
            t->stride = sizeof(qmix_expert);
            t->nmat = c->n_experts;
            t->ndim = 3;
            t->shape[0] = c->n_experts;
            t->shape[1] = 2 * (int64_t)c->moe_ffn;
            t->shape[2] = c->hidden_size;
        }
        if ((t = push(p, pre, "mlp.experts.down_proj"))) {
            t->kind = K_MAT;
            t->mat = &ly->experts[0].down;
            t->stride = sizeof(qmix_expert);
            t->nmat = c->n_experts;
            t->ndim = 3;
            t->shape[0] = c->n_experts;
            t->shape[1] = c->hidden_size;
            t->shape[2] = c->moe_ffn;
        }
    }
}

static const qk_mat *at(const qk_mat *m, size_t stride, int64_t e)
{
    return (const qk_mat *)((const uint8_t *)m + (size_t)e * stride);
}

static int is_block_quantized(const hft *t)
{
    return (t->kind == K_MAT || t->kind == K_GATE_UP) && t->mat->dtype == QMIX_U8;
}

/* config.json in the released layout (text settings under text_config), from the bound config. */
static int write_config(const qmix_model *m, const char *dir, qmix_err *err)
{
    const qmix_config *c = &m->cfg;
    json_t *tc = json_object(), *root = json_object(), *types = json_array(), *rope = json_object();
    if (!tc || !root || !types || !rope) {
        json_decref(tc);
        json_decref(root);
        json_decref(types);
        json_decref(rope);
        return qmix_errf(err, "out of memory");
    }
    for (int i = 0; i < c->n_layers; i++)
        json_array_append_new(types, json_string(c->layer_is_full[i] ? "full_attention"
                                                                     : "linear_attention"));
    int interval = 0;
    for (int i = 0; i < c->n_layers && !interval; i++)
        if (c->layer_is_full[i]) interval = i + 1;
    double prf = c->head_dim ? (double)c->rot_dim / c->head_dim : 0.25;
    /* the source's M-RoPE sections (they matter for image tokens only); the released ones when
     * the source has none */
    int has_sec = c->mrope_section[0] || c->mrope_section[1] || c->mrope_section[2];
    json_t *sec = has_sec ? json_pack("[iii]", c->mrope_section[0], c->mrope_section[1],
                                      c->mrope_section[2])
                          : json_pack("[iii]", 11, 11, 10);
    json_object_set_new(rope, "mrope_interleaved", json_true());
    json_object_set_new(rope, "mrope_section", sec);
    json_object_set_new(rope, "partial_rotary_factor", json_real(prf));
    json_object_set_new(rope, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(rope, "rope_type", json_string("default"));
#define SETI(k, v) json_object_set_new(tc, k, json_integer(v))
    json_object_set_new(tc, "attn_output_gate", json_true());
    json_object_set_new(tc, "dtype", json_string("bfloat16"));
    if (c->eos_token_id >= 0) SETI("eos_token_id", c->eos_token_id);
    if (interval) SETI("full_attention_interval", interval);
    SETI("head_dim", c->head_dim);
    json_object_set_new(tc, "hidden_act", json_string("silu"));
    SETI("hidden_size", c->hidden_size);
    json_object_set_new(tc, "layer_types", types);
    SETI("linear_conv_kernel_dim", c->conv_kernel);
    SETI("linear_key_head_dim", c->lin_k_head_dim);
    SETI("linear_num_key_heads", c->lin_n_k_heads);
    SETI("linear_num_value_heads", c->lin_n_v_heads);
    SETI("linear_value_head_dim", c->lin_v_head_dim);
    SETI("max_position_embeddings", c->max_position_embeddings);
    json_object_set_new(tc, "model_type", json_string("qwen3_5_moe_text"));
    SETI("moe_intermediate_size", c->moe_ffn);
    SETI("mtp_num_hidden_layers", 0);
    SETI("num_attention_heads", c->n_heads);
    SETI("num_experts", c->n_experts);
    SETI("num_experts_per_tok", c->n_experts_used);
    SETI("num_hidden_layers", c->n_layers);
    SETI("num_key_value_heads", c->n_kv_heads);
    json_object_set_new(tc, "partial_rotary_factor", json_real(prf));
    json_object_set_new(tc, "rms_norm_eps", json_real(c->rms_eps));
    json_object_set_new(tc, "rope_parameters", rope);
    SETI("shared_expert_intermediate_size", c->shared_ffn);
    json_object_set_new(tc, "tie_word_embeddings", json_boolean(m->lm_head.data == m->embed.data));
    SETI("vocab_size", c->vocab_size);
#undef SETI
    json_object_set_new(root, "architectures",
                        json_pack("[s]", "Qwen3_5MoeForConditionalGeneration"));
    json_object_set_new(root, "model_type", json_string("qwen3_5_moe"));
    json_object_set_new(root, "text_config", tc);
    json_object_set_new(root, "tie_word_embeddings", json_boolean(m->lm_head.data == m->embed.data));
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = qmix_write_json(path, root, JSON_INDENT(2) | JSON_SORT_KEYS, err);
    json_decref(root);
    return rc;
}

static int copy_side(const char *from_dir, const char *to_dir, const char *name, qmix_err *err)
{
    char a[4096], b[4096];
    snprintf(a, sizeof a, "%s/%s", from_dir, name);
    snprintf(b, sizeof b, "%s/%s", to_dir, name);
    return qmix_copy_file(a, b, 1, err); /* absent side files are fine */
}

/* tokenizer.json and tokenizer_config.json: rebuilt from a GGUF's KVs, else copied. */
static int write_tokenizer(const qmix_model *m, const char *in, const char *dir, qmix_err *err)
{
    if (!m->gguf) {
        static const char *side[] = {"tokenizer.json", "tokenizer_config.json",
                                     "generation_config.json", "chat_template.jinja",
                                     "vocab.json", "merges.txt", "special_tokens_map.json"};
        for (size_t i = 0; i < sizeof side / sizeof side[0]; i++)
            if (copy_side(m->dir, dir, side[i], err)) return -1;
        return 0;
    }
    char *json = NULL, *tmpl = NULL, path[4096];
    size_t len = 0, tlen = 0;
    if (qmix_tok_gguf_json(m->gguf, &json, &len, err)) return -1;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = qmix_write_file(path, json, len, err);
    qmix_tokenizer *tok = NULL;
    if (!rc) rc = qmix_tok_load_json(json, len, in, &tok, err);
    free(json);
    if (rc) return -1;
    json_t *tc = json_object();
    json_object_set_new(tc, "add_bos_token", json_false());
    json_object_set_new(tc, "bos_token", json_null());
    const char *eos = m->cfg.eos_token_id >= 0 ? qmix_tok_id_to_token(tok, m->cfg.eos_token_id)
                                               : NULL;
    if (eos) json_object_set_new(tc, "eos_token", json_string(eos));
    if (qmix_tok_token_to_id(tok, "<|endoftext|>") >= 0)
        json_object_set_new(tc, "pad_token", json_string("<|endoftext|>"));
    json_object_set_new(tc, "tokenizer_class", json_string("Qwen2Tokenizer"));
    qmix_err terr;
    if (!qmix_gguf_chat_template(in, &tmpl, &tlen, &terr))
        json_object_set_new(tc, "chat_template", json_stringn(tmpl, tlen));
    free(tmpl);
    qmix_tok_free(tok);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    rc = qmix_write_json(path, tc, JSON_INDENT(2), err);
    json_decref(tc);
    return rc;
}

/* A checkpoint is already there (so a rerun does not silently mix two). */
static int dir_holds_checkpoint(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct stat sb;
    if (!stat(path, &sb)) return 1;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    return !stat(path, &sb);
}

/* Row r of HF tensor t (matrix e) into out (its last-axis length), transforms applied. */
static void hf_row(const hft *t, int64_t e, int64_t r, float *out, float *tmp, int64_t cols)
{
    switch (t->kind) {
    case K_MAT: {
        const qk_mat *m = at(t->mat, t->stride, e);
        qk_mat_row_f32(m, untile_src(&t->rows, r), t->cols.active ? tmp : out);
        if (t->cols.active)
            for (int64_t k = 0; k < cols; k++) out[k] = tmp[untile_src(&t->cols, k)];
        break;
    }
    case K_GATE_UP: {
        int64_t half = t->shape[1] / 2;
        const qk_mat *m = at(r < half ? t->mat : t->mat2, t->stride, e);
        qk_mat_row_f32(m, r < half ? r : r - half, out);
        break;
    }
    case K_VEC:
        for (int64_t k = 0; k < cols; k++) {
            float v = t->vec[untile_src(&t->cols, k)];
            out[k] = t->xform == XF_MINUS1 ? v - 1.0f : t->xform == XF_ALOG ? logf(-v) : v;
        }
        break;
    case K_CONV:
        memcpy(out, t->vec + untile_src(&t->rows, r) * cols, (size_t)cols * sizeof *out);
        break;
    }
}

int qmix_hf_export(const char *in, const char *out_dir, const qmix_hf_export_opts *o,
                   qmix_hf_export_report *rep, qmix_err *err)
{
    qmix_hf_export_report local;
    if (!rep) rep = &local;
    memset(rep, 0, sizeof *rep);
    if (dir_holds_checkpoint(out_dir) && !o->force)
        return qmix_errf(err, "%s: already holds a checkpoint (pass --force to overwrite)",
                         out_dir);
    qmix_model *m;
    if (qmix_model_open(in, &m, err)) return -1;
    /* built in OUT.partial-PID, moved to out_dir when complete (util/fileio.h) */
    const char *final_dir = out_dir;
    qmix_outdir od;
    if (qmix_outdir_begin(&od, out_dir, err)) {
        qmix_model_close(m);
        return -1;
    }
    out_dir = od.work;
    hplan p = {0};
    qmix_stw_tensor *specs = NULL;
    qmix_stw *w = NULL;
    float *row = NULL, *tmp = NULL;
    uint16_t *bf = NULL;
    int rc = -1;
    char path[4096];
    build(m, &p);
    specs = p.oom ? NULL : calloc(p.n ? p.n : 1, sizeof *specs);
    if (!specs) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    int64_t max_cols = 0;
    for (size_t i = 0; i < p.n; i++) {
        hft *t = &p.t[i];
        specs[i] = (qmix_stw_tensor){.name = t->name, .dtype = QMIX_BF16, .ndim = t->ndim};
        for (int d = 0; d < t->ndim; d++) specs[i].shape[d] = t->shape[d];
        int64_t cols = t->shape[t->ndim - 1];
        if (cols > max_cols) max_cols = cols;
        if (is_block_quantized(t)) rep->n_dequantized++;
    }
    if (rep->n_dequantized && !o->quiet_requant)
        fprintf(stderr, "qmix convert: warning: %d tensors of %s are block-quantized; they are "
                "dequantized into bf16 (the quantization error stays in the weights)\n",
                rep->n_dequantized, in);
    row = malloc((size_t)max_cols * sizeof *row);
    tmp = malloc((size_t)max_cols * sizeof *tmp);
    bf = malloc((size_t)max_cols * sizeof *bf);
    if (!row || !tmp || !bf) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    static const qmix_stw_kv meta[] = {{"format", "pt"}};
    snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
    if (qmix_stw_open(path, specs, p.n, meta, 1, &w, err)) goto done;
    for (size_t i = 0; i < p.n; i++) {
        const hft *t = &p.t[i];
        if (qmix_stw_begin(w, t->name, err)) goto done;
        int64_t cols = t->shape[t->ndim - 1];
        int64_t rows = t->ndim == 1 ? 1 : t->ndim == 2 ? t->shape[0] : t->kind == K_CONV
                                                                         ? t->shape[0]
                                                                         : t->shape[1];
        int64_t nmat = t->kind == K_CONV ? 1 : t->nmat;
        for (int64_t e = 0; e < nmat; e++)
            for (int64_t r = 0; r < rows; r++) {
                hf_row(t, e, r, row, tmp, cols);
                for (int64_t k = 0; k < cols; k++) bf[k] = qk_f32_to_bf16(row[k]);
                if (qmix_stw_write(w, bf, (size_t)cols * 2, err)) goto done;
            }
        rep->params += (uint64_t)(nmat * rows * cols);
        rep->n_tensors++;
        if (o->progress)
            fprintf(stderr, "\rqmix convert: tensor %zu/%zu %-60s", i + 1, p.n, t->name);
    }
    if (o->progress) fprintf(stderr, "\n");
    rc = qmix_stw_close(w, err);
    w = NULL;
    rep->bytes = 2 * rep->params;
    /* config.json last: the file that makes the directory a model */
    if (!rc) rc = write_tokenizer(m, in, out_dir, err);
    if (!rc) rc = write_config(m, out_dir, err);
    if (!rc) rc = qmix_outdir_commit(&od, err);
done:
    qmix_outdir_abandon(&od);
    qmix_stw_discard(w);
    free(specs);
    free(p.t);
    free(row);
    free(tmp);
    free(bf);
    qmix_model_close(m);
    if (rc) qmix_err_prefix(err, "converting %s to %s", in, final_dir);
    return rc;
}

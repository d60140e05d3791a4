/* Model -> GGUF. The source is the bound model (model/model.h), so every input layout qmix reads
 * works the same way: each GGUF tensor is described as a stack of qk_mat views (1-D parameters
 * are the model's widened float32 copies, which already carry the 1 + w and -exp transforms) plus
 * a row and a column permutation (the value-head reorder), and an HF name by which the recipe
 * decides its type and the imatrix gives its importance. Types are all decided before anything is
 * written (the header holds them); then rows are read, permuted and quantized in batches across
 * the thread pool and streamed out in order. */
#include "quant/gguf_export.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "formats/gguf_write.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"
#include "quant/imatrix.h"
#include "quant/recipe.h"
#include "runtime/threadpool.h"
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
    perm imp_cols;         /* GGUF column -> HF column of the importance (ssm_out's heads) */
    char hf[128];          /* the HF name: what recipes and imatrix lookups are keyed by */
    int layer, type;       /* layer (-1 global); the ggml type decided for it */
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
    it->layer = -1;
    return it;
}

/* Gives the last item its HF name (layer tensors under model.language_model.layers.L.). */
static void hf_name(item *it, int layer, const char *suffix)
{
    if (!it) return;
    it->layer = layer;
    if (layer >= 0)
        snprintf(it->hf, sizeof it->hf, "model.language_model.layers.%d.%s", layer, suffix);
    else
        snprintf(it->hf, sizeof it->hf, "%s", suffix);
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

/* The HF name of a block's tensor: the trunk's layer i, or the MTP block's layer (mtp.layers.0.,
 * outside the layer numbering, so recipes see its own role). */
static void block_hf(item *it, int i, int mtp, const char *suffix)
{
    if (!mtp) {
        hf_name(it, i, suffix);
        return;
    }
    if (!it) return;
    it->layer = -1;
    snprintf(it->hf, sizeof it->hf, "mtp.layers.0.%s", suffix);
}

/* Decoder layer ly as GGUF block i (the MTP block's layer is block n_layers, as llama.cpp's
 * converter writes it). */
static void add_block(plan *p, const qmix_model *m, const qmix_layer *ly, int i, int mtp)
{
    const qmix_config *c = &m->cfg;
    int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dv = c->lin_v_head_dim;
    /* a GGUF source is already tiled; an HF/MLX one is grouped and gets the reorder */
    int reorder = !m->gdn_v_tiled && nk != nv;
    char n[QMIX_GGUF_MAX_NAME];
    {
#define NAME(s) (snprintf(n, sizeof n, "blk.%d." s, i), n)
#define HF(x, s) block_hf((x), i, mtp, s)
        HF(add_vec(p, NAME("attn_norm.weight"), ly->input_norm, c->hidden_size),
           "input_layernorm.weight");
        HF(add_vec(p, NAME("post_attention_norm.weight"), ly->post_norm, c->hidden_size),
           "post_attention_layernorm.weight");
        if (ly->is_full) {
            HF(add(p, NAME("attn_q.weight"), &ly->q_proj, 1, 0, 0), "self_attn.q_proj.weight");
            HF(add(p, NAME("attn_k.weight"), &ly->k_proj, 1, 0, 0), "self_attn.k_proj.weight");
            HF(add(p, NAME("attn_v.weight"), &ly->v_proj, 1, 0, 0), "self_attn.v_proj.weight");
            HF(add(p, NAME("attn_output.weight"), &ly->o_proj, 1, 0, 0), "self_attn.o_proj.weight");
            HF(add_vec(p, NAME("attn_q_norm.weight"), ly->q_norm, c->head_dim),
               "self_attn.q_norm.weight");
            HF(add_vec(p, NAME("attn_k_norm.weight"), ly->k_norm, c->head_dim),
               "self_attn.k_norm.weight");
        } else {
            int64_t qk = 2 * nk * c->lin_k_head_dim;
            perm v_rows = {reorder, qk, nv, nk, dv}, heads = {reorder, 0, nv, nk, dv},
                 scalars = {reorder, 0, nv, nk, 1};
            item *it;
            if ((it = add(p, NAME("attn_qkv.weight"), &ly->in_qkv, 1, 0, 0))) {
                it->rows = v_rows;
                HF(it, "linear_attn.in_proj_qkv.weight");
            }
            if ((it = add(p, NAME("attn_gate.weight"), &ly->in_z, 1, 0, 0))) {
                it->rows = heads;
                HF(it, "linear_attn.in_proj_z.weight");
            }
            if ((it = add(p, NAME("ssm_beta.weight"), &ly->in_b, 1, 0, 0))) {
                it->rows = scalars;
                HF(it, "linear_attn.in_proj_b.weight");
            }
            if ((it = add(p, NAME("ssm_alpha.weight"), &ly->in_a, 1, 0, 0))) {
                it->rows = scalars;
                HF(it, "linear_attn.in_proj_a.weight");
            }
            if ((it = add(p, NAME("ssm_out.weight"), &ly->out_proj, 1, 0, 0))) {
                it->cols = heads;
                /* the imatrix lookup answers in HF order whatever the source's order */
                it->imp_cols = (perm){nk != nv, 0, nv, nk, dv};
                HF(it, "linear_attn.out_proj.weight");
            }
            if ((it = add_vec(p, NAME("ssm_a"), ly->neg_exp_A, nv))) {
                it->cols = scalars;
                HF(it, "linear_attn.A_log");
            }
            if ((it = add_vec(p, NAME("ssm_dt.bias"), ly->dt_bias, nv))) {
                it->cols = scalars;
                HF(it, "linear_attn.dt_bias");
            }
            HF(add_vec(p, NAME("ssm_norm.weight"), ly->gdn_norm, dv), "linear_attn.norm.weight");
            int64_t C = qk + nv * dv;
            if ((it = add_vec(p, NAME("ssm_conv1d.weight"), ly->conv_w, C * c->conv_kernel))) {
                it->own.rows = C; /* [C][Kc] float32 rows, ne {Kc, C} */
                it->own.cols = c->conv_kernel;
                it->own.row_bytes = (size_t)c->conv_kernel * 4;
                it->ne[0] = c->conv_kernel;
                it->ne[1] = C;
                it->n_dims = 2;
                it->rows = v_rows;
                HF(it, "linear_attn.conv1d.weight");
            }
        }
        HF(add(p, NAME("ffn_gate_inp.weight"), &ly->router, 1, 0, 1), "mlp.gate.weight");
        item *sg = add(p, NAME("ffn_gate_inp_shexp.weight"), &ly->shared_expert_gate, 1, 0, 1);
        if (sg) sg->n_dims = 1;
        HF(sg, "mlp.shared_expert_gate.weight");
        HF(add(p, NAME("ffn_gate_shexp.weight"), &ly->shared_gate, 1, 0, 0),
           "mlp.shared_expert.gate_proj.weight");
        HF(add(p, NAME("ffn_up_shexp.weight"), &ly->shared_up, 1, 0, 0),
           "mlp.shared_expert.up_proj.weight");
        HF(add(p, NAME("ffn_down_shexp.weight"), &ly->shared_down, 1, 0, 0),
           "mlp.shared_expert.down_proj.weight");
        /* per-expert HF names: the imatrix maps gate_proj/up_proj/down_proj to the _exps entries */
        HF(add(p, NAME("ffn_gate_exps.weight"), &ly->experts[0].gate, c->n_experts,
               sizeof(qmix_expert), 0), "mlp.experts.gate_proj");
        HF(add(p, NAME("ffn_up_exps.weight"), &ly->experts[0].up, c->n_experts,
               sizeof(qmix_expert), 0), "mlp.experts.up_proj");
        HF(add(p, NAME("ffn_down_exps.weight"), &ly->experts[0].down, c->n_experts,
               sizeof(qmix_expert), 0), "mlp.experts.down_proj");
#undef NAME
#undef HF
    }
}

static void build_plan(const qmix_model *m, plan *p)
{
    const qmix_config *c = &m->cfg;
    hf_name(add(p, "token_embd.weight", &m->embed, 1, 0, 0), -1,
            "model.language_model.embed_tokens.weight");
    hf_name(add_vec(p, "output_norm.weight", m->final_norm, c->hidden_size), -1,
            "model.language_model.norm.weight");
    if (m->lm_head.data != m->embed.data)
        hf_name(add(p, "output.weight", &m->lm_head, 1, 0, 0), -1, "lm_head.weight");
    for (int i = 0; i < c->n_layers && !p->oom; i++) add_block(p, m, &m->layers[i], i, 0);
    const qmix_mtp *mtp = m->mtp;
    if (!mtp || p->oom) return;
    char n[QMIX_GGUF_MAX_NAME];
    int L = c->n_layers;
#define NAME(s) (snprintf(n, sizeof n, "blk.%d.nextn." s, L), n)
    hf_name(add(p, NAME("eh_proj.weight"), &mtp->fc, 1, 0, 0), -1, "mtp.fc.weight");
    hf_name(add_vec(p, NAME("enorm.weight"), mtp->norm_embed, c->hidden_size), -1,
            "mtp.pre_fc_norm_embedding.weight");
    hf_name(add_vec(p, NAME("hnorm.weight"), mtp->norm_hidden, c->hidden_size), -1,
            "mtp.pre_fc_norm_hidden.weight");
    hf_name(add_vec(p, NAME("shared_head_norm.weight"), mtp->norm, c->hidden_size), -1,
            "mtp.norm.weight");
#undef NAME
    add_block(p, m, &mtp->layer, L, 1);
}

int qmix_gguf_type_for_bits(int bits, int keep_type)
{
    switch (bits) {
    case 0: return keep_type ? keep_type : QMIX_GGML_BF16;
    case 2: return QMIX_GGML_Q2_K;
    case 3: return QMIX_GGML_Q3_K;
    case 4: return QMIX_GGML_Q4_K;
    case 5: return QMIX_GGML_Q5_K;
    case 6: return QMIX_GGML_Q6_K;
    case 8: return QMIX_GGML_Q8_0;
    default: return -1;
    }
}

int qmix_gguf_fallback_type(int type, int64_t cols)
{
    if (qmix_ggml_row_bytes(type, cols)) return type;
    int alt;
    switch (type) {
    case QMIX_GGML_Q4_K: alt = QMIX_GGML_Q5_0; break;
    case QMIX_GGML_Q5_K: alt = QMIX_GGML_Q5_1; break;
    case QMIX_GGML_Q6_K: alt = QMIX_GGML_Q8_0; break;
    case QMIX_GGML_Q2_K: case QMIX_GGML_Q3_K: alt = QMIX_GGML_Q4_0; break;
    case QMIX_GGML_IQ4_XS: alt = QMIX_GGML_IQ4_NL; break;
    default: alt = QMIX_GGML_F16;
    }
    return qmix_ggml_row_bytes(alt, cols) ? alt : QMIX_GGML_F16;
}

uint32_t qmix_gguf_file_type(int type)
{
    /* llama_ftype ids; the K-quants as their _M mixes, which is what a recipe-shaped file is */
    switch (type) {
    case QMIX_GGML_F32: return 0;
    case QMIX_GGML_F16: return 1;
    case QMIX_GGML_Q4_0: return 2;
    case QMIX_GGML_Q4_1: return 3;
    case QMIX_GGML_Q8_0: return 7;
    case QMIX_GGML_Q5_0: return 8;
    case QMIX_GGML_Q5_1: return 9;
    case QMIX_GGML_Q2_K: return 10;
    case QMIX_GGML_Q3_K: return 12;
    case QMIX_GGML_Q4_K: return 15;
    case QMIX_GGML_Q5_K: return 17;
    case QMIX_GGML_Q6_K: return 18;
    case QMIX_GGML_IQ4_NL: return 25;
    case QMIX_GGML_IQ4_XS: return 30;
    default: return 32; /* BF16 */
    }
}

static int is_searched(int type)
{
    return type != QMIX_GGML_F32 && type != QMIX_GGML_F16 && type != QMIX_GGML_BF16 &&
           type != QMIX_GGML_Q8_0;
}

/* What the recipe asked that the GGUF cannot hold, gathered over the plan. */
typedef struct unexpressed {
    unsigned groups;          /* bit g/32: a quantizing rule with group g (ignored) */
    int f32_asked;            /* router / shared-expert gate the recipe wanted quantized */
    int fb[QMIX_GGML_TYPE_LIMIT][QMIX_GGML_TYPE_LIMIT]; /* fallbacks wanted -> written */
} unexpressed;

/* Decides every item's type: forced F32 for 1-D tensors, norms, router, shared-expert gate and
 * conv; otherwise the recipe's bits (or opts type), then llama-quantize's fallback. */
static int decide_types(plan *p, const qmix_config *c, const qmix_gguf_export_opts *o,
                        unexpressed *u, qmix_err *err)
{
    for (size_t i = 0; i < p->n; i++) {
        item *it = &p->items[i];
        int want = o->type;
        if (!o->recipe && !strncmp(it->hf, "mtp.", 4) && want != QMIX_GGML_F32 &&
            want != QMIX_GGML_F16)
            want = o->keep_type ? o->keep_type : QMIX_GGML_BF16; /* MTP kept 16-bit */
        if (o->recipe) {
            int experts = it->n_dims == 3;
            /* GGUF ignores group sizes, so the decision is asked for a row width every group
             * divides: only role and layer decide, never MLX's divisibility rule */
            int64_t shape[3] = {experts ? it->ne[2] : it->ne[1], experts ? it->ne[1] : 128, 128};
            int full = it->layer >= 0 && c->layer_is_full[it->layer];
            qmix_qdecision d = qmix_recipe_resolve(o->recipe, it->hf, experts ? 3 : 2, shape, full,
                                                  c->n_layers);
            if (d.bits && (d.method == QMIX_METHOD_GPTQ || d.method == QMIX_METHOD_AWQ))
                return qmix_errf(err, "recipe %s: %s (%s) asks method=%s, which GGUF output does "
                                 "not support (rtn or imatrix: GPTQ/AWQ codes do not map onto "
                                 "ggml blocks)", o->recipe->name, it->hf, it->name,
                                 d.method == QMIX_METHOD_GPTQ ? "gptq" : "awq");
            if (d.bits && d.method == QMIX_METHOD_IMATRIX && !o->imatrix)
                return qmix_errf(err, "recipe %s: %s asks method=imatrix but no importance "
                                 "matrix was given (--imatrix)", o->recipe->name, it->hf);
            want = qmix_gguf_type_for_bits(d.bits, o->keep_type);
            if (want < 0)
                return qmix_errf(err, "recipe %s: %s asks %d bits, which no GGUF type holds "
                                 "(2, 3, 4, 5, 6, 8 or keep)", o->recipe->name, it->hf, d.bits);
            if (d.bits && !it->force_f32 && it->n_dims > 1) u->groups |= 1u << (d.group / 32);
            if (d.bits && (it->force_f32 || it->n_dims == 1) &&
                (d.role == QMIX_ROLE_ROUTER || d.role == QMIX_ROLE_SHARED_EXPERT_GATE))
                u->f32_asked++;
        }
        if (it->force_f32 || it->n_dims == 1) {
            it->type = QMIX_GGML_F32;
            continue;
        }
        it->type = qmix_gguf_fallback_type(want, it->ne[0]);
        if (it->type != want) u->fb[want][it->type]++;
    }
    return 0;
}

static void note(qmix_gguf_export_report *rep, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void note(qmix_gguf_export_report *rep, const char *fmt, ...)
{
    size_t off = strlen(rep->notes);
    if (off + 1 >= sizeof rep->notes) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rep->notes + off, sizeof rep->notes - off, fmt, ap);
    va_end(ap);
}

static void write_notes(const unexpressed *u, qmix_gguf_export_report *rep)
{
    if (u->groups) {
        note(rep, "group size");
        for (int g = 1; g <= 4; g++)
            if (u->groups & (1u << g)) note(rep, " %d", 32 * g);
        note(rep, ": ignored; ggml blocks fix their own (K-quants: 16/32-element sub-blocks in "
             "256-element super-blocks; Q8_0, Q4_0, Q5_x: 32)\n");
    }
    if (u->f32_asked)
        note(rep, "%d router / shared-expert-gate tensors: the recipe asks them quantized; GGUF "
             "keeps them F32 (llama.cpp never quantizes them)\n", u->f32_asked);
    for (int a = 0; a < QMIX_GGML_TYPE_LIMIT; a++)
        for (int b = 0; b < QMIX_GGML_TYPE_LIMIT; b++)
            if (u->fb[a][b])
                note(rep, "%d matrices: %s does not divide their rows; written as %s "
                     "(llama-quantize's fallback)\n", u->fb[a][b], qmix_ggml_type_name(a),
                     qmix_ggml_type_name(b));
}

/* One batch of rows of one matrix, quantized in parallel into enc (row i at i·rb). */
typedef struct batch {
    const item *it;
    const qk_mat *src;
    const float *imp;      /* importance in GGUF column order, or NULL */
    int type;
    size_t rb;
    int64_t r0;
    uint8_t *enc;
    float *scratch;        /* 2·max_cols floats per thread */
    int64_t max_cols;
} batch;

static void batch_row(void *ctx, int task, int thread)
{
    const batch *bt = ctx;
    const item *it = bt->it;
    float *row = bt->scratch + (size_t)thread * 2 * (size_t)bt->max_cols, *tmp = row + bt->max_cols;
    qk_mat_row_f32(bt->src, perm_src(&it->rows, bt->r0 + task), row);
    const float *x = row;
    if (it->cols.active) {
        for (int64_t k = 0; k < it->ne[0]; k++) tmp[k] = row[perm_src(&it->cols, k)];
        x = tmp;
    }
    qmix_ggml_quantize_row(bt->type, x, it->ne[0], bt->imp, bt->enc + (size_t)task * bt->rb);
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

static void declare_model(qmix_ggw *w, const qmix_model *m, const char *in, uint32_t ft, int interval)
{
    const qmix_config *c = &m->cfg;
    const char *base = strrchr(in, '/');
    base = base && base[1] ? base + 1 : in;
    qmix_ggw_kv_str(w, "general.architecture", "qwen35moe");
    qmix_ggw_kv_str(w, "general.name", base);
    qmix_ggw_kv_u32(w, "general.file_type", ft);
    qmix_ggw_kv_u32(w, "general.quantization_version", 2);
#define A(k) "qwen35moe." k
    qmix_ggw_kv_u32(w, A("block_count"), (uint32_t)(c->n_layers + (m->mtp ? 1 : 0)));
    if (m->mtp) qmix_ggw_kv_u32(w, A("nextn_predict_layers"), 1);
    qmix_ggw_kv_u32(w, A("context_length"), (uint32_t)c->max_position_embeddings);
    qmix_ggw_kv_u32(w, A("embedding_length"), (uint32_t)c->hidden_size);
    qmix_ggw_kv_u32(w, A("attention.head_count"), (uint32_t)c->n_heads);
    qmix_ggw_kv_u32(w, A("attention.head_count_kv"), (uint32_t)c->n_kv_heads);
    qmix_ggw_kv_u32(w, A("attention.key_length"), (uint32_t)c->head_dim);
    qmix_ggw_kv_u32(w, A("attention.value_length"), (uint32_t)c->head_dim);
    qmix_ggw_kv_f32(w, A("attention.layer_norm_rms_epsilon"), c->rms_eps);
    qmix_ggw_kv_f32(w, A("rope.freq_base"), (float)c->rope_theta);
    qmix_ggw_kv_u32(w, A("rope.dimension_count"), (uint32_t)c->rot_dim);
    /* the config's M-RoPE sections; a text-only config without them gets the family's */
    int32_t sections[4] = {11, 11, 10, 0};
    if (c->mrope_section[0] || c->mrope_section[1] || c->mrope_section[2])
        for (int i = 0; i < 3; i++) sections[i] = c->mrope_section[i];
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

/* The type most matrix parameters have: general.file_type is named after it. */
static int dominant_type(const plan *p)
{
    uint64_t n[QMIX_GGML_TYPE_LIMIT] = {0};
    for (size_t i = 0; i < p->n; i++)
        if (!p->items[i].force_f32 && p->items[i].n_dims > 1)
            n[p->items[i].type] += (uint64_t)(p->items[i].ne[0] * p->items[i].ne[1] *
                                              p->items[i].ne[2]);
    int best = QMIX_GGML_BF16;
    for (int t = 0; t < QMIX_GGML_TYPE_LIMIT; t++)
        if (n[t] > n[best]) best = t;
    return best;
}

/* Importance of matrix e of it, in GGUF column order, into imp (scratch hf of ne[0]): 1 found,
 * 0 none, -1 error. */
static int importance(const item *it, const qmix_imatrix *im, const qmix_config *c, int64_t e,
                      float *hf, float *imp, qmix_err *err)
{
    int64_t count;
    int rc = qmix_imatrix_lookup(im, it->hf, e, it->ne[0], c, hf, &count, err);
    if (rc <= 0) return rc;
    for (int64_t k = 0; k < it->ne[0]; k++) imp[k] = hf[perm_src(&it->imp_cols, k)];
    return 1;
}

/* Adds the tensor's parameters and written bytes to the report. */
static void account(const item *it, qmix_gguf_export_report *rep)
{
    qmix_gguf_role_stat *st = &rep->roles[qmix_role_of(it->hf)];
    uint64_t params = (uint64_t)(it->ne[0] * it->ne[1] * it->ne[2]);
    uint64_t bytes = qmix_ggml_row_bytes(it->type, it->ne[0]) * (uint64_t)(it->ne[1] * it->ne[2]);
    st->params += params;
    st->bytes += bytes;
    st->tensors++;
    st->type_mask |= 1ull << it->type;
    rep->params += params;
    rep->bytes += bytes;
    rep->n_tensors++;
}

int qmix_gguf_export(const char *in, const char *out, const qmix_gguf_export_opts *o,
                     qmix_err *err)
{
    int type = o->type;
    if (!o->recipe && (!qmix_ggml_can_quantize(type) || qmix_ggml_block_elems(type) == 0))
        return qmix_errf(err, "GGUF output type %s is not supported (f32, f16, bf16, q8_0, q4_0, "
                         "q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs)",
                         qmix_ggml_type_name(type) ? qmix_ggml_type_name(type) : "?");
    if (o->keep_type && o->keep_type != QMIX_GGML_BF16 && o->keep_type != QMIX_GGML_F16 &&
        o->keep_type != QMIX_GGML_F32)
        return qmix_errf(err, "unquantized tensors must be bf16, f16 or f32");
    qmix_gguf_export_report local, *rep = o->report ? o->report : &local;
    memset(rep, 0, sizeof *rep);
    qmix_model *m;
    if (qmix_model_open(in, &m, err)) return -1;
    const qmix_config *c = &m->cfg;
    int interval = attention_interval(c);
    plan p = {0};
    qmix_ggw *w = NULL;
    qmix_pool *pool = NULL;
    float *scratch = NULL, *imp = NULL, *imp_hf = NULL;
    uint8_t *enc = NULL;
    unexpressed *u = calloc(1, sizeof *u);
    int rc = -1;
    if (!u) {
        qmix_errf(err, "out of memory");
        goto done;
    }
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
    if (decide_types(&p, c, o, u, err)) goto done;
    write_notes(u, rep);
    rep->file_type = qmix_gguf_file_type(dominant_type(&p));
    declare_model(w, m, in, rep->file_type, interval);
    if (o->imatrix) {
        /* as llama-quantize records them */
        const char *file = o->imatrix_file ? o->imatrix_file : o->imatrix->path;
        if (file) qmix_ggw_kv_str(w, "quantize.imatrix.file", file);
        if (o->imatrix->dataset) qmix_ggw_kv_str(w, "quantize.imatrix.dataset", o->imatrix->dataset);
        qmix_ggw_kv_i32(w, "quantize.imatrix.entries_count", o->imatrix->n);
        qmix_ggw_kv_i32(w, "quantize.imatrix.chunks_count", (int32_t)o->imatrix->chunk_count);
    }
    if (declare_tokenizer(w, m, in, err)) goto done;
    int64_t max_cols = 0;
    size_t max_rb = 0;
    for (size_t i = 0; i < p.n; i++) {
        item *it = &p.items[i];
        int64_t ne[3] = {it->ne[0], it->ne[1], it->ne[2]};
        qmix_ggw_tensor(w, it->name, it->type, it->n_dims, ne);
        if (it->ne[0] > max_cols) max_cols = it->ne[0];
        size_t rb = qmix_ggml_row_bytes(it->type, it->ne[0]);
        if (rb > max_rb) max_rb = rb;
    }
    pool = qmix_pool_new(o->n_threads);
    int nt = pool ? qmix_pool_threads(pool) : 1;
    /* a batch is at most ~4 MiB of encoded rows (and at least one row) */
    int64_t batch_rows = (int64_t)((4u << 20) / (max_rb ? max_rb : 1));
    if (batch_rows < 1) batch_rows = 1;
    scratch = malloc((size_t)nt * 2 * (size_t)max_cols * sizeof *scratch);
    imp = malloc((size_t)max_cols * sizeof *imp);
    imp_hf = malloc((size_t)max_cols * sizeof *imp_hf);
    enc = malloc((size_t)batch_rows * max_rb);
    if (!pool || !scratch || !imp || !imp_hf || !enc) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    if (o->dry_run) {
        for (size_t i = 0; i < p.n; i++) account(&p.items[i], rep);
        rc = 0;
        goto done;
    }
    if (qmix_ggw_open(w, out, err)) goto done;
    for (size_t i = 0; i < p.n; i++) {
        const item *it = &p.items[i];
        size_t rb = qmix_ggml_row_bytes(it->type, it->ne[0]);
        account(it, rep);
        if (o->progress)
            fprintf(stderr, "\rqmix: tensor %zu/%zu %-34s %-5s", i + 1, p.n, it->name,
                    qmix_ggml_type_name(it->type));
        for (int64_t e = 0; e < it->ne[2]; e++) {
            const qk_mat *src =
                it->mat ? (const qk_mat *)((const uint8_t *)it->mat + (size_t)e * it->stride)
                        : &it->own;
            const float *wimp = NULL;
            if (o->imatrix && is_searched(it->type)) {
                int f = importance(it, o->imatrix, c, e, imp_hf, imp, err);
                if (f < 0) goto done;
                if (f) {
                    wimp = imp;
                    rep->n_imatrix++;
                } else {
                    rep->n_no_imatrix++;
                }
            }
            for (int64_t r0 = 0; r0 < it->ne[1]; r0 += batch_rows) {
                int64_t n = it->ne[1] - r0 < batch_rows ? it->ne[1] - r0 : batch_rows;
                batch bt = {it, src, wimp, it->type, rb, r0, enc, scratch, max_cols};
                if (n == 1) batch_row(&bt, 0, 0);
                else qmix_pool_run(pool, batch_row, &bt, (int)n);
                if (qmix_ggw_write(w, enc, rb * (size_t)n, err)) goto done;
            }
        }
    }
    if (o->progress) fprintf(stderr, "\n");
    rep->n_fallback = 0;
    for (int a = 0; a < QMIX_GGML_TYPE_LIMIT; a++)
        for (int b = 0; b < QMIX_GGML_TYPE_LIMIT; b++) rep->n_fallback += u->fb[a][b];
    rc = qmix_ggw_close(w, err);
    w = NULL;
done:
    qmix_ggw_discard(w);
    qmix_pool_free(pool);
    free(u);
    free(p.items);
    free(scratch);
    free(imp);
    free(imp_hf);
    free(enc);
    qmix_model_close(m);
    if (rc) qmix_err_prefix(err, "converting %s to %s", in, out ? out : "GGUF");
    return rc;
}

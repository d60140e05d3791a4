#include "eval/compare.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "util/err.h"

double qmix_cmp_cosine(const qmix_cmp_stat *s)
{
    if (s->norm_a == 0 && s->norm_b == 0) return 1;
    if (s->norm_a == 0 || s->norm_b == 0) return 0;
    return s->dot / sqrt(s->norm_a * s->norm_b);
}

double qmix_cmp_rel_err(const qmix_cmp_stat *s)
{
    return s->norm_a > 0 ? sqrt(s->err2 / s->norm_a) : (s->err2 > 0 ? INFINITY : 0);
}

/* How a tensor's rows (or columns) are indexed by Gated DeltaNet value heads, whose order differs
 * between Hugging Face (grouped by key head) and GGUF (tiled). */
typedef enum vmap { V_NONE, V_QKV, V_HEADS_DV, V_HEADS_1, V_COLS_DV } vmap;

typedef struct ctx {
    const qmix_model *a, *b;
    int64_t nk, nv, dk, dv;
    float *ra, *rb, *tmp;     /* rows of the widest matrix */
    qmix_cmp_result *out;
    int cap;
    qmix_err *err;
} ctx;

/* The position in a model's order of value head h (Hugging Face order). */
static int64_t vpos(const ctx *x, const qmix_model *m, int64_t h)
{
    if (!m->gdn_v_tiled) return h;
    int64_t r = x->nv / x->nk;
    return (h % r) * x->nk + h / r;
}

/* The model's row (or channel) holding canonical row i of a tensor indexed like kind. */
static int64_t map_row(const ctx *x, const qmix_model *m, vmap kind, int64_t i)
{
    int64_t base = 2 * x->nk * x->dk;
    switch (kind) {
    case V_QKV:
        if (i < base) return i;
        return base + vpos(x, m, (i - base) / x->dv) * x->dv + (i - base) % x->dv;
    case V_HEADS_DV: return vpos(x, m, i / x->dv) * x->dv + i % x->dv;
    case V_HEADS_1: return vpos(x, m, i);
    default: return i;
    }
}

static void accumulate(qmix_cmp_stat *s, const float *a, const float *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        double da = a[i], db = b[i], d = fabs(da - db);
        s->dot += da * db;
        s->norm_a += da * da;
        s->norm_b += db * db;
        s->err2 += (da - db) * (da - db);
        if (d > s->max_abs || d != d) s->max_abs = d; /* a NaN shows */
    }
    s->n += n;
}

static void merge(qmix_cmp_stat *into, const qmix_cmp_stat *s)
{
    into->dot += s->dot;
    into->norm_a += s->norm_a;
    into->norm_b += s->norm_b;
    into->err2 += s->err2;
    if (s->max_abs > into->max_abs || s->max_abs != s->max_abs) into->max_abs = s->max_abs;
    into->n += s->n;
}

/* Out-of-order value-head columns (out_proj) put back in canonical order. */
static void unpermute_cols(const ctx *x, const qmix_model *m, float *row, int64_t cols)
{
    if (!m->gdn_v_tiled) return;
    for (int64_t h = 0; h < x->nv; h++)
        memcpy(x->tmp + h * x->dv, row + vpos(x, m, h) * x->dv, (size_t)x->dv * sizeof(float));
    memcpy(row, x->tmp, (size_t)cols * sizeof(float));
}

static int cmp_mat(ctx *x, const char *what, const qk_mat *a, const qk_mat *b, vmap kind,
                   qmix_cmp_stat *st)
{
    if (a->rows != b->rows || a->cols != b->cols)
        return qmix_errf(x->err, "%s: [%lld, %lld] in the first model, [%lld, %lld] in the second",
                         what, (long long)a->rows, (long long)a->cols, (long long)b->rows,
                         (long long)b->cols);
    for (int64_t r = 0; r < a->rows; r++) {
        qk_mat_row_f32(a, map_row(x, x->a, kind, r), x->ra);
        qk_mat_row_f32(b, map_row(x, x->b, kind, r), x->rb);
        if (kind == V_COLS_DV) {
            unpermute_cols(x, x->a, x->ra, a->cols);
            unpermute_cols(x, x->b, x->rb, b->cols);
        }
        accumulate(st, x->ra, x->rb, a->cols);
    }
    return 0;
}

/* A float32 parameter of n rows of width elements, rows indexed like kind. */
static void cmp_vec(ctx *x, const float *a, const float *b, int64_t n, int64_t width, vmap kind,
                    qmix_cmp_stat *st)
{
    for (int64_t i = 0; i < n; i++)
        accumulate(st, a + map_row(x, x->a, kind, i) * width, b + map_row(x, x->b, kind, i) * width,
                   width);
}

static qmix_cmp_tensor *add(ctx *x, qmix_role role, int layer, const char *name)
{
    if (x->out->n_tensors == x->cap) {
        int cap = x->cap ? 2 * x->cap : 64;
        qmix_cmp_tensor *t = realloc(x->out->tensors, (size_t)cap * sizeof *t);
        if (!t) return NULL;
        x->out->tensors = t;
        x->cap = cap;
    }
    qmix_cmp_tensor *t = &x->out->tensors[x->out->n_tensors++];
    memset(t, 0, sizeof *t);
    t->role = role;
    t->layer = layer;
    if (layer >= 0) snprintf(t->name, sizeof t->name, "layers.%d.%s", layer, name);
    else snprintf(t->name, sizeof t->name, "%s", name);
    return t;
}

static int mat(ctx *x, qmix_role role, int layer, const char *name, const qk_mat *a,
               const qk_mat *b, vmap kind)
{
    if (!a->data || !b->data) return 0; /* not bound in this model (e.g. no shared expert) */
    qmix_cmp_tensor *t = add(x, role, layer, name);
    if (!t) return qmix_errf(x->err, "out of memory");
    if (cmp_mat(x, t->name, a, b, kind, &t->stat)) return -1;
    t->min_cosine = qmix_cmp_cosine(&t->stat);
    return 0;
}

static int vec(ctx *x, qmix_role role, int layer, const char *name, const float *a, const float *b,
               int64_t n, int64_t width, vmap kind)
{
    if (!a || !b) return 0;
    qmix_cmp_tensor *t = add(x, role, layer, name);
    if (!t) return qmix_errf(x->err, "out of memory");
    cmp_vec(x, a, b, n, width, kind, &t->stat);
    t->min_cosine = qmix_cmp_cosine(&t->stat);
    return 0;
}

/* All experts' gate+up (or down) of a layer as one entry; min_cosine over the experts. */
static int experts(ctx *x, int layer, int down)
{
    const qmix_layer *la = &x->a->layers[layer], *lb = &x->b->layers[layer];
    if (!la->experts || !lb->experts) return 0;
    qmix_cmp_tensor *t = add(x, down ? QMIX_ROLE_EXPERTS_DOWN : QMIX_ROLE_EXPERTS_GATE_UP, layer,
                             down ? "experts.down" : "experts.gate_up");
    if (!t) return qmix_errf(x->err, "out of memory");
    t->min_cosine = 1;
    for (int e = 0; e < x->a->cfg.n_experts; e++) {
        const qk_mat *pa[2] = {&la->experts[e].gate, &la->experts[e].up};
        const qk_mat *pb[2] = {&lb->experts[e].gate, &lb->experts[e].up};
        if (down) pa[0] = &la->experts[e].down, pb[0] = &lb->experts[e].down;
        qmix_cmp_stat one = {0};
        for (int k = 0; k < (down ? 1 : 2); k++) {
            char what[128];
            snprintf(what, sizeof what, "%s (expert %d)", t->name, e);
            if (cmp_mat(x, what, pa[k], pb[k], V_NONE, &one)) return -1;
        }
        double c = qmix_cmp_cosine(&one);
        if (c < t->min_cosine || c != c) t->min_cosine = c;
        merge(&t->stat, &one);
    }
    return 0;
}

static int same_geometry(const qmix_config *a, const qmix_config *b, qmix_err *err)
{
#define SAME(f)                                                                                  \
    if (a->f != b->f)                                                                            \
        return qmix_errf(err, "the models differ in " #f " (%d vs %d): not the same model",      \
                         (int)a->f, (int)b->f);
    SAME(hidden_size) SAME(n_layers) SAME(vocab_size) SAME(n_heads) SAME(n_kv_heads)
    SAME(head_dim) SAME(lin_n_k_heads) SAME(lin_n_v_heads) SAME(lin_k_head_dim)
    SAME(lin_v_head_dim) SAME(conv_kernel) SAME(n_experts) SAME(moe_ffn) SAME(shared_ffn)
#undef SAME
    for (int i = 0; i < a->n_layers; i++)
        if (a->layer_is_full[i] != b->layer_is_full[i])
            return qmix_errf(err, "layer %d is %s attention in the first model, not in the second",
                             i, a->layer_is_full[i] ? "full" : "linear");
    return 0;
}

int qmix_compare_models(const qmix_model *a, const qmix_model *b,
                        void (*progress)(void *user, int done, int total), void *user,
                        const volatile sig_atomic_t *stop, qmix_cmp_result *out, qmix_err *err)
{
    memset(out, 0, sizeof *out);
    const qmix_config *c = &a->cfg;
    if (same_geometry(c, &b->cfg, err)) return -1;
    ctx x = {.a = a, .b = b, .nk = c->lin_n_k_heads, .nv = c->lin_n_v_heads,
             .dk = c->lin_k_head_dim, .dv = c->lin_v_head_dim, .out = out, .err = err};
    int64_t C = 2 * x.nk * x.dk + x.nv * x.dv, widest = c->hidden_size;
    const int64_t dims[] = {C, x.nv * x.dv, (int64_t)c->n_heads * c->head_dim, c->moe_ffn,
                            c->shared_ffn, c->vocab_size};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++)
        if (dims[i] > widest) widest = dims[i];
    x.ra = malloc((size_t)widest * sizeof(float));
    x.rb = malloc((size_t)widest * sizeof(float));
    x.tmp = malloc((size_t)widest * sizeof(float));
    int rc = -1;
    if (!x.ra || !x.rb || !x.tmp) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    const int64_t D = c->hidden_size, nv = x.nv, dv = x.dv, hd = c->head_dim;
    if (mat(&x, QMIX_ROLE_EMBED, -1, "embed_tokens", &a->embed, &b->embed, V_NONE) ||
        mat(&x, QMIX_ROLE_LM_HEAD, -1, "lm_head", &a->lm_head, &b->lm_head, V_NONE) ||
        vec(&x, QMIX_ROLE_NORM, -1, "final_norm", a->final_norm, b->final_norm, 1, D, V_NONE))
        goto done;
    for (int i = 0; i < c->n_layers && !(stop && *stop); i++) {
        const qmix_layer *la = &a->layers[i], *lb = &b->layers[i];
        int bad =
            vec(&x, QMIX_ROLE_NORM, i, "input_layernorm", la->input_norm, lb->input_norm, 1, D,
                V_NONE) ||
            vec(&x, QMIX_ROLE_NORM, i, "post_attention_layernorm", la->post_norm, lb->post_norm, 1,
                D, V_NONE);
        if (!bad && !c->layer_is_full[i])
            bad = mat(&x, QMIX_ROLE_GDN_QKV, i, "in_proj_qkv", &la->in_qkv, &lb->in_qkv, V_QKV) ||
                  mat(&x, QMIX_ROLE_GDN_Z, i, "in_proj_z", &la->in_z, &lb->in_z, V_HEADS_DV) ||
                  mat(&x, QMIX_ROLE_GDN_B, i, "in_proj_b", &la->in_b, &lb->in_b, V_HEADS_1) ||
                  mat(&x, QMIX_ROLE_GDN_A, i, "in_proj_a", &la->in_a, &lb->in_a, V_HEADS_1) ||
                  mat(&x, QMIX_ROLE_GDN_OUT, i, "out_proj", &la->out_proj, &lb->out_proj,
                      V_COLS_DV) ||
                  vec(&x, QMIX_ROLE_GDN_PARAMS, i, "conv1d", la->conv_w, lb->conv_w, C,
                      c->conv_kernel, V_QKV) ||
                  vec(&x, QMIX_ROLE_GDN_PARAMS, i, "A_log", la->neg_exp_A, lb->neg_exp_A, nv, 1,
                      V_HEADS_1) ||
                  vec(&x, QMIX_ROLE_GDN_PARAMS, i, "dt_bias", la->dt_bias, lb->dt_bias, nv, 1,
                      V_HEADS_1) ||
                  vec(&x, QMIX_ROLE_NORM, i, "linear_attn.norm", la->gdn_norm, lb->gdn_norm, 1, dv,
                      V_NONE);
        if (!bad && c->layer_is_full[i])
            bad = mat(&x, QMIX_ROLE_ATTN_Q, i, "q_proj", &la->q_proj, &lb->q_proj, V_NONE) ||
                  mat(&x, QMIX_ROLE_ATTN_K, i, "k_proj", &la->k_proj, &lb->k_proj, V_NONE) ||
                  mat(&x, QMIX_ROLE_ATTN_V, i, "v_proj", &la->v_proj, &lb->v_proj, V_NONE) ||
                  mat(&x, QMIX_ROLE_ATTN_O, i, "o_proj", &la->o_proj, &lb->o_proj, V_NONE) ||
                  vec(&x, QMIX_ROLE_NORM, i, "q_norm", la->q_norm, lb->q_norm, 1, hd, V_NONE) ||
                  vec(&x, QMIX_ROLE_NORM, i, "k_norm", la->k_norm, lb->k_norm, 1, hd, V_NONE);
        if (!bad)
            bad = mat(&x, QMIX_ROLE_ROUTER, i, "mlp.gate", &la->router, &lb->router, V_NONE) ||
                  mat(&x, QMIX_ROLE_SHARED_EXPERT, i, "shared_expert.gate_proj", &la->shared_gate,
                      &lb->shared_gate, V_NONE) ||
                  mat(&x, QMIX_ROLE_SHARED_EXPERT, i, "shared_expert.up_proj", &la->shared_up,
                      &lb->shared_up, V_NONE) ||
                  mat(&x, QMIX_ROLE_SHARED_EXPERT, i, "shared_expert.down_proj",
                      &la->shared_down, &lb->shared_down, V_NONE) ||
                  mat(&x, QMIX_ROLE_SHARED_EXPERT_GATE, i, "shared_expert_gate",
                      &la->shared_expert_gate, &lb->shared_expert_gate, V_NONE) ||
                  experts(&x, i, 0) || experts(&x, i, 1);
        if (bad) goto done;
        if (progress) progress(user, i + 1, c->n_layers);
    }
    rc = 0;
done:
    free(x.ra);
    free(x.rb);
    free(x.tmp);
    if (rc) qmix_cmp_result_free(out);
    return rc;
}

void qmix_cmp_result_free(qmix_cmp_result *r)
{
    free(r->tensors);
    r->tensors = NULL;
    r->n_tensors = 0;
}

/* HF → MLX mixed-precision quantization, streamed (see quantize.h). */
#include "quant/quantize.h"

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "formats/config.h"
#include "formats/safetensors_write.h"
#include "kernels/kernels.h"
#include "quant/affine.h"
#include "quant/awq.h"
#include "quant/calib.h"
#include "quant/gptq_format.h"
#include "quant/imatrix.h"
#include "runtime/threadpool.h"
#include "util/err.h"
#include "util/fileio.h"

/* ---- the quantization block of config.json ------------------------------------------------ */

struct qmix_qconfig {
    json_t *q;
    int bits, group;
};

int qmix_qconfig_load(const char *config_path, qmix_qconfig **out, qmix_err *err)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_load_file(config_path, JSON_REJECT_DUPLICATES, &je);
    if (!root) return qmix_errf(err, "%s: bad JSON at line %d: %s", config_path, je.line, je.text);
    json_t *q = json_object_get(root, "quantization");
    if (!q) q = json_object_get(root, "quantization_config");
    /* GPTQ/AWQ blocks name their quant_method; MLX's never does (GPTQ: src/quant/gptq_format.h) */
    if (q && !json_object_get(root, "quantization") &&
        json_is_string(json_object_get(q, "quant_method")))
        q = NULL;
    int rc = 0;
    if (q && json_is_object(q) && (json_object_get(q, "bits") || json_object_get(q, "group_size"))) {
        const char *mode = json_string_value(json_object_get(q, "mode"));
        json_t *b = json_object_get(q, "bits"), *g = json_object_get(q, "group_size");
        int bits = json_is_integer(b) ? (int)json_integer_value(b) : 4;
        int group = json_is_integer(g) ? (int)json_integer_value(g) : 64;
        if (mode && strcmp(mode, "affine"))
            rc = qmix_errf(err, "%s: quantization mode '%s' is not supported (only affine)",
                           config_path, mode);
        else if (!qmix_affine_valid(bits, group))
            rc = qmix_errf(err, "%s: quantization defaults bits=%d group_size=%d are not valid "
                           "(bits 2,3,4,5,6,8; group 32,64,128)", config_path, bits, group);
        else if (!(*out = calloc(1, sizeof **out)))
            rc = qmix_errf(err, "out of memory");
        else {
            (*out)->q = json_incref(q);
            (*out)->bits = bits;
            (*out)->group = group;
        }
    } else if (q && !json_is_object(q)) {
        rc = qmix_errf(err, "%s: 'quantization' is not an object", config_path);
    }
    json_decref(root);
    return rc;
}

void qmix_qconfig_free(qmix_qconfig *q)
{
    if (!q) return;
    json_decref(q->q);
    free(q);
}

int qmix_qconfig_module(const qmix_qconfig *q, const char *module, int has_scales, int *bits,
                        int *group, qmix_err *err)
{
    if (!q) return has_scales ? qmix_errf(err, "module '%s' has scales but config.json has no "
                                          "quantization block", module) : 0;
    json_t *e = json_object_get(q->q, module);
    *bits = q->bits;
    *group = q->group;
    if (!e) return has_scales;
    if (json_is_boolean(e)) return json_is_true(e);
    if (!json_is_object(e))
        return qmix_errf(err, "config.json quantization entry '%s' is not an object or boolean",
                         module);
    json_t *b = json_object_get(e, "bits"), *g = json_object_get(e, "group_size");
    const char *mode = json_string_value(json_object_get(e, "mode"));
    if (mode && strcmp(mode, "affine"))
        return qmix_errf(err, "module '%s': quantization mode '%s' is not supported", module, mode);
    if (json_is_integer(b)) *bits = (int)json_integer_value(b);
    if (json_is_integer(g)) *group = (int)json_integer_value(g);
    else if (json_is_null(g)) *group = 64;
    if (!qmix_affine_valid(*bits, *group))
        return qmix_errf(err, "module '%s': bits=%d group_size=%d not valid", module, *bits,
                         *group);
    return 1;
}

static uint64_t n_elems(int ndim, const int64_t *shape)
{
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= (uint64_t)shape[d];
    return n;
}

static int module_of(const char *name, char *buf, size_t len)
{
    size_t n = strlen(name);
    if (n < 7 || strcmp(name + n - 7, ".weight") || n - 7 >= len) return -1;
    memcpy(buf, name, n - 7);
    buf[n - 7] = 0;
    return 0;
}

int qmix_store_bpw(const qmix_st_store *s, const qmix_qconfig *q, double *bpw, uint64_t *params,
                   uint64_t *bytes, qmix_err *err)
{
    uint64_t P = 0, B = 0;
    for (uint64_t i = 0; i < qmix_st_count(s); i++) {
        const qmix_tensor *t = qmix_st_at(s, i);
        B += t->nbytes;
        size_t n = strlen(t->name);
        if (n > 7 && (!strcmp(t->name + n - 7, ".scales") || !strcmp(t->name + n - 7, ".biases"))) {
            char mod[512], w[520];
            snprintf(mod, sizeof mod, "%.*s", (int)(n - 7), t->name);
            snprintf(w, sizeof w, "%s.weight", mod);
            const qmix_tensor *wt = qmix_st_find(s, w);
            if (wt && wt->dtype == QMIX_U32) continue; /* scales and biases: bytes, no params */
        }
        uint64_t e = n_elems(t->ndim, t->shape);
        char mod[512], sc[520];
        if (t->dtype == QMIX_U32 && !module_of(t->name, mod, sizeof mod)) {
            snprintf(sc, sizeof sc, "%s.scales", mod);
            int bits, group;
            int r = qmix_qconfig_module(q, mod, qmix_st_find(s, sc) != NULL, &bits, &group, err);
            if (r < 0) return -1;
            if (r) e = e * 32 / (uint64_t)bits;
        }
        P += e;
    }
    *params = P;
    *bytes = B;
    *bpw = P ? 8.0 * (double)B / (double)P : 0;
    return 0;
}

/* ---- the plan: every output tensor, known before anything is written ----------------------- */

enum { K_PLAIN, K_QWEIGHT, K_SCALES, K_BIASES };

typedef struct src_t {
    const char *name;
    qmix_dtype dtype;
    int ndim;
    int64_t shape[QMIX_MAX_DIMS];
    const void *data;
    /* an MLX-quantized source (dequantized row by row when --allow-requant) */
    int qbits, qgroup;
    const qmix_tensor *scales, *biases;
    /* per-expert HF tensors stacked into one [E, N, K] switch_mlp tensor: part e is expert e */
    const void **parts;
    struct src_t *next_owned;
} src_t;

typedef struct item {
    char name[320];
    qmix_dtype dtype;
    int ndim;
    int64_t shape[QMIX_MAX_DIMS];
    int kind;
    int one_plus;                  /* 1: store 1 + w (MLX); 2: HF norm kept as w (GPTQ), shifted
                                      only around an AWQ fold: (1 + w)·m − 1 */
    int raw;                       /* GPTQ: copied byte for byte (MTP, vision) */
    const src_t *src;
    int64_t nmat, rows, cols;      /* logical matrices, rows and cols (K) of each */
    int64_t src_row0, src_rows;    /* first row inside each source matrix, rows per matrix */
    int bits, group;
    int method;                    /* QMIX_METHOD_* from the recipe (DEFAULT: the run's) */
    /* AWQ folding (§4.2): columns × colmul, rows × rowmul, before anything else; a stride of 0
     * shares one vector between the matrices, else matrix m starts at m · stride */
    const float *colmul, *rowmul;
    int64_t colmul_stride, rowmul_stride;
    qmix_role role;
    int shard;
    uint64_t nbytes;
} item;

typedef struct plan {
    item *it;
    size_t n, cap;
} plan;

static item *plan_add(plan *p)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 256;
        item *g = realloc(p->it, cap * sizeof *g);
        if (!g) return NULL;
        p->it = g;
        p->cap = cap;
    }
    item *t = &p->it[p->n++];
    memset(t, 0, sizeof *t);
    return t;
}

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static int is_shifted_norm(const char *n)
{
    return ends_with(n, "input_layernorm.weight") || ends_with(n, "post_attention_layernorm.weight") ||
           ends_with(n, "self_attn.q_norm.weight") || ends_with(n, "self_attn.k_norm.weight") ||
           ends_with(n, "model.norm.weight");
}

/* HF name → MLX (mlx-vlm) name; returns 0 to drop. */
static int mlx_name(const char *n, int tied, char *out, size_t len)
{
    if (!strncmp(n, "mtp.", 4)) return 0;
    if (!strcmp(n, "lm_head.weight")) {
        if (tied) return 0;
        snprintf(out, len, "language_model.lm_head.weight");
    } else if (!strncmp(n, "model.language_model.", 21)) {
        snprintf(out, len, "language_model.model.%s", n + 21);
    } else if (!strncmp(n, "model.visual.", 13)) {
        snprintf(out, len, "vision_tower.%s", n + 13);
    } else if (!strncmp(n, "model.", 6)) {
        snprintf(out, len, "language_model.model.%s", n + 6);
    } else {
        snprintf(out, len, "%s", n);
    }
    return 1;
}

typedef struct pctx {
    const qmix_config *cfg;
    const qmix_recipe *recipe;
    qmix_dtype dtype;
    plan *p;
    qmix_err *err;
    const qmix_st_store *st;   /* for stacking per-expert tensors; NULL in estimates */
    src_t *owned;              /* stacked sources made here, freed with the plan */
    int gptq;                  /* planning --format gptq */
    int64_t kept16;            /* GPTQ: quantized by the recipe, kept 16-bit for vLLM */
} pctx;

static int add_module(pctx *c, const char *out_name, const src_t *s, int64_t nmat, int64_t rows,
                      int64_t cols, int64_t src_row0, int64_t src_rows, int one_plus,
                      int out_ndim, const int64_t *out_shape, qmix_dtype out_dtype);

static void free_owned(src_t *s)
{
    while (s) {
        src_t *n = s->next_owned;
        free(s->parts);
        free((void *)s->name);
        free(s);
        s = n;
    }
}

/* "…layers.L.mlp.experts.E.gate_proj.weight" (HF per-expert layout): stacks experts 0…n-1 into
 * "…layers.L.mlp.switch_mlp.gate_proj.weight" when E is 0; other experts are skipped. */
static int plan_per_expert(pctx *c, const src_t *s, const char *out)
{
    const char *e = strstr(out, "mlp.experts.");
    char *end;
    long idx = strtol(e + 12, &end, 10);
    if (end == e + 12 || *end != '.') return qmix_errf(c->err, "%s: unexpected expert tensor", s->name);
    if (idx != 0) return 0;
    if (!c->st || s->ndim != 2)
        return qmix_errf(c->err, "%s: per-expert tensors must be 2-D", s->name);
    int64_t E = c->cfg->n_experts;
    src_t *st = calloc(1, sizeof *st);
    if (!st) return qmix_errf(c->err, "out of memory");
    st->next_owned = c->owned;
    c->owned = st;
    st->parts = calloc((size_t)E, sizeof *st->parts);
    size_t prefix = (size_t)(e + 12 - out), sprefix = strstr(s->name, "mlp.experts.") + 12 - s->name;
    char *nm = malloc(strlen(s->name) + 32);
    if (!st->parts || !nm) {
        free(nm);
        return qmix_errf(c->err, "out of memory");
    }
    st->name = nm;
    st->dtype = s->dtype;
    st->ndim = 3;
    st->shape[0] = E;
    st->shape[1] = s->shape[0];
    st->shape[2] = s->shape[1];
    for (int64_t x = 0; x < E; x++) {
        sprintf(nm, "%.*s%lld%s", (int)sprefix, s->name, (long long)x, end);
        const qmix_tensor *t = qmix_st_find(c->st, nm);
        if (!t || t->dtype != s->dtype || t->ndim != 2 || t->shape[0] != s->shape[0] ||
            t->shape[1] != s->shape[1])
            return qmix_errf(c->err, "%s: missing, or its dtype/shape differs from expert 0's",
                             nm);
        st->parts[x] = t->data;
    }
    sprintf(nm, "%s", s->name);
    char name[320];
    if (snprintf(name, sizeof name, "%.*s", (int)(prefix - 12), out) >= (int)sizeof name ||
        snprintf(name + strlen(name), sizeof name - strlen(name), "mlp.switch_mlp%s", end) >=
            (int)(sizeof name - strlen(name)))
        return qmix_errf(c->err, "%s: name too long", s->name);
    int64_t shp[3] = {E, s->shape[0], s->shape[1]};
    return add_module(c, name, st, E, s->shape[0], s->shape[1], 0, s->shape[0], 0, 3, shp,
                      c->dtype);
}

/* One logical module (or plain tensor): out_name is the tensor name ending ".weight" for
 * matrices; rows/cols per matrix, nmat matrices. */
static int add_module(pctx *c, const char *out_name, const src_t *s, int64_t nmat, int64_t rows,
                      int64_t cols, int64_t src_row0, int64_t src_rows, int one_plus,
                      int out_ndim, const int64_t *out_shape, qmix_dtype out_dtype)
{
    int layer = qmix_layer_of(out_name);
    int is_full = layer >= 0 && layer < c->cfg->n_layers ? c->cfg->layer_is_full[layer] : 0;
    qmix_qdecision d = qmix_recipe_resolve(c->recipe, out_name, out_ndim, out_shape, is_full,
                                           c->cfg->n_layers);
    if (c->gptq && d.bits &&
        (d.role == QMIX_ROLE_ROUTER || d.role == QMIX_ROLE_SHARED_EXPERT_GATE ||
         d.role == QMIX_ROLE_EMBED || d.role == QMIX_ROLE_VISION)) {
        d.bits = 0; /* vLLM builds these without quantization (§2.8 item 5) */
        c->kept16++;
    }
    if (d.bits) {
        char mod[320];
        if (module_of(out_name, mod, sizeof mod)) d.bits = 0; /* not a .weight: keep */
        else {
            const char *suffix[3] = {"weight", "scales", "biases"};
            int kinds[3] = {K_QWEIGHT, K_SCALES, K_BIASES};
            for (int k = 0; k < 3; k++) {
                item *t = plan_add(c->p);
                if (!t) return qmix_errf(c->err, "out of memory");
                if (snprintf(t->name, sizeof t->name, "%s.%s", mod, suffix[k]) >= (int)sizeof t->name)
                    return qmix_errf(c->err, "%s: name too long", out_name);
                t->kind = kinds[k];
                t->dtype = k ? c->dtype : QMIX_U32;
                t->ndim = out_ndim;
                memcpy(t->shape, out_shape, sizeof(int64_t) * (size_t)out_ndim);
                t->shape[out_ndim - 1] = k ? cols / d.group : qmix_affine_row_words(cols, d.bits);
                t->src = s;
                t->nmat = nmat; t->rows = rows; t->cols = cols;
                t->src_row0 = src_row0; t->src_rows = src_rows;
                t->bits = d.bits; t->group = d.group; t->role = d.role; t->method = d.method;
                t->nbytes = n_elems(t->ndim, t->shape) * qmix_dtype_size(t->dtype);
            }
            return 0;
        }
    }
    item *t = plan_add(c->p);
    if (!t) return qmix_errf(c->err, "out of memory");
    snprintf(t->name, sizeof t->name, "%s", out_name);
    t->kind = K_PLAIN;
    t->dtype = out_dtype;
    t->ndim = out_ndim;
    memcpy(t->shape, out_shape, sizeof(int64_t) * (size_t)out_ndim);
    t->src = s;
    t->nmat = nmat; t->rows = rows; t->cols = cols;
    t->src_row0 = src_row0; t->src_rows = src_rows;
    t->one_plus = one_plus;
    t->role = d.role;
    t->nbytes = n_elems(t->ndim, t->shape) * qmix_dtype_size(t->dtype);
    return 0;
}

static int plan_source(pctx *c, const src_t *s, int hf)
{
    char out[320];
    if (c->gptq && (!strncmp(s->name, "mtp.", 4) || !strncmp(s->name, "model.visual.", 13))) {
        /* GPTQ keeps the MTP block and the vision tower as the source has them (§2.6) */
        item *t = plan_add(c->p);
        if (!t) return qmix_errf(c->err, "out of memory");
        if (snprintf(t->name, sizeof t->name, "%s", s->name) >= (int)sizeof t->name)
            return qmix_errf(c->err, "%s: name too long", s->name);
        t->kind = K_PLAIN;
        t->raw = 1;
        t->dtype = s->dtype;
        t->ndim = s->ndim;
        memcpy(t->shape, s->shape, sizeof t->shape);
        t->src = s;
        t->role = qmix_role_of(s->name);
        t->nbytes = n_elems(s->ndim, s->shape) * qmix_dtype_size(s->dtype);
        return 0;
    }
    if (hf) {
        if (!mlx_name(s->name, c->cfg->tie_embeddings, out, sizeof out)) return 0;
    } else {
        if (!strncmp(s->name, "mtp.", 4)) return 0;
        snprintf(out, sizeof out, "%s", s->name);
        size_t n = strlen(out);
        if (s->qbits && (ends_with(out, ".scales") || ends_with(out, ".biases"))) return 0;
        (void)n;
    }
    int64_t K = s->ndim ? s->shape[s->ndim - 1] : 1;
    if (s->qbits) K = K * 32 / s->qbits;
    if (hf && ends_with(out, "mlp.experts.gate_up_proj") && s->ndim == 3) {
        int64_t E = s->shape[0], I2 = s->shape[1], I = I2 / 2;
        char base[320];
        snprintf(base, sizeof base, "%.*s", (int)(strlen(out) - strlen("experts.gate_up_proj")),
                 out);
        int64_t shp[3] = {E, I, K};
        if (snprintf(out, sizeof out, "%sswitch_mlp.gate_proj.weight", base) >= (int)sizeof out)
            return qmix_errf(c->err, "%s: name too long", s->name);
        if (add_module(c, out, s, E, I, K, 0, I2, 0, 3, shp, c->dtype)) return -1;
        if (snprintf(out, sizeof out, "%sswitch_mlp.up_proj.weight", base) >= (int)sizeof out)
            return qmix_errf(c->err, "%s: name too long", s->name);
        return add_module(c, out, s, E, I, K, I, I2, 0, 3, shp, c->dtype);
    }
    if (hf && ends_with(out, "mlp.experts.down_proj") && s->ndim == 3) {
        char base[320];
        snprintf(base, sizeof base, "%.*s", (int)(strlen(out) - strlen("experts.down_proj")), out);
        if (snprintf(out, sizeof out, "%sswitch_mlp.down_proj.weight", base) >= (int)sizeof out)
            return qmix_errf(c->err, "%s: name too long", s->name);
        int64_t shp[3] = {s->shape[0], s->shape[1], K};
        return add_module(c, out, s, s->shape[0], s->shape[1], K, 0, s->shape[1], 0, 3, shp,
                          c->dtype);
    }
    if (hf && strstr(out, "mlp.experts.") && qmix_layer_of(out) >= 0)
        return plan_per_expert(c, s, out);
    int64_t shp[QMIX_MAX_DIMS];
    int nd = s->ndim;
    memcpy(shp, s->shape, sizeof(int64_t) * (size_t)nd);
    if (nd) shp[nd - 1] = K;
    if (hf && ends_with(out, "conv1d.weight") && nd == 3 && shp[1] == 1) {
        shp[1] = shp[2]; /* [C, 1, K] → [C, K, 1]: the same bytes */
        shp[2] = 1;
    }
    int64_t rows = nd > 1 ? (int64_t)(n_elems(nd, s->shape) / (uint64_t)s->shape[nd - 1]) : 1;
    qmix_dtype odt = c->dtype;
    if (ends_with(out, "A_log")) odt = QMIX_F32;
    int one_plus = hf && is_shifted_norm(out) ? (c->gptq ? 2 : 1) : 0;
    if (hf && ends_with(out, "conv1d.weight")) return add_module(c, out, s, 1, rows, K, 0, rows, 0,
                                                                  nd, shp, odt);
    if (nd == 3 && !strstr(out, "switch_mlp"))
        return add_module(c, out, s, 1, rows, K, 0, rows, one_plus, nd, shp, odt);
    if (nd == 3) return add_module(c, out, s, shp[0], shp[1], K, 0, shp[1], 0, 3, shp, odt);
    return add_module(c, out, s, 1, rows, K, 0, rows, one_plus, nd, shp, odt);
}

static void stats_of(const plan *p, qmix_quant_report *rep)
{
    for (size_t i = 0; i < p->n; i++) {
        const item *t = &p->it[i];
        qmix_quant_role_stat *r = &rep->roles[t->role];
        uint64_t params = 0;
        if (t->kind == K_QWEIGHT) {
            params = (uint64_t)t->nmat * (uint64_t)t->rows * (uint64_t)t->cols;
            r->bits_mask |= 1u << t->bits;
            r->tensors++;
        } else if (t->kind == K_PLAIN) {
            params = n_elems(t->ndim, t->shape);
            r->bits_mask |= 1u << 16;
            r->tensors++;
        }
        r->params += params;
        r->bytes += t->nbytes;
        rep->params += params;
        rep->bytes += t->nbytes;
    }
    rep->bpw = rep->params ? 8.0 * (double)rep->bytes / (double)rep->params : 0;
    rep->n_tensors = (int)p->n;
}

/* Defaults of the quantization block: the recipe's last all-roles quantizing rule, else the most
 * common (by parameters) bits/group of the plan, else 4/64. */
static void choose_defaults(const qmix_recipe *r, const plan *p, int *bits, int *group)
{
    *bits = 0;
    for (int i = 0; i < r->n_rules; i++)
        if (r->rules[i].roles == (1u << QMIX_ROLE_COUNT) - 1 && r->rules[i].lo < 0 &&
            !r->rules[i].first && !r->rules[i].last && !r->rules[i].type && !r->rules[i].match[0]) {
            *bits = r->rules[i].bits;
            *group = r->rules[i].group;
        }
    if (*bits) return;
    uint64_t best = 0;
    *bits = 4;
    *group = 64;
    for (size_t i = 0; i < p->n; i++) {
        if (p->it[i].kind != K_QWEIGHT) continue;
        uint64_t n = 0;
        for (size_t j = 0; j < p->n; j++)
            if (p->it[j].kind == K_QWEIGHT && p->it[j].bits == p->it[i].bits &&
                p->it[j].group == p->it[i].group)
                n += (uint64_t)p->it[j].nmat * (uint64_t)p->it[j].rows * (uint64_t)p->it[j].cols;
        if (n > best) {
            best = n;
            *bits = p->it[i].bits;
            *group = p->it[i].group;
        }
    }
}

/* ---- estimate from a config ---------------------------------------------------------------- */

int qmix_quant_estimate(const qmix_config *cfg, const qmix_recipe *r, qmix_quant_report *rep,
                        qmix_err *err)
{
    memset(rep, 0, sizeof *rep);
    int64_t D = cfg->hidden_size, V = cfg->vocab_size;
    int64_t C = 2 * (int64_t)cfg->lin_n_k_heads * cfg->lin_k_head_dim +
                (int64_t)cfg->lin_n_v_heads * cfg->lin_v_head_dim;
    int64_t nv = cfg->lin_n_v_heads, dv = cfg->lin_v_head_dim;
    int64_t H = cfg->n_heads, KV = cfg->n_kv_heads, hd = cfg->head_dim;
    int64_t E = cfg->n_experts, F = cfg->moe_ffn, Fs = cfg->shared_ffn;
    size_t cap = 4 + (size_t)cfg->n_layers * 24;
    src_t *srcs = calloc(cap, sizeof *srcs);
    char (*names)[160] = calloc(cap, sizeof *names);
    plan p = {0};
    int rc = -1;
    if (!srcs || !names) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    size_t n = 0;
#define ADD(ND, ...)                                                                            \
    do {                                                                                        \
        int64_t sh_[] = {__VA_ARGS__};                                                          \
        srcs[n].name = names[n];                                                                \
        srcs[n].dtype = QMIX_BF16;                                                              \
        srcs[n].ndim = ND;                                                                      \
        memcpy(srcs[n].shape, sh_, sizeof sh_);                                                 \
        n++;                                                                                    \
    } while (0)
#define NAME(...) snprintf(names[n], sizeof names[n], __VA_ARGS__)
    NAME("model.language_model.embed_tokens.weight"); ADD(2, V, D);
    NAME("model.language_model.norm.weight"); ADD(1, D);
    if (!cfg->tie_embeddings) { NAME("lm_head.weight"); ADD(2, V, D); }
    for (int i = 0; i < cfg->n_layers; i++) {
        const char *pf = "model.language_model.layers";
        NAME("%s.%d.input_layernorm.weight", pf, i); ADD(1, D);
        NAME("%s.%d.post_attention_layernorm.weight", pf, i); ADD(1, D);
        if (cfg->layer_is_full[i]) {
            NAME("%s.%d.self_attn.q_proj.weight", pf, i); ADD(2, 2 * H * hd, D);
            NAME("%s.%d.self_attn.k_proj.weight", pf, i); ADD(2, KV * hd, D);
            NAME("%s.%d.self_attn.v_proj.weight", pf, i); ADD(2, KV * hd, D);
            NAME("%s.%d.self_attn.o_proj.weight", pf, i); ADD(2, D, H * hd);
            NAME("%s.%d.self_attn.q_norm.weight", pf, i); ADD(1, hd);
            NAME("%s.%d.self_attn.k_norm.weight", pf, i); ADD(1, hd);
        } else {
            NAME("%s.%d.linear_attn.in_proj_qkv.weight", pf, i); ADD(2, C, D);
            NAME("%s.%d.linear_attn.in_proj_z.weight", pf, i); ADD(2, nv * dv, D);
            NAME("%s.%d.linear_attn.in_proj_a.weight", pf, i); ADD(2, nv, D);
            NAME("%s.%d.linear_attn.in_proj_b.weight", pf, i); ADD(2, nv, D);
            NAME("%s.%d.linear_attn.out_proj.weight", pf, i); ADD(2, D, nv * dv);
            NAME("%s.%d.linear_attn.conv1d.weight", pf, i); ADD(3, C, 1, cfg->conv_kernel);
            NAME("%s.%d.linear_attn.A_log", pf, i); ADD(1, nv);
            NAME("%s.%d.linear_attn.dt_bias", pf, i); ADD(1, nv);
            NAME("%s.%d.linear_attn.norm.weight", pf, i); ADD(1, dv);
        }
        NAME("%s.%d.mlp.gate.weight", pf, i); ADD(2, E, D);
        NAME("%s.%d.mlp.shared_expert_gate.weight", pf, i); ADD(2, 1, D);
        NAME("%s.%d.mlp.shared_expert.gate_proj.weight", pf, i); ADD(2, Fs, D);
        NAME("%s.%d.mlp.shared_expert.up_proj.weight", pf, i); ADD(2, Fs, D);
        NAME("%s.%d.mlp.shared_expert.down_proj.weight", pf, i); ADD(2, D, Fs);
        NAME("%s.%d.mlp.experts.gate_up_proj", pf, i); ADD(3, E, 2 * F, D);
        NAME("%s.%d.mlp.experts.down_proj", pf, i); ADD(3, E, D, F);
    }
#undef ADD
#undef NAME
    pctx c = {.cfg = cfg, .recipe = r, .dtype = QMIX_BF16, .p = &p, .err = err};
    for (size_t i = 0; i < n; i++)
        if (plan_source(&c, &srcs[i], 1)) goto done;
    stats_of(&p, rep);
    choose_defaults(r, &p, &rep->default_bits, &rep->default_group);
    rc = 0;
done:
    free(p.it);
    free(srcs);
    free(names);
    return rc;
}

/* ---- writing ------------------------------------------------------------------------------- */

static char *path_join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s/%s", a, b);
    return s;
}


/* Rows are converted in chunks of up to CHUNK_ELEMS elements, one row per pool task, then the
 * chunk is written in order: memory is a chunk plus the module's scales and biases. */
#define CHUNK_ELEMS ((size_t)1 << 21)

typedef struct wctx {
    const qmix_quant_opts *o;
    qmix_err *err;
    qmix_pool *pool;
    int n_threads;
    float *rows;           /* [n_threads][max cols] source rows, float32 */
    float *scr;            /* [n_threads][2 · max cols] scales, biases of one row */
    size_t max_cols;
    uint8_t *chunk;        /* CHUNK_ELEMS · 4 bytes of output rows */
    uint16_t *sbuf, *bbuf; /* the current module's scales and biases in the output dtype */
    size_t sbuf_cap;
    uint64_t done_bytes, total_bytes;
    double t0, last;
    /* the current chunk */
    const item *t;
    int64_t g0;
    /* calibrated methods: how the current matrix's rows are quantized */
    const qmix_config *cfg;
    qmix_quant_report *rep;
    int mode;              /* 0 RTN, 1 GPTQ (prep), 2 importance-weighted (imp) */
    qmix_gptq_prep prep;
    float *imp;            /* [max cols] */
    float *gwork;          /* [n_threads][2 · max cols + 128]: GPTQ / search scratch */
    float **awq_bufs;      /* AWQ scale vectors the items point at */
    int n_awq_bufs;
    qmix_dtype sdt;        /* scales/biases: the output dtype (MLX), F16 (GPTQ) */
    int grid;              /* QMIX_GRID_*: SYM when writing GPTQ */
    uint32_t *qout;        /* GPTQ: quantized rows go here (a whole matrix) instead of chunk */
} wctx;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void progress(wctx *w, int final)
{
    if (!w->o->progress) return;
    double t = now_s();
    if (!final && t - w->last < 0.5) return;
    w->last = t;
    double f = w->total_bytes ? (double)w->done_bytes / (double)w->total_bytes : 1;
    double el = t - w->t0, eta = f > 0 ? el / f - el : 0;
    fprintf(stderr, "\rquantize: %5.1f%%  %.0f MiB of %.0f MiB  %.1f s elapsed, ETA %.1f s   %s",
            100 * f, (double)w->done_bytes / 1048576.0, (double)w->total_bytes / 1048576.0, el,
            eta, final ? "\n" : "");
}

static uint16_t to16(float f, qmix_dtype dt) { return dt == QMIX_F16 ? qk_f32_to_f16(f) : qk_f32_to_bf16(f); }

/* Row r of logical matrix m of t's source, as float32 into row[cols]. */
static void source_row(float *row, const item *t, int64_t m, int64_t r)
{
    const src_t *s = t->src;
    int64_t srow = m * t->src_rows + t->src_row0 + r;
    if (s->qbits) {
        int64_t words = qmix_affine_row_words(t->cols, s->qbits);
        int64_t ng = t->cols / s->qgroup;
        size_t ssz = qmix_dtype_size(s->scales->dtype);
        qmix_affine_dequantize_row((const uint32_t *)s->data + srow * words,
                                   (const uint8_t *)s->scales->data + (size_t)(srow * ng) * ssz,
                                   (const uint8_t *)s->biases->data + (size_t)(srow * ng) * ssz,
                                   s->scales->dtype, t->cols, s->qbits, s->qgroup, row);
        return;
    }
    size_t esz = qmix_dtype_size(s->dtype);
    const void *base = s->data;
    if (s->parts) {
        base = s->parts[m];
        srow = r;
    }
    qk_mat v = {.dtype = s->dtype, .rows = 1, .cols = t->cols, .row_bytes = (size_t)t->cols * esz,
                .data = (const uint8_t *)base + (size_t)srow * (size_t)t->cols * esz};
    qk_mat_row_f32(&v, 0, row);
}

static void row_task(void *ctx, int task, int thread)
{
    wctx *w = ctx;
    const item *t = w->t;
    int64_t g = w->g0 + task, m = g / t->rows, r = g % t->rows;
    float *row = w->rows + (size_t)thread * w->max_cols;
    source_row(row, t, m, r);
    int shift = t->one_plus == 1 || (t->one_plus == 2 && t->colmul);
    if (shift)
        for (int64_t i = 0; i < t->cols; i++) row[i] += 1.0f;
    if (t->colmul) {
        const float *cm = t->colmul + m * t->colmul_stride;
        for (int64_t i = 0; i < t->cols; i++) row[i] *= cm[i];
    }
    if (shift && t->one_plus == 2)
        for (int64_t i = 0; i < t->cols; i++) row[i] -= 1.0f;
    if (t->rowmul) {
        float f = t->rowmul[m * t->rowmul_stride + r];
        for (int64_t i = 0; i < t->cols; i++) row[i] *= f;
    }
    if (t->kind == K_QWEIGHT) {
        int64_t words = qmix_affine_row_words(t->cols, t->bits);
        size_t ng = (size_t)(t->cols / t->group);
        float *sc = w->scr + (size_t)thread * 2 * w->max_cols, *bi = sc + w->max_cols;
        uint32_t *out = (w->qout ? w->qout : (uint32_t *)w->chunk) + (size_t)task * (size_t)words;
        float *gw = w->gwork ? w->gwork + (size_t)thread * (2 * w->max_cols + 128) : NULL;
        if (w->mode == 1)
            qmix_gptq_quantize_row(&w->prep, row, t->bits, w->sdt, gw, out, sc, bi);
        else if (w->mode == 2 && w->grid == QMIX_GRID_SYM)
            qmix_sym_quantize_row(row, w->imp, t->cols, t->bits, t->group, w->sdt, 1, out, sc, bi);
        else if (w->mode == 2)
            qmix_wrtn_quantize_row(row, w->imp, t->cols, t->bits, t->group, w->sdt, gw, out,
                                   sc, bi);
        else if (w->grid == QMIX_GRID_SYM)
            qmix_sym_quantize_row(row, NULL, t->cols, t->bits, t->group, w->sdt, 0, out, sc, bi);
        else
            qmix_affine_quantize_row(row, t->cols, t->bits, t->group, out, sc, bi);
        for (size_t k = 0; k < ng; k++) {
            w->sbuf[(size_t)g * ng + k] = to16(sc[k], w->sdt);
            w->bbuf[(size_t)g * ng + k] = to16(bi[k], w->sdt);
        }
        return;
    }
    if (t->dtype == QMIX_F32) {
        memcpy((float *)w->chunk + (size_t)task * (size_t)t->cols, row, (size_t)t->cols * 4);
    } else {
        uint16_t *o = (uint16_t *)w->chunk + (size_t)task * (size_t)t->cols;
        for (int64_t i = 0; i < t->cols; i++) o[i] = to16(row[i], t->dtype);
    }
}

/* Gives back the page cache pages of a source tensor once read: a file-backed read-only mapping,
 * so they are simply re-read if touched again. Keeps RSS at a chunk, not at the model. */
static void release_source(const src_t *s, uint64_t nbytes)
{
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0 || !s->data) return;
    uintptr_t a = (uintptr_t)s->data & ~(uintptr_t)(pg - 1);
    uintptr_t e = (uintptr_t)s->data + nbytes;
    madvise((void *)a, e - a, MADV_DONTNEED);
}

static int item_method(const wctx *w, const item *t)
{
    return t->kind != K_QWEIGHT ? QMIX_METHOD_RTN : t->method ? t->method
           : w->o->method ? w->o->method : QMIX_METHOD_RTN;
}

/* Sets w->mode (and the GPTQ factor or the importance) for matrix m of t, from --calib or
 * --imatrix; falls back to RTN (counted) where the statistics cannot support the method. */
static int prepare_matrix(wctx *w, const item *t, int64_t m)
{
    const qmix_quant_opts *o = w->o;
    int method = item_method(w, t);
    qmix_gptq_prep_free(&w->prep);
    w->mode = 0;
    if (method == QMIX_METHOD_RTN) return 0;
    if (method == QMIX_METHOD_AWQ) { /* scaled columns (row_task), then MLX's rule */
        w->rep->n_awq++;
        return 0;
    }
    int layer, kind;
    const qmix_calib_entry *e = NULL;
    if (qmix_calib_input_of(t->name, &layer, &kind) && o->calib)
        e = qmix_calib_get(o->calib, layer, kind, qmix_calib_kind_per_expert(kind) ? (int)m : -1);
    if (e && e->k != t->cols)
        return qmix_errf(w->err, "%s: the statistics have %lld input channels, the matrix %lld "
                         "(calibrated on another model?)", t->name, (long long)e->k,
                         (long long)t->cols);
    if (method == QMIX_METHOD_GPTQ) {
        if (!e || !e->xtx) {
            w->rep->fb_nostats++;
            return 0;
        }
        if (e->n == 0 || (int64_t)e->n < w->rep->min_tokens) {
            w->rep->fb_tokens++;
            return 0;
        }
        qmix_gptq_opts go = o->gptq;
        go.grid = w->grid;
        go.pool = w->pool; /* called between row jobs: the pool is idle */
        int r = qmix_gptq_prepare(e->xtx, NULL, t->cols, t->group, &go, &w->prep, w->err);
        if (r < 0) return qmix_err_prefix(w->err, "%s matrix %lld", t->name, (long long)m);
        if (r > 0) {
            w->rep->fb_cholesky++;
            return 0;
        }
        w->rep->n_gptq++;
        w->mode = 1;
        return 0;
    }
    /* importance-weighted RTN: E[x²] from the statistics, else from the imatrix file */
    if (e && e->n > 0) {
        for (int64_t j = 0; j < t->cols; j++) w->imp[j] = (float)(e->sumsq[j] / (double)e->n);
    } else if (e) {
        for (int64_t j = 0; j < t->cols; j++) w->imp[j] = 1.0f; /* never routed: no preference */
    } else {
        int64_t cnt;
        int r = o->imatrix ? qmix_imatrix_lookup(o->imatrix, t->name, m, t->cols, w->cfg, w->imp,
                                                 &cnt, w->err)
                           : 0;
        if (r < 0) return -1;
        if (!r) {
            w->rep->fb_nostats++;
            return 0;
        }
    }
    w->rep->n_imatrix++;
    w->mode = 2;
    return 0;
}

static int write_item(wctx *w, qmix_stw *f, const item *t)
{
    qmix_err *err = w->err;
    if (qmix_stw_begin(f, t->name, err)) return -1;
    if (t->kind == K_SCALES || t->kind == K_BIASES) {
        const uint16_t *b = t->kind == K_SCALES ? w->sbuf : w->bbuf;
        return qmix_stw_write(f, b, t->nbytes, err);
    }
    int64_t total = t->nmat * t->rows;
    size_t row_out;
    if (t->kind == K_QWEIGHT) {
        size_t ng = (size_t)(t->cols / t->group);
        size_t need = (size_t)total * ng;
        if (need > w->sbuf_cap) {
            uint16_t *a = realloc(w->sbuf, need * 2);
            if (a) w->sbuf = a;
            uint16_t *b = a ? realloc(w->bbuf, need * 2) : NULL;
            if (b) w->bbuf = b;
            if (!a || !b) return qmix_errf(err, "out of memory");
            w->sbuf_cap = need;
        }
        row_out = (size_t)qmix_affine_row_words(t->cols, t->bits) * 4;
    } else {
        row_out = (size_t)t->cols * qmix_dtype_size(t->dtype);
    }
    int64_t per_chunk = (int64_t)(CHUNK_ELEMS / (size_t)t->cols);
    if (per_chunk < 1) per_chunk = 1;
    size_t esz_src = t->src->qbits ? 0 : qmix_dtype_size(t->src->dtype);
    w->t = t;
    /* calibrated methods: chunks stay inside one matrix, whose statistics are set up first */
    int calibrated = item_method(w, t) != QMIX_METHOD_RTN;
    w->mode = 0;
    for (int64_t g0 = 0, n; g0 < total; g0 += n) {
        n = total - g0 < per_chunk ? total - g0 : per_chunk;
        if (calibrated) {
            if (t->rows - g0 % t->rows < n) n = t->rows - g0 % t->rows;
            if (g0 % t->rows == 0 && prepare_matrix(w, t, g0 / t->rows)) return -1;
        }
        w->g0 = g0;
        qmix_pool_run(w->pool, row_task, w, (int)n);
        if (qmix_stw_write(f, w->chunk, (size_t)n * row_out, err)) return -1;
        w->done_bytes += (uint64_t)n * (uint64_t)t->cols * esz_src;
        if (esz_src && !t->src->parts) { /* give back the source rows just read (re-faulted from the page cache
                        * if a later item, like up_proj after gate_proj, needs them) */
            int64_t a = g0, b = g0 + n - 1;
            int64_t sa = (a / t->rows) * t->src_rows + t->src_row0 + a % t->rows;
            int64_t sb = (b / t->rows) * t->src_rows + t->src_row0 + b % t->rows;
            src_t part = *t->src;
            part.data = (const uint8_t *)t->src->data + (size_t)sa * (size_t)t->cols * esz_src;
            release_source(&part, (uint64_t)(sb - sa + 1) * (uint64_t)t->cols * esz_src);
        }
        progress(w, 0);
    }
    qmix_gptq_prep_free(&w->prep);
    w->mode = 0;
    return 0;
}

static int is_mlx_input(const qmix_st_store *s)
{
    if (qmix_st_find(s, "language_model.model.embed_tokens.weight")) return 1;
    for (uint64_t i = 0; i < qmix_st_count(s); i++)
        if (strstr(qmix_st_at(s, i)->name, "switch_mlp.")) return 1;
    return 0;
}

static int dir_nonempty(const char *d)
{
    DIR *dp = opendir(d);
    if (!dp) return 0;
    struct dirent *e;
    int n = 0;
    while ((e = readdir(dp)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(dp);
    return n > 0;
}

static int write_config(const char *in_dir, const char *out_dir, const plan *p, int dbits,
                        int dgroup, qmix_err *err)
{
    char *src = path_join(in_dir, "config.json"), *dst = path_join(out_dir, "config.json");
    int rc = -1;
    json_error_t je;
    json_t *root = src ? json_load_file(src, JSON_REJECT_DUPLICATES, &je) : NULL;
    if (!root || !json_is_object(root)) {
        qmix_errf(err, "%s: cannot read config.json", in_dir);
        goto out;
    }
    json_object_del(root, "quantization");
    json_object_del(root, "quantization_config");
    json_t *q = json_object();
    json_object_set_new(q, "group_size", json_integer(dgroup));
    json_object_set_new(q, "bits", json_integer(dbits));
    json_object_set_new(q, "mode", json_string("affine"));
    for (size_t i = 0; i < p->n; i++) {
        const item *t = &p->it[i];
        if (t->kind != K_QWEIGHT || (t->bits == dbits && t->group == dgroup)) continue;
        char mod[320];
        module_of(t->name, mod, sizeof mod);
        json_t *e = json_object();
        json_object_set_new(e, "group_size", json_integer(t->group));
        json_object_set_new(e, "bits", json_integer(t->bits));
        json_object_set_new(q, mod, e);
    }
    json_object_set_new(root, "quantization_config", json_deep_copy(q));
    json_object_set_new(root, "quantization", q);
    if (!qmix_write_json(dst, root, JSON_INDENT(4) | JSON_SORT_KEYS, err)) rc = 0;
out:
    json_decref(root);
    free(src);
    free(dst);
    return rc;
}

/* ---- AWQ: one scale vector per fold group, searched on the statistics, folded (§4.1-4.2) ---- */

/* E[x²] per input channel of matrix m of t (calibration statistics, else the imatrix): 1 found
 * (*rows: rows behind it, 0 unknown), 0 none, -1 error. */
static int importance_of(wctx *w, const item *t, int64_t m, float *out, uint64_t *rows)
{
    int layer, kind;
    *rows = 0;
    if (!qmix_calib_input_of(t->name, &layer, &kind)) return 0;
    if (w->o->calib) {
        const qmix_calib_entry *e = qmix_calib_get(w->o->calib, layer, kind,
                                                   qmix_calib_kind_per_expert(kind) ? (int)m : -1);
        if (!e || e->k != t->cols || !e->n) return 0;
        for (int64_t j = 0; j < t->cols; j++) out[j] = (float)(e->sumsq[j] / (double)e->n);
        *rows = e->n;
        return 1;
    }
    if (!w->o->imatrix) return 0;
    int64_t cnt;
    int r = qmix_imatrix_lookup(w->o->imatrix, t->name, m, t->cols, w->cfg, out, &cnt, w->err);
    if (r > 0 && cnt > 0) *rows = (uint64_t)cnt;
    return r;
}

static float *awq_buf(wctx *w, size_t n)
{
    float **b = realloc(w->awq_bufs, (size_t)(w->n_awq_bufs + 1) * sizeof *b);
    if (!b) return NULL;
    w->awq_bufs = b;
    float *v = malloc(n * sizeof *v);
    if (v) w->awq_bufs[w->n_awq_bufs++] = v;
    return v;
}

/* The best of the α grid for the quantized consumers cons[] (matrix only_m, or all when < 0)
 * of an activation with RMS act[k] → s[k]. Each consumer matrix's error is weighted by the share
 * of calibration rows behind it (routed experts see a fraction of the tokens). */
static int awq_search(wctx *w, const plan *p, const size_t *cons, int nc, int64_t only_m,
                      const float *act, int64_t k, float *s)
{
    float *tab = malloc((size_t)QMIX_AWQ_GRID * (size_t)k * sizeof *tab);
    float *c = malloc((size_t)k * sizeof *c);
    float *scr = malloc((size_t)qmix_awq_scratch(k) * sizeof *scr);
    double loss[QMIX_AWQ_GRID] = {0};
    int rc = -1;
    if (!tab || !c || !scr) {
        qmix_errf(w->err, "out of memory");
        goto out;
    }
    for (int a = 0; a < QMIX_AWQ_GRID; a++)
        qmix_awq_scales(act, k, (double)a / QMIX_AWQ_GRID, tab + (int64_t)a * k);
    double total = w->o->calib ? (double)qmix_calib_tokens(w->o->calib) : 0;
    for (int i = 0; i < nc; i++) {
        const item *t = &p->it[cons[i]];
        if (t->kind != K_QWEIGHT) continue;
        for (int64_t m = only_m < 0 ? 0 : only_m; m < (only_m < 0 ? t->nmat : only_m + 1); m++) {
            uint64_t rows;
            int r = importance_of(w, t, m, c, &rows);
            if (r < 0) goto out;
            double weight = r && rows && total > 0 ? (double)rows / total : 1.0;
            /* the diagonal score of §4.4: with the full Hessian (dᵀHd) it cost K² per row and
             * candidate and chose no better scales on the demo model */
            for (int64_t row = 0; row < t->rows; row++) {
                source_row(w->rows, t, m, row);
                qmix_awq_row_loss(w->rows, r ? c : NULL, weight, k, tab, t->bits, t->group, scr,
                                  loss);
            }
        }
    }
    int best = 0;
    for (int a = 1; a < QMIX_AWQ_GRID; a++)
        if (loss[a] < loss[best]) best = a;
    memcpy(s, tab + (int64_t)best * k, (size_t)k * sizeof *s);
    rc = 0;
out:
    free(tab);
    free(c);
    free(scr);
    return rc;
}

/* Fold groups per layer (§4.2): input_layernorm → q/k/v or in_proj_*; post_attention_layernorm →
 * router, shared_expert_gate, shared gate/up, every expert's gate/up; each expert's up_proj rows →
 * its down_proj; the shared expert's up rows → its down. A group is folded only when every
 * quantized consumer asks for awq (scaling the others' inputs would invalidate their Hessians or
 * importance); o_proj and out_proj have no foldable producer (§4.2) and get plain RTN. */
static int awq_prepass(wctx *w, plan *p)
{
    int any = 0;
    for (size_t i = 0; i < p->n; i++) any |= p->it[i].kind == K_QWEIGHT &&
                                             item_method(w, &p->it[i]) == QMIX_METHOD_AWQ;
    if (!any) return 0;
    size_t *g1 = malloc(p->n * sizeof *g1), *g2 = malloc(p->n * sizeof *g2);
    float *act = malloc(w->max_cols * sizeof *act);
    int rc = -1;
    if (!g1 || !g2 || !act) {
        qmix_errf(w->err, "out of memory");
        goto out;
    }
    for (int L = 0; L < w->cfg->n_layers; L++) {
        int n1 = 0, n2 = 0;
        item *norm1 = NULL, *norm2 = NULL, *sh_up = NULL, *sh_down = NULL, *ex_up = NULL,
             *ex_down = NULL;
        for (size_t i = 0; i < p->n; i++) {
            item *t = &p->it[i];
            if (qmix_layer_of(t->name) != L || (t->kind != K_QWEIGHT && t->kind != K_PLAIN)) continue;
            if (ends_with(t->name, "input_layernorm.weight")) norm1 = t;
            else if (ends_with(t->name, "post_attention_layernorm.weight")) norm2 = t;
            int layer, kind;
            if (!qmix_calib_input_of(t->name, &layer, &kind) || t->ndim < 2) continue;
            if (kind == QMIX_CIN_ATTN) g1[n1++] = i;
            if (kind == QMIX_CIN_FFN || kind == QMIX_CIN_EXPERT) g2[n2++] = i;
            if (strstr(t->name, "shared_expert.up_proj")) sh_up = t;
            if (kind == QMIX_CIN_SHARED_DOWN) sh_down = t;
            if (kind == QMIX_CIN_EXPERT && strstr(t->name, "up_proj")) ex_up = t;
            if (kind == QMIX_CIN_EXPERT_DOWN) ex_down = t;
        }
        /* the norm groups */
        struct { size_t *g; int n; item *norm; } ng[2] = {{g1, n1, norm1}, {g2, n2, norm2}};
        for (int q = 0; q < 2; q++) {
            int quant = 0, awq = 0, found = 0;
            for (int i = 0; i < ng[q].n; i++) {
                const item *t = &p->it[ng[q].g[i]];
                if (t->kind != K_QWEIGHT) continue;
                quant++;
                awq += item_method(w, t) == QMIX_METHOD_AWQ;
            }
            if (!awq) continue;
            if (awq < quant || !ng[q].norm) {
                w->rep->awq_unfolded++;
                continue;
            }
            /* the all-token statistic: the first consumer that is not a routed expert */
            int64_t k = p->it[ng[q].g[0]].cols;
            for (int i = 0; i < ng[q].n && !found; i++) {
                const item *t = &p->it[ng[q].g[i]];
                int layer, kind;
                uint64_t rows;
                qmix_calib_input_of(t->name, &layer, &kind);
                if (qmix_calib_kind_per_expert(kind)) continue;
                int r = importance_of(w, t, 0, act, &rows);
                if (r < 0) goto out;
                found = r;
            }
            if (!found || ng[q].norm->cols != k) {
                w->rep->awq_unfolded++;
                continue;
            }
            for (int64_t j = 0; j < k; j++) act[j] = sqrtf(act[j]);
            float *sv = awq_buf(w, (size_t)k), *inv = awq_buf(w, (size_t)k);
            if (!sv || !inv) {
                qmix_errf(w->err, "out of memory");
                goto out;
            }
            if (awq_search(w, p, ng[q].g, ng[q].n, -1, act, k, sv)) goto out;
            for (int64_t j = 0; j < k; j++) inv[j] = 1.0f / sv[j];
            for (int i = 0; i < ng[q].n; i++) {
                item *t = &p->it[ng[q].g[i]];
                t->colmul = sv;
                t->colmul_stride = 0;
            }
            ng[q].norm->colmul = inv;
            ng[q].norm->colmul_stride = 0;
            w->rep->awq_folds++;
        }
        /* up rows → down columns: per expert, and the shared expert */
        struct { item *up, *down; } ud[2] = {{ex_up, ex_down}, {sh_up, sh_down}};
        for (int q = 0; q < 2; q++) {
            item *up = ud[q].up, *down = ud[q].down;
            if (!up || !down || down->kind != K_QWEIGHT) continue;
            if (item_method(w, down) != QMIX_METHOD_AWQ) continue;
            if (up->nmat != down->nmat || up->rows != down->cols) {
                w->rep->awq_unfolded++;
                continue;
            }
            int64_t k = down->cols, E = down->nmat;
            float *sv = awq_buf(w, (size_t)(E * k)), *inv = awq_buf(w, (size_t)(E * k));
            if (!sv || !inv) {
                qmix_errf(w->err, "out of memory");
                goto out;
            }
            for (int64_t m = 0; m < E; m++) {
                uint64_t rows;
                size_t di = (size_t)(down - p->it);
                int r = importance_of(w, down, m, act, &rows);
                if (r < 0) goto out;
                if (!r || (w->o->calib && (int64_t)rows < w->rep->min_tokens)) {
                    for (int64_t j = 0; j < k; j++) sv[m * k + j] = 1.0f; /* too little data */
                } else {
                    for (int64_t j = 0; j < k; j++) act[j] = sqrtf(act[j]);
                    if (awq_search(w, p, &di, 1, m, act, k, sv + m * k)) goto out;
                    w->rep->awq_folds++;
                }
                for (int64_t j = 0; j < k; j++) inv[m * k + j] = 1.0f / sv[m * k + j];
            }
            down->colmul = sv;
            down->colmul_stride = E > 1 ? k : 0;
            up->rowmul = inv;
            up->rowmul_stride = E > 1 ? k : 0;
        }
    }
    rc = 0;
out:
    free(g1);
    free(g2);
    free(act);
    return rc;
}

/* Every tensor a calibrated method is asked for has the inputs it needs: GPTQ a --calib file
 * with Hessians, the importance-weighted method --calib or --imatrix. Also fixes the failsafe
 * threshold. */
static int check_method_inputs(wctx *w, const plan *p)
{
    const qmix_quant_opts *o = w->o;
    int need_h = 0, need_imp = 0;
    for (size_t i = 0; i < p->n; i++) {
        int m = item_method(w, &p->it[i]);
        need_h |= m == QMIX_METHOD_GPTQ;
        need_imp |= m == QMIX_METHOD_IMATRIX || m == QMIX_METHOD_AWQ;
    }
    if (need_h && (!o->calib || !qmix_calib_has_hessian(o->calib)))
        return qmix_errf(w->err, "method gptq needs calibration statistics with Hessians (--stats "
                         "STATS from qmix calibrate%s)", o->imatrix ? "; an importance matrix is "
                         "only H's diagonal, with which GPTQ degenerates into weighted RTN: use "
                         "--method imatrix" : "");
    if (need_imp && !o->calib && !o->imatrix)
        return qmix_errf(w->err, "methods imatrix and awq need --stats STATS or --imatrix FILE");
    if (o->calib && (qmix_calib_layers(o->calib) != w->cfg->n_layers ||
                     qmix_calib_experts(o->calib) != w->cfg->n_experts))
        return qmix_errf(w->err, "the calibration statistics are for %d layers / %d experts, the "
                         "model has %d / %d", qmix_calib_layers(o->calib),
                         qmix_calib_experts(o->calib), w->cfg->n_layers, w->cfg->n_experts);
    w->rep->min_tokens = o->min_tokens >= 0 ? o->min_tokens
                         : o->calib ? qmix_calib_failsafe_rows(qmix_calib_tokens(o->calib), -1) : 0;
    if (w->rep->min_tokens < 1) w->rep->min_tokens = 1; /* no rows: no Hessian at all */
    return 0;
}

/* ---- --format gptq: the GPTQModel/vLLM layout (spec/quant-formats.md §2) ------------------- */

/* The plan above is the MLX one (recipes, statistics and imatrix entries are keyed by MLX names);
 * the GPTQ writer maps each planned module onto GPTQ output tensors: HF names, routed experts as
 * per-expert modules (§2.6), quantized modules as qweight/qzeros/scales/g_idx (§2.1), codes on
 * the symmetric grid (QMIX_GRID_SYM) so the file holds exactly what was chosen. */

enum { GO_RAW, GO_PLAIN, GO_QWEIGHT, GO_QZEROS, GO_SCALES, GO_GIDX };

typedef struct gout {
    const char *name;         /* in the name arena */
    qmix_dtype dtype;
    int ndim;
    int64_t shape[QMIX_MAX_DIMS];
    int kind;                 /* GO_* */
    size_t item;              /* plan item */
    int64_t m;                /* matrix of the item; -1: all of it */
    uint64_t nbytes;
    int shard;
} gout;

/* Names live in fixed blocks that never move, so gout names stay valid while more are added. */
typedef struct name_arena {
    char **blocks;
    size_t n_blocks, used;
} name_arena;

#define ARENA_BLOCK ((size_t)1 << 20)

static const char *arena_printf(name_arena *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static const char *arena_printf(name_arena *a, const char *fmt, ...)
{
    char buf[640];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof buf) return NULL;
    if (!a->n_blocks || a->used + (size_t)n + 1 > ARENA_BLOCK) {
        char **b = realloc(a->blocks, (a->n_blocks + 1) * sizeof *b);
        if (!b) return NULL;
        a->blocks = b;
        if (!(b[a->n_blocks] = malloc(ARENA_BLOCK))) return NULL;
        a->n_blocks++;
        a->used = 0;
    }
    char *s = a->blocks[a->n_blocks - 1] + a->used;
    memcpy(s, buf, (size_t)n + 1);
    a->used += (size_t)n + 1;
    return s;
}

static void arena_free(name_arena *a)
{
    for (size_t i = 0; i < a->n_blocks; i++) free(a->blocks[i]);
    free(a->blocks);
}

static int item_is_expert(const item *t) { return strstr(t->name, "switch_mlp.") != NULL; }

/* HF module path of matrix m of an expert item: the source's "…mlp.experts." prefix, the expert,
 * and the projection of the MLX name ("…switch_mlp.gate_proj.weight" → "gate_proj"). */
static const char *expert_module(name_arena *a, const item *t, int64_t m)
{
    const char *e = strstr(t->src->name, "mlp.experts."), *p = strstr(t->name, "switch_mlp.");
    if (!e || !p) return NULL;
    p += 11;
    const char *dot = strchr(p, '.');
    return arena_printf(a, "%.*s%lld.%.*s", (int)(e + 12 - t->src->name), t->src->name,
                        (long long)m, (int)(dot ? dot - p : (ptrdiff_t)strlen(p)), p);
}

typedef struct gplan {
    gout *o;
    size_t n, cap;
    qmix_gptq_module *mods;
    size_t n_mods, cap_mods;
    name_arena names;
} gplan;

static gout *gplan_add(gplan *g, const char *name, qmix_dtype dt, int kind, size_t it, int64_t m)
{
    if (!name) return NULL;
    if (g->n == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 1024;
        gout *o = realloc(g->o, cap * sizeof *o);
        if (!o) return NULL;
        g->o = o;
        g->cap = cap;
    }
    gout *o = &g->o[g->n++];
    memset(o, 0, sizeof *o);
    o->name = name;
    o->dtype = dt;
    o->kind = kind;
    o->item = it;
    o->m = m;
    return o;
}

static int gplan_module(gplan *g, const char *name, int bits, int group)
{
    if (g->n_mods == g->cap_mods) {
        size_t cap = g->cap_mods ? 2 * g->cap_mods : 1024;
        qmix_gptq_module *m = realloc(g->mods, cap * sizeof *m);
        if (!m) return -1;
        g->mods = m;
        g->cap_mods = cap;
    }
    g->mods[g->n_mods++] = (qmix_gptq_module){.name = name, .bits = bits, .group = group, .sym = 1};
    return 0;
}

static void set_shape(gout *o, int nd, int64_t a, int64_t b)
{
    o->ndim = nd;
    o->shape[0] = a;
    o->shape[1] = b;
    o->nbytes = (uint64_t)a * (uint64_t)(nd > 1 ? b : 1) * qmix_dtype_size(o->dtype);
}

/* The GPTQ output tensors of the plan, in plan order (one pass). */
static int gptq_outputs(const plan *p, gplan *g, qmix_err *err)
{
    for (size_t i = 0; i < p->n; i++) {
        const item *t = &p->it[i];
        if (t->kind == K_SCALES || t->kind == K_BIASES) continue;
        if (t->raw) {
            gout *o = gplan_add(g, t->src->name, t->dtype, GO_RAW, i, -1);
            if (!o) return qmix_errf(err, "out of memory");
            o->ndim = t->ndim;
            memcpy(o->shape, t->shape, sizeof o->shape);
            o->nbytes = t->nbytes;
            continue;
        }
        int expert = item_is_expert(t);
        if (t->kind == K_PLAIN) {
            if (!expert) {
                gout *o = gplan_add(g, t->src->name, t->dtype, GO_PLAIN, i, -1);
                if (!o) return qmix_errf(err, "out of memory");
                o->ndim = t->src->ndim; /* the HF shape (conv1d stays [C, 1, K]) */
                memcpy(o->shape, t->src->shape, sizeof o->shape);
                o->nbytes = t->nbytes;
                size_t nl = strlen(t->src->name);
                if (t->ndim == 2 && nl > 7 && !strcmp(t->src->name + nl - 7, ".weight")) {
                    const char *mod = arena_printf(&g->names, "%.*s", (int)(nl - 7), t->src->name);
                    if (!mod || gplan_module(g, mod, 0, 0)) return qmix_errf(err, "out of memory");
                }
                continue;
            }
            for (int64_t m = 0; m < t->nmat; m++) {
                const char *mod = expert_module(&g->names, t, m);
                gout *o = mod ? gplan_add(g, arena_printf(&g->names, "%s.weight", mod), t->dtype,
                                          GO_PLAIN, i, m) : NULL;
                if (!o || gplan_module(g, mod, 0, 0)) return qmix_errf(err, "out of memory");
                set_shape(o, 2, t->rows, t->cols);
            }
            continue;
        }
        /* K_QWEIGHT */
        int b = t->bits;
        if (!qmix_gptq_bits_valid(b))
            return qmix_errf(err, "%s: the recipe asks for %d bits; GPTQ holds 2, 3, 4 or 8 bits "
                             "(vLLM's Marlin kernels 4 or 8): use --format mlx, or change the "
                             "recipe", t->name, b);
        if ((t->rows * b) % 32)
            return qmix_errf(err, "%s: %lld output channels cannot be packed into GPTQ qzeros at "
                             "%d bits (needs a multiple of %d); keep it 16-bit in the recipe",
                             t->name, (long long)t->rows, b, b == 3 ? 32 : 32 / b);
        int64_t K = t->cols, N = t->rows, G = K / t->group;
        for (int64_t m = 0; m < t->nmat; m++) {
            const char *mod;
            if (expert) mod = expert_module(&g->names, t, m);
            else mod = arena_printf(&g->names, "%.*s", (int)(strlen(t->src->name) - 7),
                                    t->src->name);
            if (!mod || gplan_module(g, mod, b, t->group)) return qmix_errf(err, "out of memory");
            static const char *const suffix[4] = {"qweight", "qzeros", "scales", "g_idx"};
            for (int k = 0; k < 4; k++) {
                gout *o = gplan_add(g, arena_printf(&g->names, "%s.%s", mod, suffix[k]),
                                    k == 2 ? QMIX_F16 : QMIX_I32, GO_QWEIGHT + k, i, m);
                if (!o) return qmix_errf(err, "out of memory");
                if (k == 0) set_shape(o, 2, K * b / 32, N);
                else if (k == 1) set_shape(o, 2, G, N * b / 32);
                else if (k == 2) set_shape(o, 2, G, N);
                else set_shape(o, 1, K, 0);
            }
        }
    }
    return 0;
}

/* Rows [g_begin, g_end) of item t converted to its output dtype, in chunks. */
static int gptq_write_rows(wctx *w, qmix_stw *f, const item *t, int64_t g_begin, int64_t g_end)
{
    size_t row_out = (size_t)t->cols * qmix_dtype_size(t->dtype);
    int64_t per_chunk = (int64_t)(CHUNK_ELEMS / (size_t)t->cols);
    if (per_chunk < 1) per_chunk = 1;
    w->t = t;
    w->qout = NULL;
    for (int64_t g0 = g_begin, n; g0 < g_end; g0 += n) {
        n = g_end - g0 < per_chunk ? g_end - g0 : per_chunk;
        w->g0 = g0;
        qmix_pool_run(w->pool, row_task, w, (int)n);
        if (qmix_stw_write(f, w->chunk, (size_t)n * row_out, w->err)) return -1;
        w->done_bytes += (uint64_t)n * (uint64_t)t->cols * qmix_dtype_size(t->src->dtype);
        progress(w, 0);
    }
    return 0;
}

/* Quantizes matrix m of t into w->qout (its packed rows, MLX layout) and w->sbuf (its f16
 * scales), with the item's method. */
static int gptq_quantize_matrix(wctx *w, const item *t, int64_t m, uint32_t *mbuf)
{
    int64_t words = qmix_affine_row_words(t->cols, t->bits);
    size_t ng = (size_t)(t->cols / t->group), need = (size_t)(t->nmat * t->rows) * ng;
    if (need > w->sbuf_cap) {
        uint16_t *a = realloc(w->sbuf, need * 2);
        if (a) w->sbuf = a;
        uint16_t *b = a ? realloc(w->bbuf, need * 2) : NULL;
        if (b) w->bbuf = b;
        if (!a || !b) return qmix_errf(w->err, "out of memory");
        w->sbuf_cap = need;
    }
    w->t = t;
    w->mode = 0;
    if (item_method(w, t) != QMIX_METHOD_RTN && prepare_matrix(w, t, m)) return -1;
    int64_t per_chunk = (int64_t)(CHUNK_ELEMS / (size_t)t->cols);
    if (per_chunk < 1) per_chunk = 1;
    for (int64_t r0 = 0, n; r0 < t->rows; r0 += n) {
        n = t->rows - r0 < per_chunk ? t->rows - r0 : per_chunk;
        w->g0 = m * t->rows + r0;
        w->qout = mbuf + (size_t)r0 * (size_t)words;
        qmix_pool_run(w->pool, row_task, w, (int)n);
        w->done_bytes += (uint64_t)n * (uint64_t)t->cols * qmix_dtype_size(t->src->dtype);
        progress(w, 0);
    }
    w->qout = NULL;
    qmix_gptq_prep_free(&w->prep);
    w->mode = 0;
    return 0;
}

/* One GPTQ output tensor. mbuf holds the current matrix's packed rows (after GO_QWEIGHT). */
static int gptq_write_one(wctx *w, qmix_stw *f, const plan *p, const gout *o, uint32_t *mbuf)
{
    const item *t = &p->it[o->item];
    qmix_err *err = w->err;
    if (qmix_stw_begin(f, o->name, err)) return -1;
    if (o->kind == GO_RAW) /* not counted in the progress total (the MLX plan drops these) */
        return qmix_stw_write(f, t->src->data, o->nbytes, err);
    if (o->kind == GO_PLAIN)
        return o->m < 0 ? gptq_write_rows(w, f, t, 0, t->nmat * t->rows)
                        : gptq_write_rows(w, f, t, o->m * t->rows, (o->m + 1) * t->rows);
    int64_t N = t->rows, K = t->cols, G = K / t->group, W = qmix_affine_row_words(K, t->bits);
    uint32_t *c32 = (uint32_t *)w->chunk;
    size_t cap32 = CHUNK_ELEMS; /* the chunk holds CHUNK_ELEMS · 4 bytes */
    if (o->kind == GO_QWEIGHT) {
        if (gptq_quantize_matrix(w, t, o->m, mbuf)) return -1;
        /* qweight[r][n] = MLX row n's word r (§2.2): transpose through the chunk */
        int64_t per = (int64_t)(cap32 / (size_t)N);
        if (per < 1) return qmix_errf(err, "%s: %lld output channels exceed the chunk", o->name,
                                      (long long)N);
        for (int64_t r0 = 0, n; r0 < W; r0 += n) {
            n = W - r0 < per ? W - r0 : per;
            for (int64_t r = 0; r < n; r++)
                for (int64_t c = 0; c < N; c++) c32[r * N + c] = mbuf[c * W + r0 + r];
            if (qmix_stw_write(f, c32, (size_t)(n * N) * 4, err)) return -1;
        }
        return 0;
    }
    if (o->kind == GO_QZEROS) { /* symmetric: every true zero is 2^(bits−1), v1 offset */
        int64_t words = N * t->bits / 32;
        qmix_gptq_zeros_row(N, t->bits, 1u << (t->bits - 1), 1, c32);
        for (int64_t g = 0; g < G; g++)
            if (qmix_stw_write(f, c32, (size_t)words * 4, err)) return -1;
        return 0;
    }
    if (o->kind == GO_SCALES) { /* [G][N] from the rows' f16 scales */
        uint16_t *c16 = (uint16_t *)w->chunk;
        const uint16_t *s = w->sbuf + (size_t)(o->m * N) * (size_t)G;
        int64_t per = (int64_t)(2 * cap32 / (size_t)N);
        for (int64_t g0 = 0, n; g0 < G; g0 += n) {
            n = G - g0 < per ? G - g0 : per;
            for (int64_t g = 0; g < n; g++)
                for (int64_t c = 0; c < N; c++) c16[g * N + c] = s[c * G + g0 + g];
            if (qmix_stw_write(f, c16, (size_t)(n * N) * 2, err)) return -1;
        }
        return 0;
    }
    /* g_idx: contiguous groups (desc_act false; GAR undoes its order, §2.4) */
    for (int64_t k0 = 0, n; k0 < K; k0 += n) {
        n = K - k0 < (int64_t)cap32 ? K - k0 : (int64_t)cap32;
        for (int64_t k = 0; k < n; k++) c32[k] = (uint32_t)((k0 + k) / t->group);
        if (qmix_stw_write(f, c32, (size_t)n * 4, err)) return -1;
    }
    return 0;
}

static int write_gptq_config(const char *in_dir, const char *out_dir, json_t *qc, qmix_err *err)
{
    char *src = path_join(in_dir, "config.json"), *dst = path_join(out_dir, "config.json");
    char *qdst = path_join(out_dir, "quantize_config.json");
    int rc = -1;
    json_error_t je;
    json_t *root = src ? json_load_file(src, JSON_REJECT_DUPLICATES, &je) : NULL;
    if (!root || !json_is_object(root) || !dst || !qdst) {
        qmix_errf(err, "%s: cannot read config.json", in_dir);
        goto out;
    }
    json_object_del(root, "quantization");
    json_object_set(root, "quantization_config", qc);
    /* insertion order kept (no key sorting): `dynamic` rules are ordered, first match wins */
    /* GPTQModel writes both; config.json last, the file that makes the directory a model */
    if (!qmix_write_json(qdst, qc, JSON_INDENT(2), err) &&
        !qmix_write_json(dst, root, JSON_INDENT(2), err))
        rc = 0;
out:
    json_decref(root);
    free(src);
    free(dst);
    free(qdst);
    return rc;
}

/* ---- sharded safetensors output (MLX and GPTQ alike) --------------------------------------- */

typedef struct shard_writer {
    size_t n;          /* output tensors, in file order */
    int n_shards;
    const char *format; /* the header's "format" entry */
    /* tensor i's header entry and shard (shards ascending with i) */
    void (*describe)(void *user, size_t i, qmix_stw_tensor *spec, int *shard);
    /* streams tensor i's bytes into f; -1 with err */
    int (*write)(void *user, qmix_stw *f, size_t i);
    void *user;
} shard_writer;

/* Writes model.safetensors (or model-0000k-of-0000n.safetensors) and the index, whose totals
 * are rep's bytes and params. */
static int write_shards(const char *out_dir, const shard_writer *sw, const qmix_quant_report *rep,
                        qmix_err *err)
{
    const char **names = calloc(sw->n + 1, sizeof *names), **files = calloc(sw->n + 1, sizeof *files);
    char (*fnames)[64] = calloc((size_t)sw->n_shards + 1, sizeof *fnames);
    qmix_stw_tensor *specs = calloc(sw->n + 1, sizeof *specs);
    int rc = -1;
    if (!names || !files || !fnames || !specs) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    qmix_stw_kv meta[1] = {{"format", sw->format}};
    size_t j = 0;
    int shard = 0;
    for (int sh = 0; sh < sw->n_shards; sh++) {
        if (sw->n_shards == 1) snprintf(fnames[sh], sizeof fnames[sh], "model.safetensors");
        else snprintf(fnames[sh], sizeof fnames[sh], "model-%05d-of-%05d.safetensors", sh + 1,
                      sw->n_shards);
        size_t k0 = j;
        while (j < sw->n) {
            sw->describe(sw->user, j, &specs[j - k0], &shard);
            if (shard != sh) break;
            names[j] = specs[j - k0].name;
            files[j] = fnames[sh];
            j++;
        }
        char *path = path_join(out_dir, fnames[sh]);
        qmix_stw *f = NULL;
        if (!path || qmix_stw_open(path, specs, j - k0, meta, 1, &f, err)) {
            free(path);
            goto done;
        }
        free(path);
        for (size_t k = k0; k < j; k++)
            if (sw->write(sw->user, f, k)) {
                qmix_stw_discard(f);
                goto done;
            }
        if (qmix_stw_close(f, err)) goto done;
    }
    char *ip = path_join(out_dir, "model.safetensors.index.json");
    rc = !ip || qmix_st_write_index(ip, rep->bytes, rep->params, names, files, sw->n, err) ? -1 : 0;
    free(ip);
done:
    free(names);
    free(files);
    free(fnames);
    free(specs);
    return rc;
}

/* The GPTQ outputs as a shard_writer sees them. */
typedef struct gptq_shards { wctx *w; const plan *p; const gplan *g; uint32_t *mbuf; } gptq_shards;

static void gptq_describe(void *user, size_t i, qmix_stw_tensor *spec, int *shard)
{
    const gout *x = &((gptq_shards *)user)->g->o[i];
    *spec = (qmix_stw_tensor){.name = x->name, .dtype = x->dtype, .ndim = x->ndim};
    memcpy(spec->shape, x->shape, sizeof spec->shape);
    *shard = x->shard;
}

static int gptq_write(void *user, qmix_stw *f, size_t k)
{
    gptq_shards *gs = user;
    const gplan *g = gs->g;
    if (gptq_write_one(gs->w, f, gs->p, &g->o[k], gs->mbuf)) return -1;
    const src_t *s = gs->p->it[g->o[k].item].src;
    if ((k + 1 == g->n || gs->p->it[g->o[k + 1].item].src != s) && !s->parts)
        release_source(s, n_elems(s->ndim, s->shape) * qmix_dtype_size(s->dtype));
    return 0;
}

/* The MLX plan's items as a shard_writer sees them. */
typedef struct mlx_shards { wctx *w; const plan *p; } mlx_shards;

static void mlx_describe(void *user, size_t i, qmix_stw_tensor *spec, int *shard)
{
    const item *t = &((mlx_shards *)user)->p->it[i];
    *spec = (qmix_stw_tensor){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
    memcpy(spec->shape, t->shape, sizeof spec->shape);
    *shard = t->shard;
}

static int mlx_write(void *user, qmix_stw *f, size_t k)
{
    mlx_shards *ms = user;
    const plan *p = ms->p;
    if (write_item(ms->w, f, &p->it[k])) return -1;
    /* the source is done when its last output item is */
    const src_t *s = p->it[k].src;
    if ((k + 1 == p->n || p->it[k + 1].src != s) && !s->qbits && !s->parts)
        release_source(s, n_elems(s->ndim, s->shape) * qmix_dtype_size(s->dtype));
    return 0;
}

/* Writes the planned model as a GPTQ checkpoint into out_dir (config and side files by the
 * caller's code path). */
static int write_gptq(wctx *w, const plan *p, const char *in, const char *out_dir,
                      const qmix_config *cfg, int64_t kept16, qmix_err *err)
{
    const qmix_quant_opts *o = w->o;
    qmix_quant_report *rep = w->rep;
    gplan g = {0};
    json_t *qc = NULL;
    uint32_t *mbuf = NULL;
    int rc = -1;
    if (gptq_outputs(p, &g, err)) goto done;
    int has_mtp = 0, has_vision = 0;
    for (size_t i = 0; i < p->n; i++) {
        has_mtp |= p->it[i].raw && !strncmp(p->it[i].name, "mtp.", 4);
        has_vision |= p->it[i].raw && !strncmp(p->it[i].name, "model.visual.", 13);
    }
    qmix_gptq_qconfig_opts qo = {.n_layers = cfg->n_layers, .has_mtp = has_mtp,
                                 .has_vision = has_vision, .act_group_aware = o->gptq.act_order,
                                 .damp = o->method == QMIX_METHOD_GPTQ
                                         ? (o->gptq.damp > 0 ? o->gptq.damp : 0.01) : 0,
                                 .quantizer = "qmix"};
    int non_marlin = 0;
    if (qmix_gptq_build_qconfig(g.mods, g.n_mods, &qo, &qc, &non_marlin, err)) goto done;
    rep->gptq_non_marlin = non_marlin;
    rep->gptq_kept16 = kept16;
    /* report in GPTQ terms: bytes on disk, parameters as logical weights */
    rep->params = rep->bytes = 0;
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) rep->roles[r].params = rep->roles[r].bytes = 0;
    size_t max_words = 1;
    for (size_t i = 0; i < g.n; i++) {
        const gout *x = &g.o[i];
        const item *t = &p->it[x->item];
        uint64_t params = x->kind == GO_QWEIGHT ? (uint64_t)t->rows * (uint64_t)t->cols
                          : x->kind == GO_RAW || x->kind == GO_PLAIN ? n_elems(x->ndim, x->shape)
                                                                     : 0;
        rep->params += params;
        rep->bytes += x->nbytes;
        rep->roles[t->role].params += params;
        rep->roles[t->role].bytes += x->nbytes;
        if (x->kind == GO_QWEIGHT && (size_t)(t->rows * qmix_affine_row_words(t->cols, t->bits)) > max_words)
            max_words = (size_t)(t->rows * qmix_affine_row_words(t->cols, t->bits));
    }
    rep->bpw = rep->params ? 8.0 * (double)rep->bytes / (double)rep->params : 0;
    rep->n_tensors = (int)g.n;
    if (o->dry_run) {
        rc = 0;
        goto done;
    }
    uint64_t limit = o->shard_bytes ? o->shard_bytes : (uint64_t)5 << 30, cur = 0;
    int shard = 0;
    for (size_t i = 0; i < g.n; i++) {
        if (cur && cur + g.o[i].nbytes > limit) {
            shard++;
            cur = 0;
        }
        cur += g.o[i].nbytes;
        g.o[i].shard = shard;
    }
    int n_shards = g.n ? shard + 1 : 0;
    rep->n_shards = n_shards;
    mbuf = malloc(max_words * 4); /* one quantized matrix: qweight is its transpose */
    if (!mbuf) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    gptq_shards gs = {.w = w, .p = p, .g = &g, .mbuf = mbuf};
    shard_writer sw = {.n = g.n, .n_shards = n_shards, .format = "pt", .describe = gptq_describe,
                       .write = gptq_write, .user = &gs};
    int irc = write_shards(out_dir, &sw, rep, err);
    progress(w, 1);
    if (irc || write_gptq_config(in, out_dir, qc, err)) goto done;
    rc = 0;
done:
    json_decref(qc);
    free(mbuf);
    free(g.o);
    free(g.mods);
    arena_free(&g.names);
    return rc;
}

int qmix_quantize(const char *in, const char *out_dir, const qmix_quant_opts *o,
                  qmix_quant_report *rep, qmix_err *err)
{
    const int gptq = o->format == QMIX_QFORMAT_GPTQ;
    if (o->format != QMIX_QFORMAT_MLX && !gptq)
        return qmix_errf(err, "output format %d is not supported", o->format);
    memset(rep, 0, sizeof *rep);
    double t0 = now_s();
    struct stat sb;
    if (stat(in, &sb) || !S_ISDIR(sb.st_mode))
        return qmix_errf(err, "%s: not a checkpoint directory", in);
    if (o->dtype != QMIX_BF16 && o->dtype != QMIX_F16)
        return qmix_errf(err, "--dtype must be bf16 or f16");
    if (o->dry_run) {
        /* sizing only (qmix plan): the same plan as a real run below */
    } else if (dir_nonempty(out_dir) && !o->force)
        return qmix_errf(err, "%s: exists and is not empty (pass --force to write into it)",
                         out_dir);
    /* built in OUT.partial-PID and moved to out_dir when complete (util/fileio.h) */
    qmix_outdir od = {0};
    if (!o->dry_run) {
        if (qmix_outdir_begin(&od, out_dir, err)) return -1;
        out_dir = od.work;
    }

    qmix_config cfg;
    qmix_st_store *st = NULL;
    qmix_qconfig *qin = NULL;
    src_t *srcs = NULL;
    plan p = {0};
    pctx c = {0};
    wctx w = {.o = o, .err = err, .sdt = gptq ? QMIX_F16 : o->dtype,
              .grid = gptq ? QMIX_GRID_SYM : QMIX_GRID_MLX};
    int rc = -1;
    char *cfg_path = path_join(in, "config.json");
    if (!cfg_path || qmix_config_load(cfg_path, &cfg, err) || qmix_qconfig_load(cfg_path, &qin, err) ||
        qmix_st_open(in, &st, err))
        goto done;
    int hf = !is_mlx_input(st);
    if (gptq && !hf) {
        qmix_errf(err, "--format gptq reads the HF bf16 checkpoint (an MLX checkpoint converts "
                  "with qmix convert IN OUT --to gptq)");
        goto done;
    }
    uint64_t n = qmix_st_count(st);
    srcs = calloc(n ? n : 1, sizeof *srcs);
    if (!srcs) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    c = (pctx){.cfg = &cfg, .recipe = o->recipe, .dtype = o->dtype, .p = &p, .err = err, .st = st,
               .gptq = gptq};
    for (uint64_t i = 0; i < n; i++) {
        const qmix_tensor *t = qmix_st_at(st, i);
        src_t *s = &srcs[i];
        s->name = t->name;
        s->dtype = t->dtype;
        s->ndim = t->ndim;
        memcpy(s->shape, t->shape, sizeof s->shape);
        s->data = t->data;
        if (t->dtype == QMIX_U32) {
            char mod[512], nm[530];
            if (module_of(t->name, mod, sizeof mod)) {
                qmix_errf(err, "%s: U32 tensor that is not a module weight", t->name);
                goto done;
            }
            snprintf(nm, sizeof nm, "%s.scales", mod);
            s->scales = qmix_st_find(st, nm);
            snprintf(nm, sizeof nm, "%s.biases", mod);
            s->biases = qmix_st_find(st, nm);
            int r = qmix_qconfig_module(qin, mod, s->scales != NULL, &s->qbits, &s->qgroup, err);
            if (r < 0) goto done;
            if (!r || !s->scales || !s->biases || t->ndim < 2) {
                qmix_errf(err, "%s: U32 weight without usable scales/biases", t->name);
                goto done;
            }
            if (!o->allow_requant) {
                qmix_errf(err, "%s is already quantized (module '%s' at %d bits): re-quantizing "
                          "from a quantized checkpoint compounds the error; quantize the bf16 "
                          "original, or pass --allow-requant", in, mod, s->qbits);
                goto done;
            }
            int64_t K = t->shape[t->ndim - 1] * 32 / s->qbits;
            if (K % s->qgroup || s->scales->shape[s->scales->ndim - 1] != K / s->qgroup ||
                !qmix_affine_valid(s->qbits, s->qgroup)) {
                qmix_errf(err, "%s: packed width disagrees with bits=%d group=%d", t->name,
                          s->qbits, s->qgroup);
                goto done;
            }
        } else if (t->dtype != QMIX_BF16 && t->dtype != QMIX_F16 && t->dtype != QMIX_F32) {
            qmix_errf(err, "%s: dtype %s cannot be quantized or converted", t->name,
                      qmix_dtype_st_name(t->dtype));
            goto done;
        }
    }
    for (uint64_t i = 0; i < n; i++) {
        if (srcs[i].dtype != QMIX_U32 && !hf && (ends_with(srcs[i].name, ".scales") ||
                                                 ends_with(srcs[i].name, ".biases"))) {
            char mod[512], nm[530];
            snprintf(mod, sizeof mod, "%.*s", (int)(strlen(srcs[i].name) - 7), srcs[i].name);
            snprintf(nm, sizeof nm, "%s.weight", mod);
            const qmix_tensor *wt = qmix_st_find(st, nm);
            if (wt && wt->dtype == QMIX_U32) continue;
        }
        if (plan_source(&c, &srcs[i], hf)) goto done;
    }
    stats_of(&p, rep);
    choose_defaults(o->recipe, &p, &rep->default_bits, &rep->default_group);
    w.cfg = &cfg;
    w.rep = rep;
    if (check_method_inputs(&w, &p)) goto done;
    if (o->dry_run && !gptq) {
        rc = 0;
        goto done;
    }

    /* shards: greedy in declaration order */
    uint64_t limit = o->shard_bytes ? o->shard_bytes : (uint64_t)5 << 30, cur = 0;
    int shard = 0;
    size_t max_cols = 1;
    for (size_t i = 0; i < p.n; i++) {
        if (cur && cur + p.it[i].nbytes > limit) {
            shard++;
            cur = 0;
        }
        cur += p.it[i].nbytes;
        p.it[i].shard = shard;
        if ((size_t)p.it[i].cols > max_cols) max_cols = (size_t)p.it[i].cols;
        if (p.it[i].kind == K_QWEIGHT || p.it[i].kind == K_PLAIN)
            w.total_bytes += (uint64_t)p.it[i].nmat * (uint64_t)p.it[i].rows *
                             (uint64_t)p.it[i].cols * (p.it[i].src->qbits ? 0 : qmix_dtype_size(p.it[i].src->dtype));
    }
    int n_shards = p.n ? shard + 1 : 0;
    rep->n_shards = n_shards;
    w.pool = qmix_pool_new(o->n_threads);
    w.n_threads = w.pool ? qmix_pool_threads(w.pool) : 1;
    w.max_cols = max_cols;
    w.rows = malloc((size_t)w.n_threads * max_cols * sizeof *w.rows);
    w.scr = malloc((size_t)w.n_threads * 2 * max_cols * sizeof *w.scr);
    size_t chunk_elems = max_cols > CHUNK_ELEMS ? max_cols : CHUNK_ELEMS;
    w.chunk = malloc(chunk_elems * 4);
    w.imp = malloc(max_cols * sizeof *w.imp);
    w.gwork = malloc((size_t)w.n_threads * (2 * max_cols + 128) * sizeof *w.gwork);
    if (!w.pool || !w.rows || !w.scr || !w.chunk || !w.imp || !w.gwork) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    if (!o->dry_run && awq_prepass(&w, &p)) goto done;
    if (!o->dry_run) { /* the side files first: config.json, written last, completes the model */
        static const char *side[] = {"tokenizer.json", "tokenizer_config.json",
                                     "generation_config.json", "chat_template.jinja",
                                     "chat_template.json", "vocab.json", "merges.txt",
                                     "special_tokens_map.json", "added_tokens.json",
                                     "preprocessor_config.json", "processor_config.json",
                                     "video_preprocessor_config.json"};
        for (size_t i = 0; i < sizeof side / sizeof side[0]; i++) {
            char *a = path_join(in, side[i]), *b = path_join(out_dir, side[i]);
            int crc = !a || !b || qmix_copy_file(a, b, 1, err);
            free(a);
            free(b);
            if (crc) goto done;
        }
    }
    w.t0 = w.last = now_s();
    if (gptq) {
        if (write_gptq(&w, &p, in, out_dir, &cfg, c.kept16, err)) goto done;
        if (o->dry_run) {
            rc = 0;
            goto done;
        }
        goto written;
    }
    mlx_shards ms = {.w = &w, .p = &p};
    shard_writer sw = {.n = p.n, .n_shards = n_shards, .format = "mlx", .describe = mlx_describe,
                       .write = mlx_write, .user = &ms};
    if (write_shards(out_dir, &sw, rep, err)) goto done;
    progress(&w, 1);
    if (write_config(in, out_dir, &p, rep->default_bits, rep->default_group, err)) goto done;
written:
    if (!o->dry_run && qmix_outdir_commit(&od, err)) goto done;
    rep->input_bytes = w.total_bytes;
    rep->seconds = now_s() - t0;
    rc = 0;
done:
    qmix_pool_free(w.pool);
    free(w.rows);
    free(w.scr);
    free(w.chunk);
    free(w.sbuf);
    free(w.bbuf);
    free(w.imp);
    free(w.gwork);
    for (int i = 0; i < w.n_awq_bufs; i++) free(w.awq_bufs[i]);
    free(w.awq_bufs);
    qmix_gptq_prep_free(&w.prep);
    free(p.it);
    free(srcs);
    free_owned(c.owned);
    free(cfg_path);
    qmix_qconfig_free(qin);
    qmix_st_close(st);
    qmix_outdir_abandon(&od); /* what a failed run wrote; nothing after a commit */
    if (rc) qmix_err_prefix(err, "quantize %s", in);
    return rc;
}

/* qmix convert between GPTQ (GPTQModel/vLLM, spec/quant-formats.md §2) and MLX (§1), §2.9:
 *
 * - GPTQ → MLX keeps the codes: a qweight column is an MLX packed row (§2.2), scale s, bias −s·z.
 *   Symmetric modules keep the scale dtype (the bias is s times a power of two: exact); others get
 *   F32 scales/biases so −s·z is not rounded. Per-expert modules are stacked into switch_mlp, names
 *   and norms (1 + w) follow mlx-vlm; the MTP block is dropped, as mlx-lm does.
 * - MLX → GPTQ keeps the codes where a group is s·(q − z) with an integer z in [1, maxq] and an
 *   f16-exact s (flipping the codes of a negative-scale group, §2.9); a matrix where some group is
 *   not is re-quantized from its dequantized weights on the symmetric grid, with a warning.
 *
 * Norms that cannot be shifted exactly in their dtype are written as F32, so GPTQ → MLX → GPTQ
 * reproduces every tensor value. Each output tensor is streamed; memory is one module. */
#include "cli/convert_gptq.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "formats/config.h"
#include "formats/safetensors.h"
#include "formats/safetensors_write.h"
#include "kernels/kernels.h"
#include "quant/affine.h"
#include "quant/gptq.h"
#include "quant/gptq_format.h"
#include "quant/quantize.h"
#include "util/err.h"
#include "util/fileio.h"

static char *join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s/%s", a, b);
    return s;
}

int convert_is_gptq(const char *in)
{
    char *p = join(in, "config.json");
    qmix_gptq_info info;
    qmix_err err;
    int r = p ? qmix_gptq_info_load(p, &info, &err) : 0;
    free(p);
    return r != 0; /* an unreadable variant still goes to convert_gptq for its message */
}

/* ---- the output list --------------------------------------------------------------------- */

enum {
    OP_COPY,      /* bytes of src from offset */
    OP_NORM,      /* src + delta (±1), into dtype */
    OP_STACK,     /* parts[0..n) byte after byte */
    OP_G2M_W, OP_G2M_S, OP_G2M_B, /* GPTQ modules mods[0..n) → MLX weight / scales / biases */
    OP_M2G_QW, OP_M2G_QZ, OP_M2G_SC, OP_M2G_GI, /* matrix m of an MLX module → GPTQ */
    OP_M2G_DEQ    /* matrix m of an MLX module, dequantized to dtype (modules vLLM never quantizes) */
};

typedef struct op {
    const char *name;
    qmix_dtype dtype;
    int ndim;
    int64_t shape[QMIX_MAX_DIMS];
    uint64_t nbytes;
    int kind;
    const qmix_tensor *src;              /* COPY, NORM; M2G: the MLX weight */
    const qmix_tensor *scales, *biases;  /* M2G */
    uint64_t offset;
    float delta;
    const char **mods;                   /* G2M: module names; STACK: NULL */
    const qmix_tensor **parts;           /* STACK */
    int n;                               /* mods / parts */
    int64_t m, rows, cols;               /* M2G matrix, its N and K */
    int bits, group;
} op;

typedef struct job {
    const qmix_st_store *st;
    qmix_config cfg;
    op *ops;
    size_t n, cap;
    char **strs;                         /* every string made here, freed at the end */
    size_t n_strs, cap_strs;
    qmix_gptq_info info;
    qmix_qconfig *qin;
    qmix_err *err;
    int progress;
    /* MLX → GPTQ */
    qmix_gptq_module *gm;
    size_t n_gm, cap_gm;
    int64_t n_requant, n_kept16;
    /* the current M2G matrix */
    uint32_t *codes;                     /* [N][W] */
    uint16_t *gsc;                       /* [G][N] f16 */
    uint32_t *gz;                        /* [G][N] true zeros */
    size_t cache_cap;
} job;

static const char *keep_str(job *j, char *s)
{
    if (!s) return NULL;
    if (j->n_strs == j->cap_strs) {
        size_t cap = j->cap_strs ? 2 * j->cap_strs : 1024;
        char **a = realloc(j->strs, cap * sizeof *a);
        if (!a) {
            free(s);
            return NULL;
        }
        j->strs = a;
        j->cap_strs = cap;
    }
    j->strs[j->n_strs++] = s;
    return s;
}

static const char *fmt(job *j, const char *f, ...) __attribute__((format(printf, 2, 3)));
static const char *fmt(job *j, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    char *s = NULL;
    if (vasprintf(&s, f, ap) < 0) s = NULL;
    va_end(ap);
    return keep_str(j, s);
}

static op *add(job *j, const char *name, qmix_dtype dt, int kind)
{
    if (!name) return NULL;
    if (j->n == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 1024;
        op *a = realloc(j->ops, cap * sizeof *a);
        if (!a) return NULL;
        j->ops = a;
        j->cap = cap;
    }
    op *o = &j->ops[j->n++];
    memset(o, 0, sizeof *o);
    o->name = name;
    o->dtype = dt;
    o->kind = kind;
    return o;
}

static void shape2(op *o, int nd, const int64_t *shape)
{
    o->ndim = nd;
    memcpy(o->shape, shape, sizeof(int64_t) * (size_t)nd);
    uint64_t e = 1;
    for (int d = 0; d < nd; d++) e *= (uint64_t)shape[d];
    o->nbytes = e * qmix_dtype_size(o->dtype);
}

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* HF norms stored as w that MLX stores as 1 + w (§0.3); the GDN gated norm is never shifted. */
static int is_shifted_norm(const char *n)
{
    return ends_with(n, "input_layernorm.weight") || ends_with(n, "post_attention_layernorm.weight") ||
           ends_with(n, "self_attn.q_norm.weight") || ends_with(n, "self_attn.k_norm.weight") ||
           ends_with(n, "model.norm.weight");
}

static float elem(const qmix_tensor *t, uint64_t i)
{
    qk_mat v = {.dtype = t->dtype, .rows = 1, .cols = 1, .row_bytes = qmix_dtype_size(t->dtype),
                .data = (const uint8_t *)t->data + i * qmix_dtype_size(t->dtype)};
    float f;
    qk_mat_row_f32(&v, 0, &f);
    return f;
}

/* The dtype that holds src + delta exactly: BF16 (HF's) or else src's own when every value
 * survives, else F32, so a GPTQ → MLX → GPTQ round trip gives back the original BF16 norms. */
static qmix_dtype norm_dtype(const qmix_tensor *t, float delta)
{
    uint64_t n = t->nbytes / qmix_dtype_size(t->dtype);
    int bf16_ok = 1, own_ok = 1;
    for (uint64_t i = 0; i < n; i++) {
        float v = elem(t, i) + delta;
        bf16_ok &= qmix_round_to_dtype(v, QMIX_BF16) == v;
        own_ok &= qmix_round_to_dtype(v, t->dtype) == v;
    }
    return bf16_ok ? QMIX_BF16 : own_ok ? t->dtype : QMIX_F32;
}

static int add_norm(job *j, const char *name, const qmix_tensor *t, float delta)
{
    op *o = add(j, name, norm_dtype(t, delta), OP_NORM);
    if (!o) return qmix_errf(j->err, "out of memory");
    o->src = t;
    o->delta = delta;
    shape2(o, t->ndim, t->shape);
    return 0;
}

static int add_copy(job *j, const char *name, const qmix_tensor *t, int nd, const int64_t *shape,
                    uint64_t offset)
{
    op *o = add(j, name, t->dtype, OP_COPY);
    if (!o) return qmix_errf(j->err, "out of memory");
    o->src = t;
    o->offset = offset;
    shape2(o, nd, shape);
    return 0;
}

/* ---- GPTQ → MLX plan --------------------------------------------------------------------- */

/* HF name → mlx-vlm name (§1.5) into a kept string; NULL to drop. */
static const char *to_mlx_name(job *j, const char *n)
{
    if (!strncmp(n, "mtp.", 4)) return NULL;
    if (!strcmp(n, "lm_head.weight") || !strncmp(n, "lm_head.", 8))
        return fmt(j, "language_model.%s", n);
    if (!strncmp(n, "model.language_model.", 21)) return fmt(j, "language_model.model.%s", n + 21);
    if (!strncmp(n, "model.visual.", 13)) return fmt(j, "vision_tower.%s", n + 13);
    if (!strncmp(n, "model.", 6)) return fmt(j, "language_model.model.%s", n + 6);
    return fmt(j, "%s", n);
}

static const char *const gptq_suffix[4] = {".qweight", ".qzeros", ".scales", ".g_idx"};

/* Bits/group of a GPTQ module from its tensor shapes (validated again when unpacked). */
static int gptq_shape(job *j, const char *mod, int64_t *N, int64_t *K, int *bits, int *group,
                      qmix_dtype *sdt, int *sym)
{
    char nm[600];
    const qmix_tensor *t[4];
    for (int k = 0; k < 4; k++) {
        snprintf(nm, sizeof nm, "%s%s", mod, gptq_suffix[k]);
        t[k] = qmix_st_find(j->st, nm);
    }
    qmix_gptq_unpacked u;
    /* one unpack validates everything (shapes, dtypes, g_idx) and tells whether it is sym */
    if (qmix_gptq_unpack(mod, t[0], t[1], t[2], t[3], -1, -1, &j->info, &u, j->err)) return -1;
    *N = u.rows;
    *K = u.cols;
    *bits = u.bits;
    *group = u.group;
    *sym = u.sym;
    *sdt = t[2]->dtype;
    qmix_gptq_unpacked_free(&u);
    return 0;
}

static int plan_g2m_module(job *j, const char *mlx_mod, const char **mods, int n,
                           json_t *qblock)
{
    int64_t N = 0, K = 0;
    int bits = 0, group = 0, sym = 1;
    qmix_dtype sdt = QMIX_F16;
    for (int e = 0; e < n; e++) {
        int64_t n2, k2;
        int b2, g2, s2;
        qmix_dtype d2;
        if (gptq_shape(j, mods[e], &n2, &k2, &b2, &g2, &d2, &s2)) return -1;
        if (e && (n2 != N || k2 != K || b2 != bits || g2 != group || d2 != sdt))
            return qmix_errf(j->err, "GPTQ module '%s' differs in shape or bits from '%s': the "
                             "experts of one layer must match to stack them", mods[e], mods[0]);
        N = n2, K = k2, bits = b2, group = g2, sdt = d2;
        sym &= s2;
    }
    /* symmetric: −s·2^(b−1) is exact in the scale dtype; otherwise −s·z needs F32 (§2.9) */
    qmix_dtype out_sdt = sym ? sdt : QMIX_F32;
    int64_t W = K * bits / 32, G = K / group;
    int64_t sw[3] = {n, N, W}, ss[3] = {n, N, G};
    int stacked = n > 1 || strstr(mlx_mod, "switch_mlp") != NULL;
    static const int kinds[3] = {OP_G2M_W, OP_G2M_S, OP_G2M_B};
    static const char *const suf[3] = {"weight", "scales", "biases"};
    for (int k = 0; k < 3; k++) {
        op *o = add(j, fmt(j, "%s.%s", mlx_mod, suf[k]), k ? out_sdt : QMIX_U32, kinds[k]);
        if (!o) return qmix_errf(j->err, "out of memory");
        o->mods = mods;
        o->n = n;
        o->bits = bits;
        o->group = group;
        o->rows = N;
        o->cols = K;
        if (stacked) shape2(o, 3, k ? ss : sw);
        else shape2(o, 2, k ? ss + 1 : sw + 1);
    }
    json_t *e = json_object();
    json_object_set_new(e, "group_size", json_integer(group));
    json_object_set_new(e, "bits", json_integer(bits));
    json_object_set_new(qblock, mlx_mod, e);
    return 0;
}

/* "…layers.L.mlp.experts.E.P.S" → E (and the prefix length up to E, and the rest after it). */
static int expert_index(const char *n, size_t *pre, const char **rest)
{
    const char *e = strstr(n, "mlp.experts.");
    if (!e || !strncmp(n, "mtp.", 4)) return -1;
    char *end;
    long v = strtol(e + 12, &end, 10);
    if (end == e + 12 || *end != '.') return -1;
    *pre = (size_t)(e + 12 - n);
    *rest = end + 1;
    return (int)v;
}

static int plan_gptq_to_mlx(job *j, json_t *qblock)
{
    int E = j->cfg.n_experts;
    for (uint64_t i = 0; i < qmix_st_count(j->st); i++) {
        const qmix_tensor *t = qmix_st_at(j->st, i);
        const char *n = t->name;
        if (!strncmp(n, "mtp.", 4)) continue;
        if (ends_with(n, ".qzeros") || ends_with(n, ".scales") || ends_with(n, ".g_idx")) continue;
        size_t pre;
        const char *rest;
        int e = expert_index(n, &pre, &rest);
        if (e > 0) continue; /* stacked with expert 0 */
        if (e == 0) {
            /* "…mlp.experts." + "0." + "gate_proj.qweight" → switch_mlp.gate_proj */
            const char *dot = strrchr(rest, '.');
            char proj[64];
            snprintf(proj, sizeof proj, "%.*s", (int)(dot - rest), rest);
            const char *base = to_mlx_name(j, fmt(j, "%.*s", (int)(pre - 8), n)); /* "…mlp." */
            const char *mlx_mod = fmt(j, "%sswitch_mlp.%s", base ? base : "", proj);
            const char **mods = calloc((size_t)E, sizeof *mods);
            const qmix_tensor **parts = calloc((size_t)E, sizeof *parts);
            if (!keep_str(j, (char *)mods) || !keep_str(j, (char *)parts) || !base || !mlx_mod)
                return qmix_errf(j->err, "out of memory");
            int quant = ends_with(n, ".qweight");
            for (int x = 0; x < E; x++) {
                mods[x] = fmt(j, "%.*s%d.%s", (int)pre, n, x, proj);
                const char *wn = fmt(j, "%s.%s", mods[x], quant ? "qweight" : "weight");
                if (!mods[x] || !wn) return qmix_errf(j->err, "out of memory");
                parts[x] = qmix_st_find(j->st, wn);
                if (!parts[x])
                    return qmix_errf(j->err, "%s: missing (config.json says %d experts)", wn, E);
            }
            if (quant) {
                if (plan_g2m_module(j, mlx_mod, mods, E, qblock)) return -1;
                continue;
            }
            if (t->ndim != 2) return qmix_errf(j->err, "%s: an expert weight must be 2-D", n);
            op *o = add(j, fmt(j, "%s.weight", mlx_mod), t->dtype, OP_STACK);
            if (!o) return qmix_errf(j->err, "out of memory");
            for (int x = 0; x < E; x++)
                if (parts[x]->dtype != t->dtype || parts[x]->nbytes != t->nbytes)
                    return qmix_errf(j->err, "%s: dtype/shape differs from expert 0's", mods[x]);
            o->parts = parts;
            o->n = E;
            int64_t shp[3] = {E, t->shape[0], t->shape[1]};
            shape2(o, 3, shp);
            continue;
        }
        if (strstr(n, "mlp.experts.gate_up_proj") || strstr(n, "mlp.experts.down_proj"))
            return qmix_errf(j->err, "%s: fused expert tensors in a GPTQ checkpoint are not "
                             "supported (GPTQ stores experts per module)", n);
        if (ends_with(n, ".qweight")) {
            const char *mod = fmt(j, "%.*s", (int)(strlen(n) - 8), n);
            const char **mods = calloc(1, sizeof *mods);
            if (!mod || !keep_str(j, (char *)mods)) return qmix_errf(j->err, "out of memory");
            mods[0] = mod;
            const char *mlx = to_mlx_name(j, fmt(j, "%s.weight", mod));
            if (!mlx) continue;
            if (plan_g2m_module(j, fmt(j, "%.*s", (int)(strlen(mlx) - 7), mlx), mods, 1, qblock))
                return -1;
            continue;
        }
        if (t->dtype == QMIX_I32 || t->dtype == QMIX_U32)
            return qmix_errf(j->err, "%s: integer tensor that is not part of a GPTQ module", n);
        if (!strcmp(n, "lm_head.weight") && j->cfg.tie_embeddings) continue;
        const char *out = to_mlx_name(j, n);
        if (!out) return qmix_errf(j->err, "out of memory");
        if (is_shifted_norm(n)) {
            if (add_norm(j, out, t, 1.0f)) return -1;
        } else if (ends_with(n, "conv1d.weight") && t->ndim == 3 && t->shape[1] == 1) {
            int64_t shp[3] = {t->shape[0], t->shape[2], 1}; /* [C, 1, K] → [C, K, 1]: same bytes */
            if (add_copy(j, out, t, 3, shp, 0)) return -1;
        } else if (add_copy(j, out, t, t->ndim, t->shape, 0)) {
            return -1;
        }
    }
    return 0;
}

/* ---- MLX → GPTQ plan --------------------------------------------------------------------- */

static const char *to_hf_name(job *j, const char *n)
{
    if (!strncmp(n, "language_model.model.", 21)) return fmt(j, "model.language_model.%s", n + 21);
    if (!strncmp(n, "language_model.lm_head", 22)) return fmt(j, "%s", n + 15);
    if (!strncmp(n, "vision_tower.", 13)) return fmt(j, "model.visual.%s", n + 13);
    return fmt(j, "%s", n);
}

static int gm_add(job *j, const char *name, int bits, int group)
{
    if (j->n_gm == j->cap_gm) {
        size_t cap = j->cap_gm ? 2 * j->cap_gm : 1024;
        qmix_gptq_module *a = realloc(j->gm, cap * sizeof *a);
        if (!a) return -1;
        j->gm = a;
        j->cap_gm = cap;
    }
    j->gm[j->n_gm++] = (qmix_gptq_module){.name = name, .bits = bits, .group = group, .sym = 1};
    return 0;
}

/* Modules vLLM builds unquantized (§2.8 item 5) and the embedding: dequantized to 16-bit. */
static int vllm_never_quantizes(const char *hf)
{
    return ends_with(hf, "mlp.gate") || ends_with(hf, "shared_expert_gate") ||
           ends_with(hf, "embed_tokens") || !strncmp(hf, "model.visual.", 13);
}

static int plan_mlx_to_gptq(job *j)
{
    for (uint64_t i = 0; i < qmix_st_count(j->st); i++) {
        const qmix_tensor *t = qmix_st_at(j->st, i);
        const char *n = t->name;
        size_t nl = strlen(n);
        char mod[600], sn[620], bn[620];
        if (t->dtype != QMIX_U32) {
            if (ends_with(n, ".scales") || ends_with(n, ".biases")) {
                snprintf(sn, sizeof sn, "%.*s.weight", (int)(nl - 7), n);
                const qmix_tensor *w = qmix_st_find(j->st, sn);
                if (w && w->dtype == QMIX_U32) continue; /* part of a quantized module */
            }
            const char *hf = to_hf_name(j, n);
            if (!hf) return qmix_errf(j->err, "out of memory");
            if (strstr(n, "switch_mlp.") && t->ndim == 3) { /* unquantized stacked experts */
                const char *s = strstr(hf, "switch_mlp.");
                for (int64_t e = 0; e < t->shape[0]; e++) {
                    const char *m = fmt(j, "%.*sexperts.%lld.%.*s", (int)(s - hf), hf,
                                        (long long)e, (int)(strlen(s + 11) - 7), s + 11);
                    uint64_t per = t->nbytes / (uint64_t)t->shape[0];
                    if (!m || add_copy(j, fmt(j, "%s.weight", m), t, 2, t->shape + 1,
                                       (uint64_t)e * per) || gm_add(j, m, 0, 0))
                        return qmix_errf(j->err, "out of memory");
                }
                continue;
            }
            if (is_shifted_norm(hf)) {
                if (add_norm(j, hf, t, -1.0f)) return -1;
            } else if (ends_with(n, "conv1d.weight") && t->ndim == 3 && t->shape[2] == 1) {
                int64_t shp[3] = {t->shape[0], 1, t->shape[1]};
                if (add_copy(j, hf, t, 3, shp, 0)) return -1;
            } else {
                if (add_copy(j, hf, t, t->ndim, t->shape, 0)) return -1;
                if (t->ndim == 2 && ends_with(hf, ".weight") &&
                    gm_add(j, fmt(j, "%.*s", (int)(strlen(hf) - 7), hf), 0, 0))
                    return qmix_errf(j->err, "out of memory");
            }
            continue;
        }
        if (!ends_with(n, ".weight") || nl - 7 >= sizeof mod)
            return qmix_errf(j->err, "%s: U32 tensor that is not a module weight", n);
        snprintf(mod, sizeof mod, "%.*s", (int)(nl - 7), n);
        snprintf(sn, sizeof sn, "%s.scales", mod);
        snprintf(bn, sizeof bn, "%s.biases", mod);
        const qmix_tensor *sc = qmix_st_find(j->st, sn), *bi = qmix_st_find(j->st, bn);
        int bits, group;
        int r = qmix_qconfig_module(j->qin, mod, sc != NULL, &bits, &group, j->err);
        if (r < 0) return -1;
        if (!r || !sc || !bi || t->ndim < 2 || t->ndim > 3 || sc->dtype != bi->dtype)
            return qmix_errf(j->err, "%s: U32 weight without usable scales/biases", n);
        int64_t nm = t->ndim == 3 ? t->shape[0] : 1, N = t->shape[t->ndim - 2];
        int64_t K = t->shape[t->ndim - 1] * 32 / bits;
        if (sc->shape[sc->ndim - 1] * group != K)
            return qmix_errf(j->err, "%s: packed width disagrees with bits=%d group=%d", n, bits,
                             group);
        const char *hfw = to_hf_name(j, n);
        if (!hfw) return qmix_errf(j->err, "out of memory");
        const char *hfmod = fmt(j, "%.*s", (int)(strlen(hfw) - 7), hfw);
        if (vllm_never_quantizes(hfmod)) { /* dequantized: vLLM expects a 16-bit weight */
            op *o = add(j, hfw, QMIX_BF16, OP_M2G_DEQ);
            if (!o) return qmix_errf(j->err, "out of memory");
            o->src = t, o->scales = sc, o->biases = bi, o->rows = N * nm, o->cols = K;
            o->bits = bits, o->group = group;
            int64_t shp[2] = {N * nm, K};
            shape2(o, 2, shp);
            j->n_kept16++;
            continue;
        }
        if (!qmix_gptq_bits_valid(bits))
            return qmix_errf(j->err, "module '%s' is %d-bit: GPTQ holds 2, 3, 4 or 8 bits; "
                             "re-quantize from the bf16 original with qmix quantize --format gptq",
                             mod, bits);
        if ((N * bits) % 32)
            return qmix_errf(j->err, "module '%s': %lld output channels cannot be packed into "
                             "GPTQ qzeros at %d bits", mod, (long long)N, bits);
        for (int64_t m = 0; m < nm; m++) {
            const char *gmod = hfmod;
            if (t->ndim == 3) {
                const char *s = strstr(hfmod, "switch_mlp.");
                if (!s) return qmix_errf(j->err, "%s: 3-D weight outside switch_mlp", n);
                gmod = fmt(j, "%.*sexperts.%lld.%s", (int)(s - hfmod), hfmod, (long long)m, s + 11);
            }
            if (!gmod || gm_add(j, gmod, bits, group)) return qmix_errf(j->err, "out of memory");
            static const int kinds[4] = {OP_M2G_QW, OP_M2G_QZ, OP_M2G_SC, OP_M2G_GI};
            for (int k = 0; k < 4; k++) {
                op *o = add(j, fmt(j, "%s%s", gmod, gptq_suffix[k]), k == 2 ? QMIX_F16 : QMIX_I32,
                            kinds[k]);
                if (!o) return qmix_errf(j->err, "out of memory");
                o->src = t, o->scales = sc, o->biases = bi, o->m = m, o->rows = N, o->cols = K;
                o->bits = bits, o->group = group, o->n = (int)(j->n_gm - 1);
                int64_t shp[2][2] = {{K * bits / 32, N}, {K / group, N * bits / 32}};
                if (k < 2) shape2(o, 2, shp[k]);
                else if (k == 2) shape2(o, 2, (int64_t[2]){K / group, N});
                else shape2(o, 1, &K);
            }
        }
    }
    return 0;
}

/* ---- writing ----------------------------------------------------------------------------- */

static float load_s(const qmix_tensor *t, int64_t i) { return elem(t, (uint64_t)i); }

/* Matrix m of an MLX module into the GPTQ cache: codes [N][W], f16 scales and true zeros [G][N].
 * Keeps the codes when every group maps exactly (§2.9), else re-quantizes the matrix. */
static int m2g_matrix(job *j, const op *o)
{
    int64_t N = o->rows, K = o->cols, G = K / o->group, W = K * o->bits / 32;
    size_t need = (size_t)(N * (W > G ? W : G));
    if (need > j->cache_cap) {
        free(j->codes), free(j->gsc), free(j->gz);
        j->codes = malloc(need * 4);
        j->gsc = malloc(need * 2);
        j->gz = malloc(need * 4);
        j->cache_cap = need;
        if (!j->codes || !j->gsc || !j->gz) {
            j->cache_cap = 0;
            return qmix_errf(j->err, "out of memory");
        }
    }
    const uint32_t maxq = (1u << o->bits) - 1, half = 1u << (o->bits - 1);
    const uint8_t *base = (const uint8_t *)o->src->data + (size_t)(o->m * N * W) * 4;
    memcpy(j->codes, base, (size_t)(N * W) * 4);
    int exact = 1, sym = 1;
    for (int64_t n = 0; n < N && exact; n++)
        for (int64_t g = 0; g < G && exact; g++) {
            float s = load_s(o->scales, (o->m * N + n) * G + g);
            float b = load_s(o->biases, (o->m * N + n) * G + g);
            /* MLX group = s·(q − zr) with zr = −β/s (§2.9); exact iff zr is an integer in
             * [0, maxq] that reproduces β (s·zr is exact in f32: an 11-bit scale times an 8-bit
             * integer) and |s| survives f16. A negative scale flips the codes: q' = maxq − q,
             * s' = −s, z' = maxq − zr. v1 zeros cannot hold a true zero of 0 (§2.3). */
            int flip = s < 0;
            float zr = s != 0 ? nearbyintf(-b / s) : (b == 0 ? (float)half : NAN);
            float as = fabsf(s);
            uint32_t z = 0;
            if (zr >= 0 && zr <= (float)maxq && (s == 0 || -s * zr == b) &&
                qk_f16_to_f32(qk_f32_to_f16(as)) == as)
                z = flip ? maxq - (uint32_t)zr : (uint32_t)zr;
            exact = z >= 1;
            if (exact && flip)
                for (int64_t k = g * o->group; k < (g + 1) * o->group; k++)
                    qmix_affine_set_code(j->codes + n * W, k, o->bits,
                                         maxq - qmix_affine_get_code(j->codes + n * W, k, o->bits));
            s = as;
            sym &= z == half;
            j->gsc[g * N + n] = qk_f32_to_f16(s);
            j->gz[g * N + n] = z;
        }
    if (exact) {
        j->gm[o->n].sym = sym;
        return 0;
    }
    /* re-quantize on the symmetric grid from the dequantized weights */
    float *row = malloc((size_t)K * sizeof *row), *sc = malloc((size_t)G * 2 * sizeof *sc);
    if (!row || !sc) {
        free(row), free(sc);
        return qmix_errf(j->err, "out of memory");
    }
    size_t ssz = qmix_dtype_size(o->scales->dtype);
    for (int64_t n = 0; n < N; n++) {
        int64_t r = o->m * N + n;
        qmix_affine_dequantize_row((const uint32_t *)(base + (size_t)(n * W) * 4),
                                   (const uint8_t *)o->scales->data + (size_t)(r * G) * ssz,
                                   (const uint8_t *)o->biases->data + (size_t)(r * G) * ssz,
                                   o->scales->dtype, K, o->bits, o->group, row);
        qmix_sym_quantize_row(row, NULL, K, o->bits, o->group, QMIX_F16, 0, j->codes + n * W, sc,
                              sc + G);
        for (int64_t g = 0; g < G; g++) {
            j->gsc[g * N + n] = qk_f32_to_f16(sc[g]);
            j->gz[g * N + n] = half;
        }
    }
    free(row);
    free(sc);
    j->gm[o->n].sym = 1;
    j->n_requant++;
    return 0;
}

static uint16_t to_dtype16(float v, qmix_dtype dt)
{
    return dt == QMIX_F16 ? qk_f32_to_f16(v) : qk_f32_to_bf16(v);
}

/* Appends n floats as dtype (F32, F16, BF16) through buf. */
static int put_floats(qmix_stw *f, const float *v, int64_t n, qmix_dtype dt, qmix_err *err)
{
    if (dt == QMIX_F32) return qmix_stw_write(f, v, (size_t)n * 4, err);
    uint16_t tmp[1024];
    for (int64_t i = 0; i < n; i += 1024) {
        int64_t k = n - i < 1024 ? n - i : 1024;
        for (int64_t x = 0; x < k; x++) tmp[x] = to_dtype16(v[i + x], dt);
        if (qmix_stw_write(f, tmp, (size_t)k * 2, err)) return -1;
    }
    return 0;
}

static int write_op(job *j, qmix_stw *f, const op *o)
{
    qmix_err *err = j->err;
    if (qmix_stw_begin(f, o->name, err)) return -1;
    switch (o->kind) {
    case OP_COPY:
        return qmix_stw_write(f, (const uint8_t *)o->src->data + o->offset, o->nbytes, err);
    case OP_STACK:
        for (int e = 0; e < o->n; e++)
            if (qmix_stw_write(f, o->parts[e]->data, o->parts[e]->nbytes, err)) return -1;
        return 0;
    case OP_NORM: {
        uint64_t n = o->src->nbytes / qmix_dtype_size(o->src->dtype);
        for (uint64_t i = 0; i < n; i++) {
            float v = elem(o->src, i) + o->delta;
            if (put_floats(f, &v, 1, o->dtype, err)) return -1;
        }
        return 0;
    }
    case OP_G2M_W: case OP_G2M_S: case OP_G2M_B:
        for (int e = 0; e < o->n; e++) {
            char nm[4][600];
            for (int k = 0; k < 4; k++) snprintf(nm[k], sizeof nm[k], "%s%s", o->mods[e], gptq_suffix[k]);
            qmix_gptq_unpacked u;
            if (qmix_gptq_unpack(o->mods[e], qmix_st_find(j->st, nm[0]), qmix_st_find(j->st, nm[1]),
                                 qmix_st_find(j->st, nm[2]), qmix_st_find(j->st, nm[3]), o->rows,
                                 o->cols, &j->info, &u, err))
                return -1;
            int64_t G = u.cols / u.group;
            int rc = o->kind == OP_G2M_W
                         ? qmix_stw_write(f, u.codes, (size_t)(u.rows * u.cols * u.bits / 32) * 4, err)
                         : put_floats(f, o->kind == OP_G2M_S ? u.scales : u.biases, u.rows * G,
                                      o->dtype, err);
            qmix_gptq_unpacked_free(&u);
            if (rc) return -1;
        }
        return 0;
    case OP_M2G_DEQ: {
        int64_t W = o->cols * o->bits / 32, G = o->cols / o->group;
        size_t ssz = qmix_dtype_size(o->scales->dtype);
        float *row = malloc((size_t)o->cols * sizeof *row);
        if (!row) return qmix_errf(err, "out of memory");
        for (int64_t r = 0; r < o->rows; r++) {
            qmix_affine_dequantize_row((const uint32_t *)o->src->data + r * W,
                                       (const uint8_t *)o->scales->data + (size_t)(r * G) * ssz,
                                       (const uint8_t *)o->biases->data + (size_t)(r * G) * ssz,
                                       o->scales->dtype, o->cols, o->bits, o->group, row);
            if (put_floats(f, row, o->cols, o->dtype, err)) {
                free(row);
                return -1;
            }
        }
        free(row);
        return 0;
    }
    default: break;
    }
    int64_t N = o->rows, K = o->cols, G = K / o->group, W = K * o->bits / 32;
    if (o->kind == OP_M2G_QW) {
        if (m2g_matrix(j, o)) return -1;
        uint32_t col[1024];
        for (int64_t w = 0; w < W; w++) /* qweight[w][n] = row n's word w (§2.2) */
            for (int64_t n0 = 0; n0 < N; n0 += 1024) {
                int64_t k = N - n0 < 1024 ? N - n0 : 1024;
                for (int64_t x = 0; x < k; x++) col[x] = j->codes[(n0 + x) * W + w];
                if (qmix_stw_write(f, col, (size_t)k * 4, err)) return -1;
            }
        return 0;
    }
    if (o->kind == OP_M2G_SC) return qmix_stw_write(f, j->gsc, (size_t)(G * N) * 2, err);
    if (o->kind == OP_M2G_GI) {
        for (int64_t k = 0; k < K; k++) {
            int32_t v = (int32_t)(k / o->group);
            if (qmix_stw_write(f, &v, 4, err)) return -1;
        }
        return 0;
    }
    /* qzeros: v1 (stored = z − 1, field-wise; z ≥ 1 by construction) */
    uint32_t *zr = calloc((size_t)(N * o->bits / 32) + 1, 4);
    if (!zr) return qmix_errf(err, "out of memory");
    for (int64_t g = 0; g < G; g++) {
        memset(zr, 0, (size_t)(N * o->bits / 32) * 4);
        for (int64_t n = 0; n < N; n++) qmix_affine_set_code(zr, n, o->bits, j->gz[g * N + n] - 1);
        if (qmix_stw_write(f, zr, (size_t)(N * o->bits / 32) * 4, err)) {
            free(zr);
            return -1;
        }
    }
    free(zr);
    return 0;
}

static int write_all(job *j, const char *out, const char *fmt_meta)
{
    uint64_t limit = (uint64_t)5 << 30, cur = 0, total = 0, params = 0;
    int shard = 0;
    int *sh = malloc((j->n + 1) * sizeof *sh);
    const char **names = calloc(j->n + 1, sizeof *names), **files = calloc(j->n + 1, sizeof *files);
    qmix_stw_tensor *specs = calloc(j->n + 1, sizeof *specs);
    char (*fn)[64] = NULL;
    int rc = -1;
    if (!sh || !names || !files || !specs) {
        qmix_errf(j->err, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < j->n; i++) {
        if (cur && cur + j->ops[i].nbytes > limit) shard++, cur = 0;
        cur += j->ops[i].nbytes;
        total += j->ops[i].nbytes;
        sh[i] = shard;
        const op *o = &j->ops[i];
        if (o->kind == OP_M2G_QW || (o->kind == OP_G2M_W))
            params += (uint64_t)o->rows * (uint64_t)o->cols * (uint64_t)(o->kind == OP_G2M_W ? o->n : 1);
        else if (o->kind <= OP_STACK || o->kind == OP_M2G_DEQ)
            params += o->nbytes / qmix_dtype_size(o->dtype);
    }
    int n_shards = j->n ? shard + 1 : 0;
    fn = calloc((size_t)n_shards + 1, sizeof *fn);
    if (!fn) {
        qmix_errf(j->err, "out of memory");
        goto done;
    }
    qmix_stw_kv meta[1] = {{"format", fmt_meta}};
    size_t i = 0;
    for (int s = 0; s < n_shards; s++) {
        if (n_shards == 1) snprintf(fn[s], sizeof fn[s], "model.safetensors");
        else snprintf(fn[s], sizeof fn[s], "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        size_t k0 = i;
        for (; i < j->n && sh[i] == s; i++) {
            specs[i - k0] = (qmix_stw_tensor){.name = j->ops[i].name, .dtype = j->ops[i].dtype,
                                              .ndim = j->ops[i].ndim};
            memcpy(specs[i - k0].shape, j->ops[i].shape, sizeof specs[0].shape);
            names[i] = j->ops[i].name;
            files[i] = fn[s];
        }
        char *path = join(out, fn[s]);
        qmix_stw *f = NULL;
        if (!path || qmix_stw_open(path, specs, i - k0, meta, 1, &f, j->err)) {
            free(path);
            goto done;
        }
        free(path);
        for (size_t k = k0; k < i; k++) {
            if (write_op(j, f, &j->ops[k])) {
                qmix_stw_discard(f);
                goto done;
            }
            if (j->progress && (k % 4096 == 0 || k + 1 == j->n))
                fprintf(stderr, "\rconvert: %zu of %zu tensors", k + 1, j->n);
        }
        if (qmix_stw_close(f, j->err)) goto done;
    }
    if (j->progress) fprintf(stderr, "\n");
    char *ip = join(out, "model.safetensors.index.json");
    rc = !ip || qmix_st_write_index(ip, total, params, names, files, j->n, j->err) ? -1 : 0;
    free(ip);
done:
    free(sh);
    free(names);
    free(files);
    free(specs);
    free(fn);
    return rc;
}

static int copy_side_files(const char *in, const char *out, qmix_err *err)
{
    static const char *side[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                 "chat_template.jinja", "chat_template.json", "vocab.json",
                                 "merges.txt", "special_tokens_map.json", "added_tokens.json",
                                 "preprocessor_config.json", "processor_config.json",
                                 "video_preprocessor_config.json"};
    for (size_t i = 0; i < sizeof side / sizeof side[0]; i++) {
        char *a = join(in, side[i]), *b = join(out, side[i]);
        int rc = !a || !b ? qmix_errf(err, "out of memory") : qmix_copy_file(a, b, 1, err);
        free(a);
        free(b);
        if (rc) return -1;
    }
    return 0;
}

static int run(job *j, const char *in, const char *out, int to_mlx)
{
    qmix_err *err = j->err;
    /* built in OUT.partial-PID, moved to out when complete (util/fileio.h) */
    qmix_outdir od = {0};
    char *cfgp = join(in, "config.json"), *dst = NULL;
    json_t *root = NULL, *qblock = NULL, *qc = NULL;
    int rc = -1;
    json_error_t je;
    if (!cfgp || qmix_config_load(cfgp, &j->cfg, err)) goto done;
    int g = qmix_gptq_info_load(cfgp, &j->info, err);
    if (g < 0) goto done;
    if (to_mlx && !g) {
        qmix_errf(err, "%s: not a GPTQ checkpoint (no quantization_config.quant_method \"gptq\")", in);
        goto done;
    }
    if (!to_mlx && g) {
        qmix_errf(err, "%s is already a GPTQ checkpoint", in);
        goto done;
    }
    if (!to_mlx && qmix_qconfig_load(cfgp, &j->qin, err)) goto done;
    if (!to_mlx && !j->qin) {
        qmix_errf(err, "%s: not a quantized MLX checkpoint (no `quantization` block); quantize the "
                  "bf16 original with qmix quantize IN OUT --recipe R --format gptq", in);
        goto done;
    }
    if (qmix_st_open(in, (qmix_st_store **)&j->st, err)) goto done;
    qblock = json_object();
    if (to_mlx ? plan_gptq_to_mlx(j, qblock) : plan_mlx_to_gptq(j)) goto done;
    qmix_gptq_qconfig_opts qo = {.n_layers = j->cfg.n_layers, .quantizer = "qmix convert"};
    int non_marlin = 0;
    if (!to_mlx) { /* §2.8 checks before anything is written (sym decided per matrix later) */
        for (size_t i = 0; i < j->n; i++)
            qo.has_vision |= !strncmp(j->ops[i].name, "model.visual.", 13);
        if (qmix_gptq_build_qconfig(j->gm, j->n_gm, &qo, &qc, &non_marlin, err)) goto done;
        json_decref(qc);
        qc = NULL;
    }
    if (qmix_outdir_begin(&od, out, err)) goto done;
    out = od.work;
    if (!(dst = join(out, "config.json"))) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    /* side files and weights first; config.json, the file that makes it a model, last */
    if (copy_side_files(in, out, err) || write_all(j, out, to_mlx ? "mlx" : "pt")) goto done;
    root = json_load_file(cfgp, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        qmix_errf(err, "%s: cannot read config.json", in);
        goto done;
    }
    json_object_del(root, "quantization");
    json_object_del(root, "quantization_config");
    if (to_mlx) { /* §1.6: defaults, then an object per module (every one, explicit) */
        json_t *q = json_object();
        json_object_set_new(q, "group_size", json_integer(j->info.group > 0 ? j->info.group : 64));
        json_object_set_new(q, "bits", json_integer(j->info.bits));
        json_object_set_new(q, "mode", json_string("affine"));
        json_object_update(q, qblock);
        json_object_set_new(root, "quantization_config", json_deep_copy(q));
        json_object_set_new(root, "quantization", q);
        if (qmix_write_json(dst, root, JSON_INDENT(4) | JSON_SORT_KEYS, err)) goto done;
    } else {
        if (qmix_gptq_build_qconfig(j->gm, j->n_gm, &qo, &qc, &non_marlin, err)) goto done;
        json_object_set(root, "quantization_config", qc);
        char *qdst = join(out, "quantize_config.json");
        int w = !qdst ? qmix_errf(err, "out of memory")
                      : qmix_write_json(qdst, qc, JSON_INDENT(2), err) ||
                            qmix_write_json(dst, root, JSON_INDENT(2), err);
        free(qdst);
        if (w) goto done;
        if (j->n_requant)
            fprintf(stderr, "qmix convert: warning: %lld matrices had groups that are not "
                    "s·(q − z) with an integer zero in [1, maxq]: re-quantized (symmetric RTN "
                    "from the dequantized weights), not exact\n", (long long)j->n_requant);
        if (j->n_kept16)
            fprintf(stderr, "qmix convert: note: %lld modules vLLM never quantizes (router, "
                    "shared-expert gate, embedding, vision) were dequantized to bf16\n",
                    (long long)j->n_kept16);
        if (non_marlin)
            fprintf(stderr, "qmix convert: note: %d modules are outside vLLM's Marlin kernels "
                    "(asymmetric or 2/3-bit)\n", non_marlin);
    }
    if (qmix_outdir_commit(&od, err)) goto done;
    rc = 0;
done:
    qmix_outdir_abandon(&od);
    json_decref(root);
    json_decref(qblock);
    json_decref(qc);
    free(cfgp);
    free(dst);
    return rc;
}

int convert_gptq(const char *in, const char *out, const char *to, int progress)
{
    int to_mlx = !strcmp(to, "mlx");
    if (!to_mlx && strcmp(to, "gptq")) {
        fprintf(stderr, "qmix convert: --to %s: expected mlx or gptq\n", to);
        return 2;
    }
    qmix_err err;
    job j = {.err = &err, .progress = progress};
    int rc = run(&j, in, out, to_mlx);
    if (rc) fprintf(stderr, "qmix convert: %s -> %s: %s\n", in, out, err.msg);
    qmix_st_close((qmix_st_store *)j.st);
    qmix_qconfig_free(j.qin);
    for (size_t i = 0; i < j.n_strs; i++) free(j.strs[i]);
    free(j.strs);
    free(j.ops);
    free(j.gm);
    free(j.codes);
    free(j.gsc);
    free(j.gz);
    return rc ? 1 : 0;
}

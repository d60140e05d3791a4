/* Binds every text-model tensor by its real name, checking shape and dtype, to views into the
 * mapped checkpoint. */
#include "model/model.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "formats/config.h"
#include "formats/gguf.h"
#include "quant/affine.h"
#include "quant/gptq_format.h"
#include "quant/quantize.h"
#include "util/err.h"

typedef struct binder {
    qmix_model *m;
    qmix_err *err;
    qmix_qconfig *q;         /* MLX quantization block, or NULL */
    float *f32_next;         /* bump allocator inside m->f32_pool */
    char name[512];
} binder;

static const qmix_tensor *find(binder *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static const qmix_tensor *find(binder *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    return qmix_st_find(b->m->store, b->name);
}

static int is_float_dtype(qmix_dtype dt) { return dt == QMIX_F32 || dt == QMIX_F16 || dt == QMIX_BF16; }

static void shape_str(const qmix_tensor *t, char *buf, size_t len)
{
    size_t off = (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < t->ndim && off < len; d++)
        off += (size_t)snprintf(buf + off, len - off, "%s%lld", d ? ", " : "",
                                (long long)t->shape[d]);
    if (off < len) snprintf(buf + off, len - off, "]");
}

/* Checks t (already looked up as b->name) has exactly the expected dims. */
static int check_shape(binder *b, const qmix_tensor *t, int ndim, const int64_t *dims)
{
    if (!t) return qmix_errf(b->err, "missing tensor '%s'", b->name);
    if (!is_float_dtype(t->dtype))
        return qmix_errf(b->err, "tensor '%s': dtype %s not supported here (expected BF16, F16 "
                         "or F32)", b->name, qmix_dtype_st_name(t->dtype));
    int ok = t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = t->shape[d] == dims[d];
    if (!ok) {
        char got[128], want[128];
        qmix_tensor fake = {.ndim = ndim};
        memcpy(fake.shape, dims, sizeof(int64_t) * (size_t)ndim);
        shape_str(t, got, sizeof got);
        shape_str(&fake, want, sizeof want);
        return qmix_errf(b->err, "tensor '%s' has shape %s, expected %s", b->name, got, want);
    }
    return 0;
}

static qk_mat mat_view(const qmix_tensor *t, int64_t rows, int64_t cols, uint64_t byte_offset)
{
    size_t esz = qmix_dtype_size(t->dtype);
    return (qk_mat){.dtype = t->dtype, .rows = rows, .cols = cols, .row_bytes = (size_t)cols * esz,
                    .data = (const uint8_t *)t->data + byte_offset};
}

static int keep_block(qmix_model *m, void *p)
{
    if (m->n_repacked == m->cap_repacked) {
        size_t cap = m->cap_repacked ? 2 * m->cap_repacked : 256;
        void **a = realloc(m->repacked, cap * sizeof *a);
        if (!a) return -1;
        m->repacked = a;
        m->cap_repacked = cap;
    }
    m->repacked[m->n_repacked++] = p;
    return 0;
}

/* A GPTQ module (spec/quant-formats.md §2): module.{qweight,qzeros,scales,g_idx}. It is repacked
 * at load time into qmix's MLX-affine matrix (codes transposed to rows, float32 scales and
 * biases −s·z), so every kernel runs it unchanged; this costs a heap copy of the module instead
 * of a zero-copy view of the mapping. Only trivial g_idx is accepted (act-order files with
 * scattered groups cannot be contiguous groups). */
static int bind_gptq(binder *b, const char *module, int64_t rows, int64_t cols, qk_mat *out)
{
    const qmix_st_store *st = b->m->store;
    char n[4][540];
    static const char *const suffix[4] = {"qweight", "qzeros", "scales", "g_idx"};
    for (int k = 0; k < 4; k++) snprintf(n[k], sizeof n[k], "%s.%s", module, suffix[k]);
    qmix_gptq_unpacked u;
    if (qmix_gptq_unpack(module, qmix_st_find(st, n[0]), qmix_st_find(st, n[1]),
                         qmix_st_find(st, n[2]), qmix_st_find(st, n[3]), rows, cols, b->m->gptq,
                         &u, b->err))
        return -1;
    if (keep_block(b->m, u.codes) || keep_block(b->m, u.scales) || keep_block(b->m, u.biases)) {
        qmix_gptq_unpacked_free(&u);
        return qmix_errf(b->err, "out of memory");
    }
    int64_t G = cols / u.group;
    *out = (qk_mat){.dtype = QMIX_U32, .rows = rows, .cols = cols,
                    .row_bytes = (size_t)qmix_affine_row_words(cols, u.bits) * 4, .data = u.codes,
                    .bits = u.bits, .group_size = u.group, .scale_dtype = QMIX_F32,
                    .scales = u.scales, .biases = u.biases, .scale_row_bytes = (size_t)G * 4};
    return 0;
}

/* Binds b->name (a module's ".weight"): nmat stacked [rows, cols] matrices (nmat 0: a plain 2-D
 * tensor) into out[max(nmat, 1)]. A U32 weight is MLX affine codes: bits and group size come from
 * the config's quantization block (§1.6 rule) and are cross-checked against the packed widths. */
static int bind_any(binder *b, int64_t nmat, int64_t rows, int64_t cols, qk_mat *out)
{
    const qmix_tensor *t = qmix_st_find(b->m->store, b->name);
    int nd = nmat ? 3 : 2;
    int64_t dims[3], *dp = dims;
    if (nmat) *dp++ = nmat;
    dp[0] = rows;
    dp[1] = cols;
    char module[512];
    size_t nl = strlen(b->name);
    int is_weight = nl > 7 && !strcmp(b->name + nl - 7, ".weight");
    snprintf(module, sizeof module, "%.*s", (int)(is_weight ? nl - 7 : nl), b->name);
    if (!t && b->m->gptq && is_weight && !nmat) {
        char qn[530];
        snprintf(qn, sizeof qn, "%s.qweight", module);
        if (qmix_st_find(b->m->store, qn)) return bind_gptq(b, module, rows, cols, out);
    }
    if (!t || t->dtype != QMIX_U32) {
        if (check_shape(b, t, nd, dims)) return -1;
        if (b->q && is_weight) {
            int bits, group;
            int r = qmix_qconfig_module(b->q, module, 0, &bits, &group, b->err);
            if (r < 0) return -1;
            if (r)
                return qmix_errf(b->err, "module '%s': config.json says it is quantized (bits=%d, "
                                 "group_size=%d) but its weight is %s", module, bits, group,
                                 qmix_dtype_st_name(t->dtype));
        }
        size_t esz = qmix_dtype_size(t->dtype);
        for (int64_t e = 0; e < (nmat ? nmat : 1); e++)
            out[e] = mat_view(t, rows, cols, (uint64_t)(e * rows * cols) * esz);
        return 0;
    }
    char sn[530], bn[530];
    snprintf(sn, sizeof sn, "%s.scales", module);
    snprintf(bn, sizeof bn, "%s.biases", module);
    const qmix_tensor *sc = qmix_st_find(b->m->store, sn), *bi = qmix_st_find(b->m->store, bn);
    int bits = 0, group = 0;
    int r = is_weight ? qmix_qconfig_module(b->q, module, sc != NULL, &bits, &group, b->err) : 0;
    if (r < 0) return -1;
    if (!r)
        return qmix_errf(b->err, "module '%s': weight is U32 (packed codes) but config.json does "
                         "not say it is quantized", module);
    if (!sc || !bi)
        return qmix_errf(b->err, "module '%s': quantized weight without %s", module,
                         sc ? "biases" : "scales");
    if (!is_float_dtype(sc->dtype) || sc->dtype != bi->dtype)
        return qmix_errf(b->err, "module '%s': scales/biases must both be BF16, F16 or F32",
                         module);
    int ok = t->ndim == nd && sc->ndim == nd && bi->ndim == nd;
    for (int d = 0; ok && d < nd - 1; d++)
        ok = t->shape[d] == dims[d] && sc->shape[d] == dims[d] && bi->shape[d] == dims[d];
    if (!ok || sc->shape[nd - 1] != bi->shape[nd - 1]) {
        char want[128];
        qmix_tensor fake = {.ndim = nd};
        memcpy(fake.shape, dims, sizeof dims);
        shape_str(&fake, want, sizeof want);
        return qmix_errf(b->err, "module '%s': quantized weight/scales/biases do not match the "
                         "logical shape %s", module, want);
    }
    int64_t W = t->shape[nd - 1], S = sc->shape[nd - 1];
    if (W * 32 != cols * bits || S * group != cols) {
        char bits_s[32], group_s[32];
        if ((W * 32) % cols) snprintf(bits_s, sizeof bits_s, "%.3g", (double)W * 32 / (double)cols);
        else snprintf(bits_s, sizeof bits_s, "%lld", (long long)(W * 32 / cols));
        if (!S || cols % S) snprintf(group_s, sizeof group_s, "%.3g", S ? (double)cols / (double)S : 0.0);
        else snprintf(group_s, sizeof group_s, "%lld", (long long)(cols / S));
        return qmix_errf(b->err, "module '%s': config.json says bits=%d group_size=%d, but the "
                         "packed weight has %lld words per row and the scales %lld groups for %lld "
                         "inputs (bits=%s, group_size=%s)", module, bits, group, (long long)W,
                         (long long)S, (long long)cols, bits_s, group_s);
    }
    size_t ssz = qmix_dtype_size(sc->dtype);
    for (int64_t e = 0; e < (nmat ? nmat : 1); e++) {
        out[e] = (qk_mat){.dtype = QMIX_U32, .rows = rows, .cols = cols,
                          .row_bytes = (size_t)W * 4,
                          .data = (const uint8_t *)t->data + (size_t)(e * rows * W) * 4,
                          .bits = bits, .group_size = group, .scale_dtype = sc->dtype,
                          .scales = (const uint8_t *)sc->data + (size_t)(e * rows * S) * ssz,
                          .biases = (const uint8_t *)bi->data + (size_t)(e * rows * S) * ssz,
                          .scale_row_bytes = (size_t)S * ssz};
    }
    return 0;
}

static int bind_mat(binder *b, qk_mat *out, int64_t rows, int64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int bind_mat(binder *b, qk_mat *out, int64_t rows, int64_t cols, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    return bind_any(b, 0, rows, cols, out);
}

enum { AS_IS, ONE_PLUS, NEG_EXP };

/* Widens a small parameter of n elements (any of the accepted shapes) to float32. */
static int bind_vec(binder *b, float **out, int64_t n, int transform, int ndim, const int64_t *dims)
{
    const qmix_tensor *t = qmix_st_find(b->m->store, b->name);
    if (check_shape(b, t, ndim, dims)) return -1;
    qk_mat row = {.dtype = t->dtype, .rows = 1, .cols = n, .row_bytes = t->nbytes, .data = t->data};
    float *v = b->f32_next;
    b->f32_next += n;
    qk_mat_row_f32(&row, 0, v);
    for (int64_t i = 0; i < n; i++) {
        if (transform == ONE_PLUS) v[i] = 1.0f + v[i];
        else if (transform == NEG_EXP) v[i] = -expf(v[i]);
    }
    *out = v;
    return 0;
}

static int bind_1d(binder *b, float **out, int64_t n, int transform, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int bind_1d(binder *b, float **out, int64_t n, int transform, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->name, sizeof b->name, fmt, ap);
    va_end(ap);
    return bind_vec(b, out, n, transform, 1, &n);
}

/* Float32 elements needed for all widened parameters, so they share one allocation. */
static size_t f32_pool_size(const qmix_config *c)
{
    size_t C = (size_t)2 * c->lin_n_k_heads * c->lin_k_head_dim +
               (size_t)c->lin_n_v_heads * c->lin_v_head_dim;
    size_t per_linear = C * c->conv_kernel + 2 * (size_t)c->lin_n_v_heads + c->lin_v_head_dim;
    size_t per_full = 2 * (size_t)c->head_dim;
    size_t total = c->hidden_size;
    for (int i = 0; i < c->n_layers; i++)
        total += 2 * (size_t)c->hidden_size + (c->layer_is_full[i] ? per_full : per_linear);
    return total;
}

size_t qmix_model_heap_bytes(const qmix_config *c)
{
    return sizeof(qmix_model) + f32_pool_size(c) * sizeof(float) +
           (size_t)c->n_layers * sizeof(qmix_layer) +
           (size_t)c->n_layers * (size_t)c->n_experts * sizeof(qmix_expert);
}

/* Layer i's routed experts under prefix p, stored as MLX switch_mlp (sw), fused 3-D tensors
 * (fused) or one module per expert. */
static int bind_experts(binder *b, qmix_layer *ly, const char *p, int i, qmix_expert *experts,
                        int fused, int sw)
{
    const qmix_config *c = &b->m->cfg;
    int64_t E = c->n_experts, F = c->moe_ffn, D = c->hidden_size;
    ly->experts = experts;
    if (sw) {
        static const char *proj[3] = {"gate_proj", "up_proj", "down_proj"};
        qk_mat *tmp = malloc((size_t)E * sizeof *tmp);
        if (!tmp) return qmix_errf(b->err, "out of memory");
        for (int k = 0; k < 3; k++) {
            snprintf(b->name, sizeof b->name, "%slayers.%d.mlp.switch_mlp.%s.weight", p, i,
                     proj[k]);
            if (bind_any(b, E, k == 2 ? D : F, k == 2 ? F : D, tmp)) {
                free(tmp);
                return -1;
            }
            for (int64_t e = 0; e < E; e++) {
                if (k == 0) experts[e].gate = tmp[e];
                else if (k == 1) experts[e].up = tmp[e];
                else experts[e].down = tmp[e];
            }
        }
        free(tmp);
        return 0;
    }
    if (fused) {
        const qmix_tensor *gu = find(b, "%slayers.%d.mlp.experts.gate_up_proj", p, i);
        int64_t gu_dims[3] = {E, 2 * F, D};
        if (check_shape(b, gu, 3, gu_dims)) return -1;
        const qmix_tensor *dn = find(b, "%slayers.%d.mlp.experts.down_proj", p, i);
        int64_t dn_dims[3] = {E, D, F};
        if (check_shape(b, dn, 3, dn_dims)) return -1;
        size_t gesz = qmix_dtype_size(gu->dtype), desz = qmix_dtype_size(dn->dtype);
        for (int64_t e = 0; e < E; e++) {
            uint64_t base = (uint64_t)(e * 2 * F * D) * gesz;
            experts[e].gate = mat_view(gu, F, D, base);
            experts[e].up = mat_view(gu, F, D, base + (uint64_t)(F * D) * gesz);
            experts[e].down = mat_view(dn, D, F, (uint64_t)(e * D * F) * desz);
        }
        return 0;
    }
    for (int64_t e = 0; e < E; e++) {
        if (bind_mat(b, &experts[e].gate, F, D, "%slayers.%d.mlp.experts.%lld.gate_proj.weight", p,
                     i, (long long)e) ||
            bind_mat(b, &experts[e].up, F, D, "%slayers.%d.mlp.experts.%lld.up_proj.weight", p, i,
                     (long long)e) ||
            bind_mat(b, &experts[e].down, D, F, "%slayers.%d.mlp.experts.%lld.down_proj.weight", p,
                     i, (long long)e))
            return -1;
    }
    return 0;
}

/* Decoder layer i under prefix p (the trunk's, or "mtp." for the MTP block's layer 0) into ly. */
static int bind_layer_at(binder *b, qmix_layer *ly, const char *p, int i, int is_full,
                         qmix_expert *experts, int fused, int sw)
{
    qmix_model *m = b->m;
    const int ONE_PLUS_ = m->norms_shifted ? AS_IS : ONE_PLUS;
    const qmix_config *c = &m->cfg;
    int64_t D = c->hidden_size;
    ly->is_full = is_full;
    if (bind_1d(b, &ly->input_norm, D, ONE_PLUS_, "%slayers.%d.input_layernorm.weight", p, i) ||
        bind_1d(b, &ly->post_norm, D, ONE_PLUS_, "%slayers.%d.post_attention_layernorm.weight", p, i))
        return -1;
    if (ly->is_full) {
        int64_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
        if (bind_mat(b, &ly->q_proj, H * hd * 2, D, "%slayers.%d.self_attn.q_proj.weight", p, i) ||
            bind_mat(b, &ly->k_proj, KV * hd, D, "%slayers.%d.self_attn.k_proj.weight", p, i) ||
            bind_mat(b, &ly->v_proj, KV * hd, D, "%slayers.%d.self_attn.v_proj.weight", p, i) ||
            bind_mat(b, &ly->o_proj, D, H * hd, "%slayers.%d.self_attn.o_proj.weight", p, i) ||
            bind_1d(b, &ly->q_norm, hd, ONE_PLUS_, "%slayers.%d.self_attn.q_norm.weight", p, i) ||
            bind_1d(b, &ly->k_norm, hd, ONE_PLUS_, "%slayers.%d.self_attn.k_norm.weight", p, i))
            return -1;
    } else {
        int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
                dv = c->lin_v_head_dim, Kc = c->conv_kernel;
        int64_t C = 2 * nk * dk + nv * dv;
        if (bind_mat(b, &ly->in_qkv, C, D, "%slayers.%d.linear_attn.in_proj_qkv.weight", p, i) ||
            bind_mat(b, &ly->in_z, nv * dv, D, "%slayers.%d.linear_attn.in_proj_z.weight", p, i) ||
            bind_mat(b, &ly->in_b, nv, D, "%slayers.%d.linear_attn.in_proj_b.weight", p, i) ||
            bind_mat(b, &ly->in_a, nv, D, "%slayers.%d.linear_attn.in_proj_a.weight", p, i) ||
            bind_mat(b, &ly->out_proj, D, nv * dv, "%slayers.%d.linear_attn.out_proj.weight", p,
                     i) ||
            bind_1d(b, &ly->neg_exp_A, nv, NEG_EXP, "%slayers.%d.linear_attn.A_log", p, i) ||
            bind_1d(b, &ly->dt_bias, nv, AS_IS, "%slayers.%d.linear_attn.dt_bias", p, i) ||
            bind_1d(b, &ly->gdn_norm, dv, AS_IS, "%slayers.%d.linear_attn.norm.weight", p, i))
            return -1;
        /* conv1d is [C, 1, Kc] in HF checkpoints, [C, Kc, 1] in MLX ones (the same bytes);
         * accept the squeezed [C, Kc] too */
        const qmix_tensor *cw = find(b, "%slayers.%d.linear_attn.conv1d.weight", p, i);
        int64_t d3[3] = {C, 1, Kc}, d2[2] = {C, Kc}, dm[3] = {C, Kc, 1};
        int mlx_conv = m->mlx_layout && cw && cw->ndim == 3 && cw->shape[2] == 1 && Kc != 1;
        if (cw && cw->ndim == 2 ? bind_vec(b, &ly->conv_w, C * Kc, AS_IS, 2, d2)
            : mlx_conv          ? bind_vec(b, &ly->conv_w, C * Kc, AS_IS, 3, dm)
                                : bind_vec(b, &ly->conv_w, C * Kc, AS_IS, 3, d3))
            return -1;
    }
    int64_t E = c->n_experts, Fs = c->shared_ffn;
    if (bind_mat(b, &ly->router, E, D, "%slayers.%d.mlp.gate.weight", p, i) ||
        bind_mat(b, &ly->shared_gate, Fs, D, "%slayers.%d.mlp.shared_expert.gate_proj.weight", p,
                 i) ||
        bind_mat(b, &ly->shared_up, Fs, D, "%slayers.%d.mlp.shared_expert.up_proj.weight", p, i) ||
        bind_mat(b, &ly->shared_down, D, Fs, "%slayers.%d.mlp.shared_expert.down_proj.weight", p,
                 i) ||
        bind_mat(b, &ly->shared_expert_gate, 1, D, "%slayers.%d.mlp.shared_expert_gate.weight", p,
                 i))
        return -1;
    return bind_experts(b, ly, p, i, experts, fused, sw);
}

static int bind_layer(binder *b, int i)
{
    qmix_model *m = b->m;
    return bind_layer_at(b, &m->layers[i], m->prefix, i, m->cfg.layer_is_full[i],
                         m->expert_pool + (size_t)i * m->cfg.n_experts, m->experts_fused,
                         m->experts_switch);
}

/* The MTP block, if the checkpoint has one (mtp.fc.weight): its layer is a full-attention MoE
 * layer named like the trunk's, its experts per expert in the releases (fused or MLX-stacked
 * accepted too). Norms follow the trunk's convention (1 + w unless stored shifted). */
qmix_mtp *qmix_mtp_alloc(qmix_model *m, qmix_err *err)
{
    const qmix_config *c = &m->cfg;
    qmix_mtp *mtp = calloc(1, sizeof *mtp);
    if (!mtp) {
        qmix_errf(err, "out of memory");
        return NULL;
    }
    m->mtp = mtp; /* freed with the model from here on, whatever fails next */
    mtp->experts = calloc((size_t)c->n_experts, sizeof *mtp->experts);
    mtp->f32_pool = malloc(qmix_mtp_f32_floats(c) * sizeof(float));
    if (!mtp->experts || !mtp->f32_pool) {
        qmix_errf(err, "out of memory");
        return NULL;
    }
    return mtp;
}

static int bind_mtp(binder *b)
{
    qmix_model *m = b->m;
    const qmix_config *c = &m->cfg;
    if (!qmix_st_find(m->store, "mtp.fc.weight") &&
        !(m->gptq && qmix_st_find(m->store, "mtp.fc.qweight")))
        return 0;
    int64_t D = c->hidden_size;
    qmix_mtp *mtp = qmix_mtp_alloc(m, b->err);
    if (!mtp) return -1;
    float *saved = b->f32_next;
    b->f32_next = mtp->f32_pool;
    const int ONE_PLUS_ = m->norms_shifted ? AS_IS : ONE_PLUS;
    int fused = qmix_st_find(m->store, "mtp.layers.0.mlp.experts.gate_up_proj") != NULL;
    int sw = qmix_st_find(m->store, "mtp.layers.0.mlp.switch_mlp.gate_proj.weight") != NULL;
    int rc = bind_mat(b, &mtp->fc, D, 2 * D, "mtp.fc.weight") ||
             bind_1d(b, &mtp->norm_embed, D, ONE_PLUS_, "mtp.pre_fc_norm_embedding.weight") ||
             bind_1d(b, &mtp->norm_hidden, D, ONE_PLUS_, "mtp.pre_fc_norm_hidden.weight") ||
             bind_1d(b, &mtp->norm, D, ONE_PLUS_, "mtp.norm.weight") ||
             bind_layer_at(b, &mtp->layer, "mtp.", 0, 1, mtp->experts, fused, sw);
    b->f32_next = saved;
    if (rc) qmix_err_prefix(b->err, "MTP block");
    return rc ? -1 : 0;
}

static void mtp_free(qmix_mtp *mtp)
{
    if (!mtp) return;
    free(mtp->experts);
    free(mtp->f32_pool);
    free(mtp);
}

static int bind_model(qmix_model *m, qmix_err *err)
{
    const qmix_config *c = &m->cfg;
    binder b = {.m = m, .err = err, .q = m->qconfig};
    const char *lm_head = "lm_head.weight";
    if (qmix_st_find(m->store, "model.language_model.embed_tokens.weight")) {
        m->prefix = "model.language_model.";
    } else if (qmix_st_find(m->store, "language_model.model.embed_tokens.weight")) {
        m->prefix = "language_model.model.";   /* mlx-vlm */
        lm_head = "language_model.lm_head.weight";
        m->mlx_layout = 1;
    } else {
        m->prefix = "model.";
    }
    char probe[256];
    snprintf(probe, sizeof probe, "%slayers.0.mlp.experts.gate_up_proj", m->prefix);
    m->experts_fused = qmix_st_find(m->store, probe) != NULL;
    snprintf(probe, sizeof probe, "%slayers.0.mlp.switch_mlp.gate_proj.weight", m->prefix);
    m->experts_switch = qmix_st_find(m->store, probe) != NULL;
    if (m->experts_switch || m->qconfig) m->mlx_layout = 1;
    /* MLX stores the (1 + w) norms already shifted (§1.5); it recognises an unconverted HF
     * checkpoint by MTP tensors or an HF-shaped conv1d, and so does this. */
    m->norms_shifted = m->mlx_layout;
    for (int i = 0; m->norms_shifted && i < c->n_layers; i++) {
        if (c->layer_is_full[i]) continue;
        snprintf(probe, sizeof probe, "%slayers.%d.linear_attn.conv1d.weight", m->prefix, i);
        const qmix_tensor *cw = qmix_st_find(m->store, probe);
        if (cw && !(cw->ndim == 3 && cw->shape[2] == 1)) m->norms_shifted = 0;
        break;
    }

    /* The config sizes the allocations below: check it against the checkpoint first, so a
     * hostile config cannot ask for terabytes before any tensor is looked at. */
    int64_t dims_embed[2] = {c->vocab_size, c->hidden_size};
    int64_t dims_router[2] = {c->n_experts, c->hidden_size};
    int64_t dims_norm[1] = {c->hidden_size};
    static const char *const first_rows[2] = {"%sembed_tokens.weight", "%slayers.0.mlp.gate.weight"};
    const int64_t *dims_first[2] = {dims_embed, dims_router};
    for (int k = 0; k < 2; k++) {
        const qmix_tensor *t = find(&b, first_rows[k], m->prefix);
        if (t && t->dtype == QMIX_U32) { /* packed: the row count must still match */
            if (t->ndim != 2 || t->shape[0] != dims_first[k][0])
                return qmix_errf(err, "tensor '%s' does not have %lld rows", b.name,
                                 (long long)dims_first[k][0]);
        } else if (check_shape(&b, t, 2, dims_first[k])) {
            return -1;
        }
    }
    if (check_shape(&b, find(&b, "%slayers.%d.input_layernorm.weight", m->prefix,
                             c->n_layers - 1), 1, dims_norm))
        return -1;
    char beyond[256];
    snprintf(beyond, sizeof beyond, "%slayers.%d.input_layernorm.weight", m->prefix, c->n_layers);
    if (qmix_st_find(m->store, beyond))
        return qmix_errf(err, "config says %d layers but the checkpoint has '%s'", c->n_layers,
                         beyond);

    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    m->expert_pool = calloc((size_t)c->n_layers * c->n_experts, sizeof *m->expert_pool);
    m->f32_pool = malloc(f32_pool_size(c) * sizeof(float));
    if (!m->layers || !m->expert_pool || !m->f32_pool) return qmix_errf(err, "out of memory");
    b.f32_next = m->f32_pool;

    int64_t V = c->vocab_size, D = c->hidden_size;
    if (bind_mat(&b, &m->embed, V, D, "%sembed_tokens.weight", m->prefix) ||
        bind_1d(&b, &m->final_norm, D, m->norms_shifted ? AS_IS : ONE_PLUS, "%snorm.weight",
                m->prefix))
        return -1;
    if (c->tie_embeddings && !qmix_st_find(m->store, lm_head) &&
        !(m->gptq && qmix_st_find(m->store, "lm_head.qweight")))
        m->lm_head = m->embed;
    else if (bind_mat(&b, &m->lm_head, V, D, "%s", lm_head)) return -1;
    for (int i = 0; i < c->n_layers; i++)
        if (bind_layer(&b, i)) return -1;
    return bind_mtp(&b);
}

void qmix_model_close(qmix_model *m)
{
    if (!m) return;
    mtp_free(m->mtp);
    qmix_st_close(m->store);
    qmix_gguf_close(m->gguf);
    qmix_qconfig_free(m->qconfig);
    for (size_t i = 0; i < m->n_repacked; i++) free(m->repacked[i]);
    free(m->repacked);
    free(m->gptq);
    free(m->layers);
    free(m->expert_pool);
    free(m->f32_pool);
    free(m->dir);
    free(m);
}

int qmix_model_open(const char *path, qmix_model **out, qmix_err *err)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb)) return qmix_errf(err, "%s: no such file or directory", path);
    qmix_model *m = calloc(1, sizeof *m);
    if (!m) return qmix_errf(err, "out of memory");
    /* config.json sits in the checkpoint directory, or beside a single weights file */
    m->dir = strdup(path);
    if (!S_ISDIR(sb.st_mode)) {
        char *slash = strrchr(m->dir, '/');
        if (slash) *slash = 0;
        else strcpy(m->dir, ".");
    }
    size_t plen = strlen(path);
    if (!S_ISDIR(sb.st_mode) && plen > 5 && !strcmp(path + plen - 5, ".gguf")) {
        /* GGUF carries its own geometry: no config.json */
        if (qmix_model_bind_gguf(m, path, err)) {
            qmix_err_prefix(err, "loading %s", path);
            qmix_model_close(m);
            return -1;
        }
        *out = m;
        return 0;
    }
    char cfg_path[PATH_MAX];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", m->dir);
    /* a GPTQ quantization_config (quant_method "gptq") is not an MLX block: the loader takes
     * its modules from qweight tensors (bind_gptq) and the config for cross-checks */
    qmix_gptq_info gi;
    int is_gptq = qmix_config_load(cfg_path, &m->cfg, err) ? -1
                  : qmix_gptq_info_load(cfg_path, &gi, err);
    if (is_gptq > 0 && (m->gptq = malloc(sizeof *m->gptq))) *m->gptq = gi;
    if (is_gptq > 0 && !m->gptq) is_gptq = qmix_errf(err, "out of memory");
    if (is_gptq < 0 || qmix_qconfig_load(cfg_path, &m->qconfig, err) ||
        qmix_st_open(path, &m->store, err) ||
        bind_model(m, err)) {
        qmix_err_prefix(err, "loading %s", path);
        qmix_model_close(m);
        return -1;
    }
    *out = m;
    return 0;
}

const qmix_config *qmix_model_config(const qmix_model *m) { return &m->cfg; }

uint64_t qmix_mat_bytes(const qk_mat *w)
{
    uint64_t scale_bytes = w->dtype == QMIX_U32 ? 2 * (uint64_t)w->scale_row_bytes : 0;
    return (uint64_t)w->rows * (w->row_bytes + scale_bytes);
}

static uint64_t mat_bytes(const qk_mat *w) { return qmix_mat_bytes(w); }

void qmix_model_for_each_matrix(const qmix_model *m, qmix_matrix_fn fn, void *user)
{
    const qmix_config *c = &m->cfg;
    fn(user, QMIX_ROLE_EMBED, -1, -1, &m->embed);
    if (m->lm_head.data != m->embed.data) fn(user, QMIX_ROLE_LM_HEAD, -1, -1, &m->lm_head);
    for (int i = 0; i < c->n_layers; i++) {
        const qmix_layer *ly = &m->layers[i];
        if (ly->is_full) {
            fn(user, QMIX_ROLE_ATTN_Q, i, -1, &ly->q_proj);
            fn(user, QMIX_ROLE_ATTN_K, i, -1, &ly->k_proj);
            fn(user, QMIX_ROLE_ATTN_V, i, -1, &ly->v_proj);
            fn(user, QMIX_ROLE_ATTN_O, i, -1, &ly->o_proj);
        } else {
            fn(user, QMIX_ROLE_GDN_QKV, i, -1, &ly->in_qkv);
            fn(user, QMIX_ROLE_GDN_Z, i, -1, &ly->in_z);
            fn(user, QMIX_ROLE_GDN_A, i, -1, &ly->in_a);
            fn(user, QMIX_ROLE_GDN_B, i, -1, &ly->in_b);
            fn(user, QMIX_ROLE_GDN_OUT, i, -1, &ly->out_proj);
        }
        fn(user, QMIX_ROLE_ROUTER, i, -1, &ly->router);
        fn(user, QMIX_ROLE_SHARED_EXPERT, i, -1, &ly->shared_gate);
        fn(user, QMIX_ROLE_SHARED_EXPERT, i, -1, &ly->shared_up);
        fn(user, QMIX_ROLE_SHARED_EXPERT, i, -1, &ly->shared_down);
        fn(user, QMIX_ROLE_SHARED_EXPERT_GATE, i, -1, &ly->shared_expert_gate);
        for (int e = 0; e < c->n_experts; e++) {
            fn(user, QMIX_ROLE_EXPERTS_GATE_UP, i, e, &ly->experts[e].gate);
            fn(user, QMIX_ROLE_EXPERTS_GATE_UP, i, e, &ly->experts[e].up);
            fn(user, QMIX_ROLE_EXPERTS_DOWN, i, e, &ly->experts[e].down);
        }
    }
}

uint64_t qmix_model_decode_bytes(const qmix_model *m)
{
    const qmix_config *c = &m->cfg;
    uint64_t bytes = m->embed.row_bytes + mat_bytes(&m->lm_head) +
                     (m->embed.dtype == QMIX_U32 ? 2 * (uint64_t)m->embed.scale_row_bytes : 0);
    for (int i = 0; i < c->n_layers; i++) {
        const qmix_layer *ly = &m->layers[i];
        if (ly->is_full)
            bytes += mat_bytes(&ly->q_proj) + mat_bytes(&ly->k_proj) + mat_bytes(&ly->v_proj) +
                     mat_bytes(&ly->o_proj);
        else
            bytes += mat_bytes(&ly->in_qkv) + mat_bytes(&ly->in_z) + mat_bytes(&ly->in_a) +
                     mat_bytes(&ly->in_b) + mat_bytes(&ly->out_proj);
        bytes += mat_bytes(&ly->router) + mat_bytes(&ly->shared_gate) + mat_bytes(&ly->shared_up) +
                 mat_bytes(&ly->shared_down) + mat_bytes(&ly->shared_expert_gate);
        const qmix_expert *e = &ly->experts[0];
        bytes += (uint64_t)c->n_experts_used *
                 (mat_bytes(&e->gate) + mat_bytes(&e->up) + mat_bytes(&e->down));
    }
    return bytes;
}

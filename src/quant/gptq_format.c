/* GPTQ checkpoint format helpers (see gptq_format.h; spec/quant-formats.md §2). */
#include "quant/gptq_format.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/safetensors.h"
#include "kernels/kernels.h"
#include "quant/affine.h"
#include "util/err.h"

int qmix_gptq_bits_valid(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

int qmix_gptq_marlin_ok(int bits, int group, int sym)
{
    return sym && (bits == 4 || bits == 8) &&
           (group == -1 || group == 32 || group == 64 || group == 128);
}

void qmix_gptq_zeros_row(int64_t n, int bits, uint32_t zero, int v1, uint32_t *out)
{
    /* qzeros packs along the output dimension with the same LE bit stream as qweight (§2.2);
     * v1 subtracts 1 per field, never across fields, so no borrow can occur (zero ≥ 1) */
    memset(out, 0, (size_t)(n * bits / 32) * sizeof *out);
    uint32_t stored = v1 ? zero - 1 : zero;
    for (int64_t c = 0; c < n; c++) qmix_affine_set_code(out, c, bits, stored);
}

/* ---- quantization_config: role classes of vLLM's fused modules (§2.7, §2.8) ---------------- */

enum { C_ATTN_QKV, C_ATTN_O, C_GDN_QKVZ, C_GDN_BA, C_GDN_OUT, C_SH_GU, C_SH_DOWN, C_EXPERTS,
       C_LM_HEAD, C_COUNT, C_OTHER = -1 };

/* The regex tail of each class matches both the HF module names (GPTQModel) and the fused names
 * vLLM matches after loading (qkv_proj, in_proj_qkvz, in_proj_ba, gate_up_proj, mlp.experts). */
static const char *const class_regex[C_COUNT] = {
    "self_attn\\.(q_proj|k_proj|v_proj|qkv_proj)$",
    "self_attn\\.o_proj$",
    "linear_attn\\.(in_proj_qkv|in_proj_z|in_proj_qkvz)$",
    "linear_attn\\.(in_proj_b|in_proj_a|in_proj_ba)$",
    "linear_attn\\.out_proj$",
    "mlp\\.shared_expert\\.(gate_proj|up_proj|gate_up_proj)$",
    "mlp\\.shared_expert\\.down_proj$",
    "mlp\\.experts(\\..*)?$",
    "lm_head$",
};
static const char *const class_desc[C_COUNT] = {
    "self_attn q/k/v_proj (fused into qkv_proj)", "self_attn.o_proj",
    "linear_attn in_proj_qkv/in_proj_z (fused into in_proj_qkvz)",
    "linear_attn in_proj_b/in_proj_a (fused into in_proj_ba)", "linear_attn.out_proj",
    "shared_expert gate/up_proj (fused into gate_up_proj)", "shared_expert.down_proj",
    "routed experts gate/up/down_proj (one fused-MoE config per layer)", "lm_head"};

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static int class_of(const char *m)
{
    if (strstr(m, "self_attn.")) {
        if (ends_with(m, ".q_proj") || ends_with(m, ".k_proj") || ends_with(m, ".v_proj"))
            return C_ATTN_QKV;
        if (ends_with(m, ".o_proj")) return C_ATTN_O;
    }
    if (strstr(m, "linear_attn.")) {
        if (ends_with(m, ".in_proj_qkv") || ends_with(m, ".in_proj_z")) return C_GDN_QKVZ;
        if (ends_with(m, ".in_proj_b") || ends_with(m, ".in_proj_a")) return C_GDN_BA;
        if (ends_with(m, ".out_proj")) return C_GDN_OUT;
    }
    if (strstr(m, "mlp.shared_expert.")) {
        if (ends_with(m, ".gate_proj") || ends_with(m, ".up_proj")) return C_SH_GU;
        if (ends_with(m, ".down_proj")) return C_SH_DOWN;
    }
    if (strstr(m, "mlp.experts.")) return C_EXPERTS;
    if (!strcmp(m, "lm_head") || ends_with(m, ".lm_head")) return C_LM_HEAD;
    return C_OTHER;
}

static int layer_of(const char *m)
{
    const char *p = strstr(m, "layers.");
    if (!p) return -1;
    char *end;
    long v = strtol(p + 7, &end, 10);
    return end == p + 7 || *end != '.' || v < 0 || v > 100000 ? -1 : (int)v;
}

/* A setting as one int: 0 kept 16-bit, else bits·1024 + group + 1 (group −1 → 0). */
static int enc(int bits, int group) { return bits ? bits * 1024 + group + 1 : 0; }
static int enc_bits(int s) { return s / 1024; }
static int enc_group(int s) { return s % 1024 - 1; }

static void setting_str(int s, char *buf, size_t len)
{
    if (!s) snprintf(buf, len, "16-bit");
    else snprintf(buf, len, "%d-bit group %d", enc_bits(s), enc_group(s));
}

int qmix_gptq_build_qconfig(const qmix_gptq_module *mods, size_t n,
                            const qmix_gptq_qconfig_opts *o, json_t **out, int *non_marlin,
                            qmix_err *err)
{
    *out = NULL;
    *non_marlin = 0;
    int L = o->n_layers, slots = L + 1; /* slot L: lm_head (no layer) */
    int *set = malloc((size_t)C_COUNT * (size_t)slots * sizeof *set);
    const char **who = malloc((size_t)C_COUNT * (size_t)slots * sizeof *who);
    json_t *q = NULL;
    int rc = -1;
    if (!set || !who) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int i = 0; i < C_COUNT * slots; i++) set[i] = -1;
    /* counts per setting for the defaults: bits 2..8 × group (−1, 32, 64, 128) */
    uint64_t count[9][4] = {{0}};
    int expert_default = -1, all_sym = 1;
    for (size_t i = 0; i < n; i++) {
        const qmix_gptq_module *m = &mods[i];
        int c = class_of(m->name), layer = layer_of(m->name);
        if (c == C_OTHER) {
            if (!m->bits) continue;
            qmix_errf(err, "module '%s' cannot be quantized in a GPTQ checkpoint for vLLM (it "
                      "builds the router, shared-expert gate, embedding and vision without "
                      "quantization)", m->name);
            goto done;
        }
        if (m->bits && !qmix_gptq_bits_valid(m->bits)) {
            qmix_errf(err, "module '%s' at %d bits: GPTQ holds 2, 3, 4 or 8 bits (vLLM Marlin: 4 "
                      "or 8); use --format mlx for this recipe or change its bits", m->name,
                      m->bits);
            goto done;
        }
        if (c == C_EXPERTS && m->bits && m->bits != 4 && m->bits != 8) {
            qmix_errf(err, "module '%s': routed experts at %d bits cannot be served by vLLM "
                      "(fused MoE kernels take 4 or 8 bits); use --format mlx or gguf for "
                      "2/3-bit experts", m->name, m->bits);
            goto done;
        }
        if (c == C_LM_HEAD) layer = L;
        else if (layer < 0 || layer >= L) continue; /* not a decoder layer (MTP is never here) */
        int s = enc(m->bits, m->group), *slot = &set[c * slots + layer];
        if (*slot >= 0 && *slot != s) {
            char a[40], b[40];
            setting_str(*slot, a, sizeof a);
            setting_str(s, b, sizeof b);
            qmix_errf(err, "'%s' is %s but '%s' is %s: vLLM loads %s as one module with one "
                      "quantization setting; make the recipe give them the same bits and "
                      "group", who[c * slots + layer], a, m->name, b, class_desc[c]);
            goto done;
        }
        *slot = s;
        who[c * slots + layer] = m->name;
        if (m->bits) {
            int gi = m->group == -1 ? 0 : m->group == 32 ? 1 : m->group == 64 ? 2 : 3;
            count[m->bits][gi]++;
            if (c == C_EXPERTS && expert_default < 0) expert_default = s;
            if (!qmix_gptq_marlin_ok(m->bits, m->group, m->sym)) (*non_marlin)++;
            all_sym &= m->sym;
        }
    }
    /* defaults: the routed experts' setting (most of the parameters), else the most common */
    int dflt = expert_default;
    if (dflt < 0) {
        uint64_t best = 0;
        static const int groups[4] = {-1, 32, 64, 128};
        for (int b = 2; b <= 8; b++)
            for (int g = 0; g < 4; g++)
                if (count[b][g] > best) {
                    best = count[b][g];
                    dflt = enc(b, groups[g]);
                }
    }
    if (dflt <= 0) {
        qmix_errf(err, "the recipe quantizes no linear module: a GPTQ checkpoint needs at least "
                  "one (use --format mlx to write an unquantized copy)");
        goto done;
    }
    q = json_object();
    json_t *dyn = json_object();
    json_object_set_new(q, "quant_method", json_string("gptq"));
    json_object_set_new(q, "method", json_string("gptq"));
    json_object_set_new(q, "bits", json_integer(enc_bits(dflt)));
    json_object_set_new(q, "group_size", json_integer(enc_group(dflt)));
    json_object_set_new(q, "desc_act", json_false());
    json_object_set_new(q, "sym", json_boolean(all_sym));
    json_object_set_new(q, "lm_head", json_boolean(set[C_LM_HEAD * slots + L] > 0));
    json_object_set_new(q, "checkpoint_format", json_string("gptq"));
    json_object_set_new(q, "format", json_string("gptq"));
    json_object_set_new(q, "pack_dtype", json_string("int32"));
    json_object_set_new(q, "true_sequential", json_true());
    /* The first matching rule wins (§2.7). The layer rules exclude mtp/visual by look-ahead, so
     * they are right in any key order (a tool that sorts keys cannot make them shadow the "-:"
     * rules below); "-:" keeps vLLM from expecting qweight in the 16-bit MTP block / vision. */
    if (o->has_mtp) json_object_set_new(dyn, "-:.*mtp\\..*", json_object());
    if (o->has_vision) json_object_set_new(dyn, "-:.*visual\\..*", json_object());
    size_t cap = 64 + (size_t)L * 8;
    char *key = malloc(cap + 256);
    if (!key) {
        json_decref(dyn);
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int c = 0; c < C_COUNT; c++) {
        int lo = c == C_LM_HEAD ? L : 0, hi = c == C_LM_HEAD ? L + 1 : L;
        int present = 0;
        for (int l = lo; l < hi; l++) present += set[c * slots + l] >= 0;
        /* distinct non-default settings of this class, each with its layers */
        for (int l0 = lo; l0 < hi; l0++) {
            int s = set[c * slots + l0];
            if (s < 0 || s == dflt || (c == C_LM_HEAD && !s)) continue; /* "lm_head": false */
            int first = 1, nl = 0;
            for (int l = l0; l < hi; l++) nl += set[c * slots + l] == s;
            size_t k = 0;
            k += (size_t)snprintf(key + k, cap - k, "%s", s ? "+:" : "-:");
            if (c == C_LM_HEAD) {
                k += (size_t)snprintf(key + k, cap - k, "(.*\\.)?%s", class_regex[c]);
            } else {
                k += (size_t)snprintf(key + k, cap - k, "(?!.*(mtp|visual)\\.).*\\.layers\\.");
                if (nl == present) {
                    k += (size_t)snprintf(key + k, cap - k, "\\d+");
                } else {
                    k += (size_t)snprintf(key + k, cap - k, "(");
                    for (int l = l0; l < hi; l++)
                        if (set[c * slots + l] == s) {
                            k += (size_t)snprintf(key + k, cap - k, "%s%d", first ? "" : "|", l);
                            first = 0;
                        }
                    k += (size_t)snprintf(key + k, cap - k, ")");
                }
                snprintf(key + k, cap + 256 - k, "\\.%s", class_regex[c]);
            }
            for (int l = l0; l < hi; l++) /* handled: later layers with s are skipped */
                if (set[c * slots + l] == s && l != l0) set[c * slots + l] = -2 - s;
            json_t *v = json_object();
            if (s) {
                json_object_set_new(v, "bits", json_integer(enc_bits(s)));
                json_object_set_new(v, "group_size", json_integer(enc_group(s)));
            }
            json_object_set_new(dyn, key, v);
        }
    }
    free(key);
    json_object_set_new(q, "dynamic", dyn);
    json_t *meta = json_object();
    json_t *qz = json_array();
    json_array_append_new(qz, json_string(o->quantizer ? o->quantizer : "qmix"));
    json_object_set_new(meta, "quantizer", qz);
    json_object_set_new(meta, "act_group_aware", json_boolean(o->act_group_aware));
    json_object_set_new(meta, "static_groups", json_false());
    if (o->damp > 0) json_object_set_new(meta, "damp_percent", json_real(o->damp));
    json_object_set_new(q, "meta", meta);
    *out = q;
    q = NULL;
    rc = 0;
done:
    json_decref(q);
    free(set);
    free(who);
    return rc;
}

/* ---- reading ------------------------------------------------------------------------------ */

int qmix_gptq_info_parse(const json_t *qc, const char *label, qmix_gptq_info *info, qmix_err *err)
{
    memset(info, 0, sizeof *info);
    const char *method = json_string_value(json_object_get(qc, "quant_method"));
    if (!method || strcmp(method, "gptq")) return 0;
    json_t *b = json_object_get(qc, "bits"), *g = json_object_get(qc, "group_size");
    if (!json_is_integer(b) || !json_is_integer(g))
        return qmix_errf(err, "%s: GPTQ quantization_config needs integer bits and group_size",
                         label);
    info->bits = (int)json_integer_value(b);
    info->group = (int)json_integer_value(g);
    if (!qmix_gptq_bits_valid(info->bits))
        return qmix_errf(err, "%s: GPTQ bits=%d is not supported (2, 3, 4 or 8)", label,
                         info->bits);
    if (info->group != -1 && info->group <= 0)
        return qmix_errf(err, "%s: GPTQ group_size=%d is not valid", label, info->group);
    json_t *sym = json_object_get(qc, "sym"), *da = json_object_get(qc, "desc_act");
    info->sym = sym ? json_is_true(sym) : 1;
    info->desc_act = da ? json_is_true(da) : 0;
    const char *fmt = json_string_value(json_object_get(qc, "checkpoint_format"));
    if (!fmt) fmt = json_string_value(json_object_get(qc, "format"));
    if (!fmt || !strcmp(fmt, "gptq")) info->v1 = 1;
    else if (!strcmp(fmt, "gptq_v2")) info->v1 = 0;
    else
        return qmix_errf(err, "%s: GPTQ checkpoint_format '%s' is not supported (gptq, "
                         "gptq_v2; the planar gptq_p layout is not)", label, fmt);
    const char *pack = json_string_value(json_object_get(qc, "pack_dtype"));
    if (pack && strcmp(pack, "int32"))
        return qmix_errf(err, "%s: GPTQ pack_dtype '%s' is not supported (int32)", label, pack);
    json_t *dyn = json_object_get(qc, "dynamic");
    info->has_dynamic = json_is_object(dyn) && json_object_size(dyn) > 0;
    return 1;
}

int qmix_gptq_info_load(const char *config_path, qmix_gptq_info *info, qmix_err *err)
{
    memset(info, 0, sizeof *info);
    json_error_t je;
    json_t *root = json_load_file(config_path, 0, &je);
    if (!root) return qmix_errf(err, "%s: bad JSON at line %d: %s", config_path, je.line, je.text);
    json_t *qc = json_object_get(root, "quantization_config");
    int r = json_is_object(qc) ? qmix_gptq_info_parse(qc, config_path, info, err) : 0;
    json_decref(root);
    return r;
}

static int32_t i32_at(const void *p, int64_t i)
{
    int32_t v;
    memcpy(&v, (const uint8_t *)p + 4 * i, 4);
    return v;
}

static float scale_at(const qmix_tensor *t, int64_t i)
{
    uint16_t h;
    float f;
    switch (t->dtype) {
    case QMIX_F16: memcpy(&h, (const uint8_t *)t->data + 2 * i, 2); return qk_f16_to_f32(h);
    case QMIX_BF16: memcpy(&h, (const uint8_t *)t->data + 2 * i, 2); return qk_bf16_to_f32(h);
    default: memcpy(&f, (const uint8_t *)t->data + 4 * i, 4); return f;
    }
}

void qmix_gptq_unpacked_free(qmix_gptq_unpacked *u)
{
    free(u->codes);
    free(u->scales);
    free(u->biases);
    memset(u, 0, sizeof *u);
}

int qmix_gptq_unpack(const char *module, const qmix_tensor *qw, const qmix_tensor *qz,
                     const qmix_tensor *sc, const qmix_tensor *gi, int64_t expect_rows,
                     int64_t expect_cols, const qmix_gptq_info *info, qmix_gptq_unpacked *out,
                     qmix_err *err)
{
    memset(out, 0, sizeof *out);
    const char *missing = !qw ? "qweight" : !qz ? "qzeros" : !sc ? "scales" : !gi ? "g_idx" : NULL;
    if (missing)
        return qmix_errf(err, "GPTQ module '%s': missing %s.%s (qmix reads qweight, qzeros, "
                         "scales and g_idx)", module, module, missing);
    if (qw->dtype != QMIX_I32 || qz->dtype != QMIX_I32 || gi->dtype != QMIX_I32)
        return qmix_errf(err, "GPTQ module '%s': qweight, qzeros and g_idx must be I32 (got %s, "
                         "%s, %s)", module, qmix_dtype_st_name(qw->dtype),
                         qmix_dtype_st_name(qz->dtype), qmix_dtype_st_name(gi->dtype));
    if (sc->dtype != QMIX_F16 && sc->dtype != QMIX_BF16 && sc->dtype != QMIX_F32)
        return qmix_errf(err, "GPTQ module '%s': scales must be F16, BF16 or F32, not %s", module,
                         qmix_dtype_st_name(sc->dtype));
    if (qw->ndim != 2 || qz->ndim != 2 || sc->ndim != 2 || gi->ndim != 1)
        return qmix_errf(err, "GPTQ module '%s': qweight/qzeros/scales must be 2-D and g_idx 1-D",
                         module);
    int64_t K = gi->shape[0], W = qw->shape[0], N = qw->shape[1], G = sc->shape[0];
    if (expect_cols >= 0 && K != expect_cols)
        return qmix_errf(err, "GPTQ module '%s': g_idx has %lld input channels, the model needs "
                         "%lld", module, (long long)K, (long long)expect_cols);
    if (expect_rows >= 0 && N != expect_rows)
        return qmix_errf(err, "GPTQ module '%s': qweight has %lld output channels, the model "
                         "needs %lld", module, (long long)N, (long long)expect_rows);
    if (K <= 0 || N <= 0 || K % 32 || (W * 32) % K || !qmix_gptq_bits_valid((int)(W * 32 / K)))
        return qmix_errf(err, "GPTQ module '%s': qweight shape [%lld, %lld] does not pack %lld "
                         "inputs at 2, 3, 4 or 8 bits (rows must be inputs·bits/32)", module,
                         (long long)W, (long long)N, (long long)K);
    int bits = (int)(W * 32 / K);
    if (G <= 0 || K % G || sc->shape[1] != N)
        return qmix_errf(err, "GPTQ module '%s': scales shape [%lld, %lld] does not fit %lld "
                         "inputs × %lld outputs", module, (long long)G, (long long)sc->shape[1],
                         (long long)K, (long long)N);
    int group = (int)(K / G);
    if (!qmix_affine_valid(bits == 8 ? 8 : bits, group))
        return qmix_errf(err, "GPTQ module '%s': group size %d is not supported by qmix's "
                         "kernels (32, 64, 128)", module, group);
    if ((N * bits) % 32 || qz->shape[0] != G || qz->shape[1] != N * bits / 32)
        return qmix_errf(err, "GPTQ module '%s': qzeros shape [%lld, %lld], expected [%lld, "
                         "%lld] for %d bits", module, (long long)qz->shape[0],
                         (long long)qz->shape[1], (long long)G, (long long)(N * bits / 32), bits);
    if (info && info->bits != bits && !info->has_dynamic)
        return qmix_errf(err, "GPTQ module '%s' is packed at %d bits but quantization_config "
                         "says bits=%d and has no dynamic override", module, bits, info->bits);
    for (int64_t k = 0; k < K; k++)
        if (i32_at(gi->data, k) != (int32_t)(k / group))
            return qmix_errf(err, "GPTQ module '%s': g_idx[%lld] = %d, not %lld: act-order "
                             "(desc_act) with scattered groups is not supported (qmix and MLX "
                             "need contiguous groups; re-quantize with desc_act=false or "
                             "act_group_aware)", module, (long long)k, i32_at(gi->data, k),
                             (long long)(k / group));
    out->rows = N;
    out->cols = K;
    out->bits = bits;
    out->group = group;
    out->codes = malloc((size_t)(N * W) * 4);
    out->scales = malloc((size_t)(N * G) * sizeof(float));
    out->biases = malloc((size_t)(N * G) * sizeof(float));
    uint32_t *zrow = malloc((size_t)(N * bits / 32) * 4);
    if (!out->codes || !out->scales || !out->biases || !zrow) {
        free(zrow);
        qmix_gptq_unpacked_free(out);
        return qmix_errf(err, "GPTQ module '%s': out of memory", module);
    }
    /* qweight column n is MLX row n (§2.2): a transpose of words */
    for (int64_t w = 0; w < W; w++)
        for (int64_t n = 0; n < N; n++) out->codes[n * W + w] = (uint32_t)i32_at(qw->data, w * N + n);
    const uint32_t sym_zero = 1u << (bits - 1), offset = info && !info->v1 ? 0 : 1;
    out->sym = 1;
    for (int64_t g = 0; g < G; g++) {
        memcpy(zrow, (const uint8_t *)qz->data + (size_t)(g * (N * bits / 32)) * 4,
               (size_t)(N * bits / 32) * 4);
        for (int64_t n = 0; n < N; n++) {
            /* v1: add 1 field-wise, as vLLM does (a borrowed field 2^b − 1 decodes to 2^b) */
            uint32_t z = qmix_affine_get_code(zrow, n, bits) + offset;
            float s = scale_at(sc, g * N + n);
            out->sym &= z == sym_zero;
            out->scales[n * G + g] = s;
            out->biases[n * G + g] = -s * (float)z; /* exact: an f16 scale times z ≤ 256 */
        }
    }
    free(zrow);
    return 0;
}

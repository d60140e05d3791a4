#include "eval/plan.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "formats/config.h"
#include "formats/safetensors.h"
#include "model/geometry.h"
#include "model/model.h"
#include "model/roles.h"
#include "quant/quantize.h"
#include "runtime/session.h"
#include "runtime/threadpool.h"
#include "util/err.h"

const int qmix_plan_table_ctx[QMIX_PLAN_N_TABLE_CTX] = {32768, 65536, 102400, 131072, 262144};
const int qmix_plan_table_bits[QMIX_PLAN_N_TABLE_BITS] = {32, 16, 8, 4};

/* Without a limit from the config, the search for the longest context stops here (qmix's
 * session positions are ints; no released model of the family goes past 1M). */
#define PLAN_CTX_CAP (1 << 24)

qmix_kv_type qmix_plan_kv_type(int kv_bits)
{
    switch (kv_bits) {
    case 16: return QMIX_KV_F16;
    case 8: return QMIX_KV_Q8_0;
    case 4: return QMIX_KV_Q4_0;
    default: return QMIX_KV_F32;
    }
}

uint64_t qmix_plan_kv_per_token(const qmix_config *c, int kv_bits)
{
    /* K and V rows of every full-attention layer, as the session stores them (scales included) */
    return qmix_kv_token_bytes(c, qmix_plan_kv_type(kv_bits));
}

uint64_t qmix_plan_vision_params(int out_hidden)
{
    /* vision_config of the family: 27 pre-norm ViT blocks (LayerNorm with bias, fused qkv with
     * bias, proj, gelu MLP 4304), a Conv3d patch embedding 3×2×16×16 → 1152 with bias, a learned
     * 48×48 position table, and the 2×2 patch merger (LayerNorm, Linear 4608→4608, Linear
     * 4608→out_hidden, with biases). */
    const uint64_t h = 1152, I = 4304, depth = 27, patch = 16, tp = 2, in_ch = 3, pos = 2304,
                   merge = 2, out = (uint64_t)out_hidden;
    uint64_t block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (I * h + I) + (h * I + h);
    uint64_t mh = h * merge * merge;
    uint64_t merger = 2 * h + (mh * mh + mh) + (out * mh + out);
    return depth * block + (h * in_ch * tp * patch * patch + h) + pos * h + merger;
}

/* Fills everything that depends on the context and the KV width from the parts already set. */
static void session_parts(const qmix_plan *p, int64_t ctx, int kv_bits, uint64_t *runtime,
                          uint64_t *state, uint64_t *kv)
{
    qmix_session_sizes sz;
    qmix_session_size(&p->cfg, (int)ctx, p->n_threads, qmix_plan_kv_type(kv_bits), &sz);
    *runtime = sz.scratch + sz.other;
    *state = sz.state;
    *kv = sz.kv; /* what the session allocates for that cache type */
}

uint64_t qmix_plan_peak_at(const qmix_plan *p, int64_t ctx, int kv_bits)
{
    uint64_t runtime, state, kv;
    session_parts(p, ctx, kv_bits, &runtime, &state, &kv);
    return p->weight_bytes + p->vision_bytes + p->engine_bytes + runtime + state + kv;
}

/* Everything after the weights are known: session, peak, fit, longest context. */
static void finish(qmix_plan *p, const qmix_plan_opts *o, uint64_t n_tensors)
{
    const qmix_config *c = &p->cfg;
    p->n_full = 0;
    for (int i = 0; i < c->n_layers; i++) p->n_full += c->layer_is_full[i] != 0;
    p->n_linear = c->n_layers - p->n_full;
    p->n_threads = o->n_threads > 0 ? o->n_threads : qmix_pool_default_threads();
    p->kv_bits = o->kv_bits > 0 ? o->kv_bits : 32;
    p->ctx = o->ctx > 0 ? o->ctx : 4096;
    p->engine_bytes = QMIX_PLAN_PROCESS_BYTES + qmix_model_heap_bytes(c) +
                      n_tensors * QMIX_PLAN_TENSOR_BYTES;
    session_parts(p, p->ctx, p->kv_bits, &p->runtime_bytes, &p->state_bytes, &p->kv_bytes);
    p->kv_bytes_per_token = qmix_plan_kv_per_token(c, p->kv_bits);
    p->fixed_bytes = p->weight_bytes + p->vision_bytes + p->engine_bytes + p->runtime_bytes +
                     p->state_bytes;
    p->peak_bytes = p->fixed_bytes + p->kv_bytes;
    p->available = o->memory > o->reserve ? o->memory - o->reserve : 0;
    p->headroom = (int64_t)p->available - (int64_t)p->fixed_bytes;
    p->fits = p->peak_bytes <= p->available;

    p->max_context = qmix_plan_max_context(p, p->kv_bits, &p->max_context_is_model_limit);
}

int64_t qmix_plan_max_context(const qmix_plan *p, int kv_bits, int *is_model_limit)
{
    /* The peak grows with the context (KV cache, the batch up to 512), so
     * the longest context is a binary search over the same function. */
    const qmix_config *c = &p->cfg;
    int64_t hi = c->max_position_embeddings > 0 ? c->max_position_embeddings : PLAN_CTX_CAP;
    if (is_model_limit) *is_model_limit = 0;
    if (qmix_plan_peak_at(p, 1, kv_bits) > p->available) return 0;
    if (qmix_plan_peak_at(p, hi, kv_bits) <= p->available) {
        if (is_model_limit) *is_model_limit = c->max_position_embeddings > 0;
        return hi;
    }
    int64_t lo = 1; /* fits; hi does not */
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (qmix_plan_peak_at(p, mid, kv_bits) <= p->available) lo = mid;
        else hi = mid;
    }
    return lo;
}

static int check_opts(const qmix_plan_opts *o, qmix_err *err)
{
    int b = o->kv_bits;
    if (b && b != 32 && b != 16 && b != 8 && b != 4)
        return qmix_errf(err, "KV bits must be 32, 16, 8 or 4, not %d", b);
    return 0;
}

int qmix_plan_like(const char *like, const qmix_plan_opts *o, qmix_plan *p, qmix_err *err)
{
    memset(p, 0, sizeof *p);
    if (check_opts(o, err)) return -1;
    const qmix_geometry *g = qmix_geometry_find(like);
    if (!g)
        return qmix_errf(err, "unknown geometry '%s' (35b-a3b, 122b-a10b, 397b-a17b, tiny)", like);
    qmix_geometry_config(g, &p->cfg);
    /* no recipe: every tensor kept, i.e. the bf16 release (A_log in float32, as the quantizer
     * writes it) */
    qmix_recipe keep;
    memset(&keep, 0, sizeof keep);
    snprintf(keep.name, sizeof keep.name, "as released (bf16)");
    qmix_quant_report rep;
    if (qmix_quant_estimate(&p->cfg, o->recipe ? o->recipe : &keep, &rep, err)) return -1;
    p->recipe_applied = o->recipe != NULL;
    p->weight_bytes = rep.bytes;
    p->weight_params = rep.params;
    p->bpw = rep.bpw;
    if (!p->cfg.tie_embeddings) p->embed_bytes = rep.roles[QMIX_ROLE_EMBED].bytes;
    if (o->vision) {
        /* the estimate has no vision tower: the config geometry, kept in bf16 */
        p->vision_bytes = 2 * qmix_plan_vision_params(p->cfg.hidden_size);
        p->vision_estimated = 1;
    }
    finish(p, o, (uint64_t)rep.n_tensors);
    return 0;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* The checkpoint as stored: its text tensors' bytes and parameters (packed MLX weights count
 * 32/bits parameters per word, their scales and biases bytes only, as mlx-lm counts). */
static int stored_sizes(const char *dir, const qmix_st_store *st, qmix_plan *p, int vision,
                        qmix_err *err)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return qmix_errf(err, "%s: path too long", dir);
    qmix_qconfig *q = NULL;
    if (qmix_qconfig_load(path, &q, err)) return -1;
    int rc = -1;
    uint64_t vis_bytes = 0;
    for (uint64_t i = 0; i < qmix_st_count(st); i++) {
        const qmix_tensor *t = qmix_st_at(st, i);
        qmix_role role = qmix_role_of(t->name);
        if (role == QMIX_ROLE_MTP || role == QMIX_ROLE_VISION) {
            if (role == QMIX_ROLE_VISION) vis_bytes += t->nbytes;
            if (role == QMIX_ROLE_MTP || !vision) p->skipped_bytes += t->nbytes;
            if (role == QMIX_ROLE_VISION && !vision) p->skipped_vision = 1;
            continue;
        }
        p->weight_bytes += t->nbytes;
        /* the table and (MLX) its scales and biases */
        if (role == QMIX_ROLE_EMBED && !p->cfg.tie_embeddings) p->embed_bytes += t->nbytes;
        size_t n = strlen(t->name);
        char mod[512], nm[530];
        if (has_suffix(t->name, ".scales") || has_suffix(t->name, ".biases")) {
            snprintf(nm, sizeof nm, "%.*s.weight", (int)(n - 7), t->name);
            const qmix_tensor *w = qmix_st_find(st, nm);
            if (w && w->dtype == QMIX_U32) continue;
        }
        uint64_t e = 1;
        for (int d = 0; d < t->ndim; d++) e *= (uint64_t)t->shape[d];
        if (t->dtype == QMIX_U32 && has_suffix(t->name, ".weight") && n - 7 < sizeof mod) {
            snprintf(mod, sizeof mod, "%.*s", (int)(n - 7), t->name);
            snprintf(nm, sizeof nm, "%s.scales", mod);
            int bits, group;
            int r = qmix_qconfig_module(q, mod, qmix_st_find(st, nm) != NULL, &bits, &group, err);
            if (r < 0) goto done;
            if (r) e = e * 32 / (uint64_t)bits;
        }
        p->weight_params += e;
    }
    if (vision) p->vision_bytes = vis_bytes;
    p->bpw = p->weight_params ? 8.0 * (double)p->weight_bytes / (double)p->weight_params : 0;
    rc = 0;
done:
    qmix_qconfig_free(q);
    return rc;
}

int qmix_plan_checkpoint(const char *dir, const qmix_plan_opts *o, qmix_plan *p, qmix_err *err)
{
    memset(p, 0, sizeof *p);
    if (check_opts(o, err)) return -1;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return qmix_errf(err, "%s: path too long", dir);
    if (qmix_config_load(path, &p->cfg, err)) return -1;
    qmix_st_store *st = NULL;
    if (qmix_st_open(dir, &st, err)) return -1;
    p->from_checkpoint = 1;
    uint64_t n_tensors = qmix_st_count(st);
    int rc = -1;
    if (!o->recipe) {
        if (stored_sizes(dir, st, p, o->vision, err)) goto done;
    } else {
        /* exactly what `qmix quantize` would write: its own plan, run dry (MTP dropped, vision
         * tower kept under its recipe rules) */
        qmix_quant_opts qo = {.recipe = o->recipe, .dtype = QMIX_BF16, .allow_requant = 1,
                              .dry_run = 1};
        qmix_quant_report rep;
        if (qmix_quantize(dir, NULL, &qo, &rep, err)) goto done;
        uint64_t vis = rep.roles[QMIX_ROLE_VISION].bytes;
        p->recipe_applied = 1;
        p->weight_bytes = rep.bytes - vis;
        p->weight_params = rep.params - rep.roles[QMIX_ROLE_VISION].params;
        p->bpw = p->weight_params ? 8.0 * (double)p->weight_bytes / (double)p->weight_params : 0;
        p->vision_bytes = o->vision ? vis : 0;
        if (!p->cfg.tie_embeddings) p->embed_bytes = rep.roles[QMIX_ROLE_EMBED].bytes;
        if (!o->vision) p->skipped_bytes = vis;
        p->skipped_vision = !o->vision && vis;
        n_tensors = (uint64_t)rep.n_tensors;
    }
    if (o->vision && !p->vision_bytes) {
        /* a text-only checkpoint: plan for the family's vision tower, in bf16 */
        p->vision_bytes = 2 * qmix_plan_vision_params(p->cfg.hidden_size);
        p->vision_estimated = 1;
    }
    finish(p, o, n_tensors);
    rc = 0;
done:
    qmix_st_close(st);
    return rc;
}

int qmix_parse_bytes(const char *s, uint64_t *out, qmix_err *err)
{
    /* digits first: no sign, no whitespace, no hex or inf/nan that strtod would take */
    if (!s || (!isdigit((unsigned char)s[0]) && !(s[0] == '.' && isdigit((unsigned char)s[1]))))
        return qmix_errf(err, "'%s' is not a size (e.g. 16G, 3.5G, 512M, 11GiB)", s ? s : "");
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || (end[0] == 'e' || end[0] == 'E'))
        return qmix_errf(err, "'%s' is not a size (e.g. 16G, 3.5G, 512M, 11GiB)", s);
    for (const char *q = s; q < end; q++)
        if (!isdigit((unsigned char)*q) && *q != '.')
            return qmix_errf(err, "'%s' is not a size (e.g. 16G, 3.5G, 512M, 11GiB)", s);
    static const struct { const char *unit; int shift; } units[] = {
        {"", 0},    {"B", 0},    {"K", 10},   {"KB", 10},  {"KiB", 10}, {"M", 20},
        {"MB", 20}, {"MiB", 20}, {"G", 30},   {"GB", 30},  {"GiB", 30}, {"T", 40},
        {"TB", 40}, {"TiB", 40},
    };
    int shift = -1;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (!strcasecmp(end, units[i].unit)) shift = units[i].shift;
    if (shift < 0)
        return qmix_errf(err, "'%s': unknown unit '%s' (B, K, M, G, T, optionally KiB/KB ..., all "
                              "binary: 1K = 1024)", s, end);
    double bytes = ldexp(v, shift);
    if (!(bytes < 1.8e19)) return qmix_errf(err, "'%s' is too large", s);
    *out = (uint64_t)(bytes + 0.5);
    return 0;
}

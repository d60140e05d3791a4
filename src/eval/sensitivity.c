/* Sensitivity analysis (see sensitivity.h). One measurement = one row (a role, or a role in one
 * layer) at one bit width: quantize the row's matrices into malloc'd MLX affine copies (weight
 * error falls out of the round trip), swap the model's qk_mat views to the copies, run the
 * calibration windows (a matmul tap compares each perturbed matmul with the original weights on
 * the same activations; the logits are compared with the base run's), swap back, free. */
#include "eval/sensitivity.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eval/kld.h"
#include "eval/windows.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "quant/affine.h"
#include "quant/calib.h"
#include "quant/fakequant.h"
#include "quant/ggml_blocks.h"
#include "quant/gguf_export.h"
#include "quant/recipe.h"
#include "runtime/session.h"
#include "runtime/threadpool.h"
#include "util/err.h"

const qmix_role qmix_sens_roles[] = {
    QMIX_ROLE_EMBED,   QMIX_ROLE_LM_HEAD, QMIX_ROLE_ATTN_Q,          QMIX_ROLE_ATTN_K,
    QMIX_ROLE_ATTN_V,  QMIX_ROLE_ATTN_O,  QMIX_ROLE_GDN_QKV,         QMIX_ROLE_GDN_Z,
    QMIX_ROLE_GDN_A,   QMIX_ROLE_GDN_B,   QMIX_ROLE_GDN_OUT,         QMIX_ROLE_ROUTER,
    QMIX_ROLE_SHARED_EXPERT, QMIX_ROLE_SHARED_EXPERT_GATE, QMIX_ROLE_EXPERTS_GATE_UP,
    QMIX_ROLE_EXPERTS_DOWN};
const int qmix_sens_n_roles = (int)(sizeof qmix_sens_roles / sizeof qmix_sens_roles[0]);
const qmix_role qmix_sens_kept_roles[] = {QMIX_ROLE_NORM, QMIX_ROLE_GDN_PARAMS};
const int qmix_sens_n_kept_roles = 2;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- the matrices of a row --------------------------------------------------------------- */

/* The views under test are a fake-quantization set (quant/fakequant.h): one target per model
 * view; a tied lm_head (the same tensor as embed) is an alias of the embed target, installed
 * too, but quantized and counted once. Bits and method are set per measurement. */
typedef qmix_fq_target target;
typedef qmix_fq_set tset;

static int tset_add(tset *ts, qk_mat *field, int alias, int group, int layer, int kind,
                    int expert)
{
    return qmix_fq_add(ts, field, alias, 0, group, QMIX_METHOD_RTN, layer, kind, expert);
}

static int tied_head(const qmix_model *m)
{
    return m->lm_head.data == m->embed.data && m->lm_head.dtype == m->embed.dtype;
}

static int role_in_layer(const qmix_model *m, qmix_role role, int i)
{
    switch (role) {
    case QMIX_ROLE_ATTN_Q: case QMIX_ROLE_ATTN_K: case QMIX_ROLE_ATTN_V: case QMIX_ROLE_ATTN_O:
        return m->layers[i].is_full;
    case QMIX_ROLE_GDN_QKV: case QMIX_ROLE_GDN_Z: case QMIX_ROLE_GDN_A: case QMIX_ROLE_GDN_B:
    case QMIX_ROLE_GDN_OUT:
        return !m->layers[i].is_full;
    case QMIX_ROLE_ROUTER: case QMIX_ROLE_SHARED_EXPERT: case QMIX_ROLE_SHARED_EXPERT_GATE:
    case QMIX_ROLE_EXPERTS_GATE_UP: case QMIX_ROLE_EXPERTS_DOWN:
        return 1;
    default:
        return 0;
    }
}

static int role_is_global(qmix_role role) { return role == QMIX_ROLE_EMBED || role == QMIX_ROLE_LM_HEAD; }

static int role_present(const qmix_model *m, qmix_role role)
{
    if (role == QMIX_ROLE_EMBED) return 1;
    if (role == QMIX_ROLE_LM_HEAD) return !tied_head(m); /* tied: measured with embed */
    for (int i = 0; i < m->cfg.n_layers; i++)
        if (role_in_layer(m, role, i)) return 1;
    return 0;
}

/* k of n indices, evenly spaced, first and last included (k >= n: all). */
static int spread(int n, int k, int *out)
{
    if (k <= 0 || k >= n) {
        for (int i = 0; i < n; i++) out[i] = i;
        return n;
    }
    if (k == 1) {
        out[0] = n / 2;
        return 1;
    }
    for (int i = 0; i < k; i++) out[i] = (int)(((int64_t)i * (n - 1) + (k - 1) / 2) / (k - 1));
    return k;
}

/* The layers of a role, all of them or a spread sample. */
static int role_layers(const qmix_model *m, qmix_role role, int sample, int *out)
{
    int all[QMIX_MAX_LAYERS], n = 0, idx[QMIX_MAX_LAYERS];
    for (int i = 0; i < m->cfg.n_layers; i++)
        if (role_in_layer(m, role, i)) all[n++] = i;
    int k = spread(n, sample, idx);
    for (int j = 0; j < k; j++) out[j] = all[idx[j]];
    return k;
}

/* Adds the views of role in layer i (experts: those listed). */
static int add_layer(tset *ts, qmix_model *m, qmix_role role, int i, const int *experts,
                     int n_exp, int group)
{
    qmix_layer *ly = &m->layers[i];
    int rc = 0;
/* a view of this layer, reading calibration input QMIX_CIN_kind */
#define ADD(field, kind, expert) tset_add(ts, &ly->field, -1, group, i, QMIX_CIN_##kind, expert)
    switch (role) {
    case QMIX_ROLE_ATTN_Q: return ADD(q_proj, ATTN, -1);
    case QMIX_ROLE_ATTN_K: return ADD(k_proj, ATTN, -1);
    case QMIX_ROLE_ATTN_V: return ADD(v_proj, ATTN, -1);
    case QMIX_ROLE_ATTN_O: return ADD(o_proj, ATTN_O, -1);
    case QMIX_ROLE_GDN_QKV: return ADD(in_qkv, ATTN, -1);
    case QMIX_ROLE_GDN_Z: return ADD(in_z, ATTN, -1);
    case QMIX_ROLE_GDN_A: return ADD(in_a, ATTN, -1);
    case QMIX_ROLE_GDN_B: return ADD(in_b, ATTN, -1);
    case QMIX_ROLE_GDN_OUT: return ADD(out_proj, GDN_OUT, -1);
    case QMIX_ROLE_ROUTER: return ADD(router, FFN, -1);
    case QMIX_ROLE_SHARED_EXPERT_GATE: return ADD(shared_expert_gate, FFN, -1);
    case QMIX_ROLE_SHARED_EXPERT:
        return ADD(shared_gate, FFN, -1) ||
               ADD(shared_up, FFN, -1) ||
               ADD(shared_down, SHARED_DOWN, -1);
    case QMIX_ROLE_EXPERTS_GATE_UP:
        for (int j = 0; j < n_exp && !rc; j++)
            rc = ADD(experts[experts[j]].gate, EXPERT, experts[j]) ||
                 ADD(experts[experts[j]].up, EXPERT, experts[j]);
        return rc;
    case QMIX_ROLE_EXPERTS_DOWN:
        for (int j = 0; j < n_exp && !rc; j++)
            rc = ADD(experts[experts[j]].down, EXPERT_DOWN, experts[j]);
        return rc;
    default:
        return 0;
    }
}
#undef ADD

/* The views a row quantizes: layers (the row's one, or the role's sampled ones) and, for routed
 * experts, the sampled experts. experts == NULL: every expert (to count parameters). */
static int collect(tset *ts, qmix_model *m, qmix_role role, int layer, int sample,
                   const int *experts, int n_exp, int group)
{
    ts->n = 0;
    if (role == QMIX_ROLE_EMBED) {
        if (tset_add(ts, &m->embed, -1, group, -1, -1, -1)) return -1;
        if (tied_head(m) && tset_add(ts, &m->lm_head, 0, group, -1, -1, -1)) return -1;
        return 0;
    }
    if (role == QMIX_ROLE_LM_HEAD)
        return tset_add(ts, &m->lm_head, -1, group, -1, QMIX_CIN_HEAD, -1);
    int layers[QMIX_MAX_LAYERS], nl;
    if (layer >= 0) {
        layers[0] = layer;
        nl = 1;
    } else {
        nl = role_layers(m, role, sample, layers);
    }
    for (int j = 0; j < nl; j++)
        if (add_layer(ts, m, role, layers[j], experts, n_exp, group)) return -1;
    return 0;
}

static int64_t tset_params(const tset *ts, int quantizable_only)
{
    int64_t p = 0;
    for (int k = 0; k < ts->n; k++)
        if (ts->t[k].alias < 0 && (!quantizable_only || ts->t[k].quantizable))
            p += ts->t[k].orig.rows * ts->t[k].orig.cols;
    return p;
}

/* ---- quantizing a set: the copies and the weight error ----------------------------------- */

/* Quantizes every quantizable, non-alias target at bits into fresh copies (aliases share them)
 * with the options' method; adds the weight error to cell. */
static int tset_quantize(tset *ts, qmix_pool *pool, const qmix_sens_opts *o, int bits,
                         qmix_sens_cell *cell, qmix_err *err)
{
    int method = o->method == QMIX_METHOD_GPTQ || o->method == QMIX_METHOD_IMATRIX
                     ? o->method : QMIX_METHOD_RTN;
    for (int k = 0; k < ts->n; k++) {
        target *t = &ts->t[k];
        t->bits = bits;
        t->method = method;
        if (o->gguf) {
            /* the writer's type for these bits and this row length; a float fallback is
             * "not quantized" (the row keeps its 16-bit weights) */
            int type = qmix_gguf_fallback_type(qmix_gguf_type_for_bits(bits, 0), t->orig.cols);
            int quant = qmix_ggml_block_elems(type) > 1;
            t->ggml_type = quant ? type : 0;
            t->bits = quant ? bits : 0;
        }
    }
    qmix_fq_opts fo = {.calib = o->calib, .min_tokens = o->min_tokens};
    double e2 = 0, n2 = 0;
    if (qmix_fq_quantize(ts, pool, &fo, &e2, &n2, NULL, err)) return -1;
    cell->w_err2 += e2;
    cell->w_norm2 += n2;
    cell->has_weight = 1;
    return 0;
}

/* ---- calibration: base logits, the matmul tap, the logits callback ----------------------- */

typedef struct run_ctx {
    const qmix_sens_opts *o;
    qmix_model *m;
    qmix_session *s;
    int64_t V;
    int ctx;
    /* base distribution, per scored row: whole logits, or top-k ids + log-probabilities */
    float *base_full;
    int32_t *base_ids;
    float *base_logp;
    int topk;
    int base_pass;
    /* the row under test */
    const target **by_field;       /* installed targets sorted by field address */
    int n_by_field;
    const target *embed;           /* the embed target when under test (a lookup, not a matmul) */
    qmix_sens_cell acc;            /* this pass's output error and KLD */
    float *ybuf;                   /* reference outputs of the tapped matmuls */
    size_t ycap;
    qmix_mm_job *ref;
    int ref_cap;
    float *erow;                   /* [2·D] embed rows */
    int failed;                    /* out of memory inside the tap */
    int64_t done, total;           /* progress units */
} run_ctx;

static int cmp_field(const void *a, const void *b)
{
    const qk_mat *x = (*(const target *const *)a)->field, *y = (*(const target *const *)b)->field;
    return x < y ? -1 : x > y;
}

static const target *find_target(const run_ctx *r, const qk_mat *w)
{
    int lo = 0, hi = r->n_by_field - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const qk_mat *f = r->by_field[mid]->field;
        if (f == w) return r->by_field[mid];
        if (f < w) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

/* After each matmul step: for the jobs reading a quantized view, the same matmul with the
 * original weights on the same activations, and the difference. */
static void tap(void *user, qmix_session *s, const qmix_mm_job *jobs, int n_jobs)
{
    run_ctx *r = user;
    if (r->failed) return;
    size_t need = 0;
    int k = 0;
    for (int j = 0; j < n_jobs; j++) {
        if (!find_target(r, jobs[j].w)) continue;
        need += (size_t)jobs[j].n * (size_t)jobs[j].w->rows;
        k++;
    }
    if (!k) return;
    if (need > r->ycap) {
        free(r->ybuf);
        r->ybuf = malloc(need * sizeof *r->ybuf);
        r->ycap = r->ybuf ? need : 0;
    }
    if (k > r->ref_cap) {
        free(r->ref);
        r->ref = malloc((size_t)k * sizeof *r->ref);
        r->ref_cap = r->ref ? k : 0;
    }
    if (!r->ybuf || !r->ref) {
        r->failed = 1;
        return;
    }
    size_t off = 0;
    k = 0;
    for (int j = 0; j < n_jobs; j++) {
        const target *t = find_target(r, jobs[j].w);
        if (!t) continue;
        r->ref[k++] = (qmix_mm_job){.w = &t->orig, .x = jobs[j].x, .n = jobs[j].n,
                                    .ldx = jobs[j].ldx, .y = r->ybuf + off, .ldy = t->orig.rows};
        off += (size_t)jobs[j].n * (size_t)t->orig.rows;
    }
    s->mm_tap = NULL; /* the reference step must not tap itself */
    qmix_run_matmuls(s, r->ref, k);
    s->mm_tap = tap;
    k = 0;
    for (int j = 0; j < n_jobs; j++) {
        if (!find_target(r, jobs[j].w)) continue;
        const qmix_mm_job *ref = &r->ref[k++];
        double e2 = 0, n2 = 0;
        for (int t = 0; t < jobs[j].n; t++) {
            const float *yq = jobs[j].y + t * jobs[j].ldy, *y0 = ref->y + t * ref->ldy;
            for (int64_t o = 0; o < jobs[j].w->rows; o++) {
                double d = (double)yq[o] - y0[o];
                e2 += d * d;
                n2 += (double)y0[o] * y0[o];
            }
        }
        r->acc.o_err2 += e2;
        r->acc.o_norm2 += n2;
    }
}

static int on_logits(void *user, int window, int row0, int n_rows, const float *logits,
                     const int32_t *win, qmix_err *err)
{
    run_ctx *r = user;
    if (r->failed) return qmix_errf(err, "out of memory measuring the output error");
    int64_t V = r->V;
    for (int i = 0; i < n_rows; i++) {
        int64_t g = (int64_t)window * (r->ctx - 1) + row0 + i;
        const float *row = logits + (int64_t)i * V;
        if (r->base_pass) {
            if (r->base_full) memcpy(r->base_full + g * V, row, (size_t)V * sizeof *row);
            else qmix_topk_logprobs(row, V, r->topk, r->base_ids + g * r->topk,
                                    r->base_logp + g * r->topk);
            continue;
        }
        r->acc.kld_sum += r->base_full ? qmix_kld_full(r->base_full + g * V, row, V)
                                       : qmix_kld_topk(r->base_ids + g * r->topk,
                                                       r->base_logp + g * r->topk, r->topk, row, V);
        r->acc.kld_rows++;
        if (r->embed) { /* the embedding's "output" is the looked-up row */
            int64_t D = r->embed->orig.cols;
            qk_mat_row_f32(&r->embed->orig, win[row0 + i], r->erow);
            qk_mat_row_f32(&r->embed->quant, win[row0 + i], r->erow + D);
            double e2 = 0, n2 = 0;
            for (int64_t d = 0; d < D; d++) {
                double x = (double)r->erow[D + d] - r->erow[d];
                e2 += x * x;
                n2 += (double)r->erow[d] * r->erow[d];
            }
            r->acc.o_err2 += e2;
            r->acc.o_norm2 += n2;
        }
    }
    return 0;
}

static void on_window(void *user, int done, int total)
{
    run_ctx *r = user;
    (void)done;
    (void)total;
    r->done++;
    if (r->o->progress) r->o->progress(r->o->user, r->done, r->total);
}

/* One pass over the calibration windows; 0 done, 1 stopped, -1 error. */
static int run_windows(run_ctx *r, int n_windows, qmix_err *err)
{
    int done = 0;
    return qmix_eval_windows(r->s, r->o->tokens, r->ctx, n_windows, on_logits, r, on_window, r,
                             r->o->stop, &done, err);
}

/* ---- the analysis ------------------------------------------------------------------------ */

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int check_opts(const qmix_model *m, const qmix_sens_opts *o, int *bits, qmix_err *err)
{
    if (o->n_bits < 1 || o->n_bits > QMIX_SENS_MAX_BITS)
        return qmix_errf(err, "between 1 and %d bit widths, got %d", QMIX_SENS_MAX_BITS, o->n_bits);
    if (o->gguf && o->group_size != 32)
        return qmix_errf(err, "GGUF blocks are measured with group_size 32 (blocks of 32 or 256)");
    if (o->gguf && o->method == QMIX_METHOD_GPTQ)
        return qmix_errf(err, "GGUF blocks are measured with rtn or imatrix, not gptq");
    for (int i = 0; i < o->n_bits; i++) {
        if (o->gguf && qmix_gguf_type_for_bits(o->bits[i], 0) < 0)
            return qmix_errf(err, "no GGUF type holds %d bits (2, 3, 4, 5, 6, 8)", o->bits[i]);
        if (!qmix_affine_valid(o->bits[i], o->group_size))
            return qmix_errf(err, "cannot quantize to %d bits with group size %d (bits 2, 3, 4, 5, "
                             "6, 8; group 32, 64, 128)", o->bits[i], o->group_size);
        bits[i] = o->bits[i];
    }
    qsort(bits, (size_t)o->n_bits, sizeof *bits, cmp_int);
    for (int i = 1; i < o->n_bits; i++)
        if (bits[i] == bits[i - 1]) return qmix_errf(err, "%d bits given twice", bits[i]);
    if (o->sample < 0) return qmix_errf(err, "sample must be >= 0");
    if (o->method != 0 && o->method != QMIX_METHOD_RTN && o->method != QMIX_METHOD_GPTQ &&
        o->method != QMIX_METHOD_IMATRIX)
        return qmix_errf(err, "sensitivity measures rtn, gptq or imatrix, not method %d", o->method);
    if ((o->method == QMIX_METHOD_GPTQ || o->method == QMIX_METHOD_IMATRIX) && !o->calib)
        return qmix_errf(err, "%s needs the statistics of qmix calibrate",
                         o->method == QMIX_METHOD_GPTQ ? "gptq" : "imatrix");
    if (o->method == QMIX_METHOD_GPTQ && !qmix_calib_has_hessian(o->calib))
        return qmix_errf(err, "gptq needs statistics with Hessians (qmix calibrate without "
                         "--no-hessian)");
    if (o->tokens) {
        if (o->ctx < 2) return qmix_errf(err, "ctx must be at least 2 tokens, got %d", o->ctx);
        if (qmix_eval_n_windows(o->n_tokens, o->ctx, o->n_windows) < 1)
            return qmix_errf(err, "%lld calibration tokens do not fill one window of %d",
                             (long long)o->n_tokens, o->ctx);
        for (int64_t i = 0; i < o->n_tokens; i++)
            if (o->tokens[i] < 0 || o->tokens[i] >= m->cfg.vocab_size)
                return qmix_errf(err, "calibration token %lld is id %d, outside the vocabulary "
                                 "[0, %d)", (long long)i, o->tokens[i], m->cfg.vocab_size);
    }
    return 0;
}

/* The rows: per role, or per (role, sampled layer); embed and lm_head are single rows. */
static int plan_rows(qmix_model *m, const qmix_sens_opts *o, qmix_sens_result *res)
{
    int cap = qmix_sens_n_roles * (o->per_layer ? m->cfg.n_layers : 1);
    res->rows = calloc((size_t)cap, sizeof *res->rows);
    if (!res->rows) return -1;
    for (int k = 0; k < qmix_sens_n_roles; k++) {
        qmix_role role = qmix_sens_roles[k];
        if (!role_present(m, role)) continue;
        if (!o->per_layer || role_is_global(role)) {
            res->rows[res->n_rows++] =
                (qmix_sens_row){.role = role, .layer = -1, .layers_total = 1, .layers_measured = 1};
            continue;
        }
        int layers[QMIX_MAX_LAYERS], nl = role_layers(m, role, o->sample, layers);
        int all[QMIX_MAX_LAYERS], na = role_layers(m, role, 0, all);
        for (int j = 0; j < nl; j++)
            res->rows[res->n_rows++] = (qmix_sens_row){.role = role, .layer = layers[j],
                                                       .layers_total = na,
                                                       .layers_measured = nl};
    }
    return 0;
}

/* Seconds a full (unsampled) run would take, from what this one measured: quantization time
 * scales with the parameters quantized, model passes with the number of rows (per layer) —
 * a pass costs about the same whichever few matrices are quantized. */
static double estimate_full(const qmix_sens_result *res, double t_base)
{
    double est = t_base;
    for (int k = 0; k < res->n_rows; k++) {
        const qmix_sens_row *row = &res->rows[k];
        double t = row->t_eval;
        if (row->params_measured > 0)
            t += row->t_quant * (double)row->params / (double)row->params_measured;
        est += t * row->layers_total / row->layers_measured;
    }
    return est;
}

int qmix_sensitivity_run(qmix_model *m, const qmix_sens_opts *o, qmix_sens_result *res,
                         qmix_err *err)
{
    memset(res, 0, sizeof *res);
    int bits[QMIX_SENS_MAX_BITS];
    if (check_opts(m, o, bits, err)) return -1;
    double t0 = now_s();
    const qmix_config *c = &m->cfg;
    res->n_bits = o->n_bits;
    memcpy(res->bits, bits, sizeof bits);
    res->group_size = o->group_size;
    res->method = o->method ? o->method : QMIX_METHOD_RTN;
    res->per_layer = o->per_layer;
    res->gguf = o->gguf;
    res->sample = o->sample;
    int E = c->n_experts, experts[4096], n_exp = E, all_experts[4096];
    if (E > 4096) return qmix_errf(err, "%d experts: at most 4096 supported", E);
    if (plan_rows(m, o, res)) return qmix_errf(err, "out of memory");
    n_exp = spread(E, o->sample, experts);
    spread(E, 0, all_experts);

    run_ctx r = {.o = o, .m = m, .V = c->vocab_size, .ctx = o->ctx};
    qmix_pool *pool = qmix_pool_new(o->n_threads);
    tset ts = {0};
    int rc = 0, n_windows = 0;
    double t_base = 0;
    if (!pool) {
        qmix_sens_result_free(res);
        return qmix_errf(err, "out of memory starting threads");
    }
    if (o->tokens) {
        n_windows = qmix_eval_n_windows(o->n_tokens, o->ctx, o->n_windows);
        res->has_calib = 1;
        res->ctx = o->ctx;
        res->n_windows = n_windows;
        res->calib_rows = (int64_t)n_windows * (o->ctx - 1);
        qmix_session_opts so = {.max_ctx = o->ctx, .n_threads = o->n_threads};
        if (qmix_session_new(m, &so, &r.s, err)) {
            rc = -1;
            goto done;
        }
        int64_t rows = res->calib_rows;
        int64_t max_base = o->max_base_bytes > 0 ? o->max_base_bytes : QMIX_SENS_FULL_BASE_BYTES;
        if (rows * r.V * (int64_t)sizeof(float) <= max_base) {
            r.base_full = malloc((size_t)(rows * r.V) * sizeof(float));
        } else {
            r.topk = QMIX_KLD_TOPK_DEFAULT < r.V ? QMIX_KLD_TOPK_DEFAULT : (int)r.V;
            res->base_topk = r.topk;
            r.base_ids = malloc((size_t)(rows * r.topk) * sizeof(int32_t));
            r.base_logp = malloc((size_t)(rows * r.topk) * sizeof(float));
        }
        r.erow = malloc((size_t)(2 * c->hidden_size) * sizeof(float));
        if ((!r.base_full && !r.base_ids) || (r.base_ids && !r.base_logp) || !r.erow) {
            rc = qmix_errf(err, "out of memory for the base logits of %lld calibration tokens",
                           (long long)rows);
            goto done;
        }
    }
    for (int k = 0; k < res->n_rows; k++) {
        qmix_sens_row *row = &res->rows[k];
        int is_exp = row->role == QMIX_ROLE_EXPERTS_GATE_UP || row->role == QMIX_ROLE_EXPERTS_DOWN;
        /* what the row stands for: every layer and expert */
        if (collect(&ts, m, row->role, row->layer, 0, all_experts, E, o->group_size)) goto oom;
        row->params = tset_params(&ts, 0);
        /* what is measured */
        if (collect(&ts, m, row->role, row->layer, o->sample, is_exp ? experts : all_experts,
                    is_exp ? n_exp : E, o->group_size))
            goto oom;
        row->params_measured = tset_params(&ts, 1);
        row->quantizable = row->params_measured > 0;
        for (int j = 0; j < ts.n; j++)
            if (!ts.t[j].quantizable) row->in_dim = ts.t[j].orig.cols;
    }
    r.total = (int64_t)res->n_rows * o->n_bits * (o->tokens ? n_windows : 1) +
              (o->tokens ? n_windows : 0);

    if (o->tokens) { /* the unmodified model's distributions, once */
        double tb = now_s();
        r.base_pass = 1;
        int w = run_windows(&r, n_windows, err);
        r.base_pass = 0;
        t_base = now_s() - tb;
        if (w < 0) {
            rc = -1;
            goto done;
        }
        if (w > 0) {
            res->stopped = 1;
            goto done;
        }
    }

    for (int k = 0; k < res->n_rows && !rc && !res->stopped; k++) {
        qmix_sens_row *row = &res->rows[k];
        int is_exp = row->role == QMIX_ROLE_EXPERTS_GATE_UP || row->role == QMIX_ROLE_EXPERTS_DOWN;
        if (!row->quantizable) {
            r.done += (int64_t)o->n_bits * (o->tokens ? n_windows : 1);
            continue;
        }
        if (collect(&ts, m, row->role, row->layer, o->sample, is_exp ? experts : all_experts,
                    is_exp ? n_exp : E, o->group_size))
            goto oom;
        /* the tap's lookup: installed fields sorted by address */
        const target **by = malloc((size_t)ts.n * sizeof *by);
        if (!by) goto oom;
        r.n_by_field = 0;
        r.embed = NULL;
        for (int j = 0; j < ts.n; j++) {
            if (!ts.t[j].quantizable) continue;
            if (ts.t[j].field == &m->embed) r.embed = &ts.t[j];
            else by[r.n_by_field++] = &ts.t[j];
        }
        qsort(by, (size_t)r.n_by_field, sizeof *by, cmp_field);
        r.by_field = by;

        for (int b = 0; b < o->n_bits && !rc; b++) {
            if (o->stop && *o->stop) {
                res->stopped = 1;
                break;
            }
            qmix_sens_cell *cell = &row->cell[b];
            double tq = now_s();
            if (tset_quantize(&ts, pool, o, bits[b], cell, err)) {
                rc = -1;
                break;
            }
            row->t_quant += now_s() - tq;
            if (!o->tokens) {
                r.done++;
                if (o->progress) o->progress(o->user, r.done, r.total);
            } else {
                double te = now_s();
                memset(&r.acc, 0, sizeof r.acc);
                r.failed = 0;
                qmix_fq_install(&ts);
                r.s->mm_tap = tap;
                r.s->mm_tap_user = &r;
                int w = run_windows(&r, n_windows, err);
                r.s->mm_tap = NULL;
                qmix_fq_restore(&ts);
                row->t_eval += now_s() - te;
                if (w < 0) {
                    rc = -1;
                } else if (w > 0) {
                    res->stopped = 1; /* this cell's pass is incomplete: its weight error stays */
                } else {
                    cell->o_err2 = r.acc.o_err2;
                    cell->o_norm2 = r.acc.o_norm2;
                    cell->has_output = 1;
                    cell->kld_sum = r.acc.kld_sum;
                    cell->kld_rows = r.acc.kld_rows;
                    cell->has_kld = 1;
                }
            }
            qmix_fq_free_copies(&ts);
            if (res->stopped) break;
        }
        free(by);
        r.by_field = NULL;
    }
    goto done;
oom:
    rc = qmix_errf(err, "out of memory");
done:
    qmix_fq_restore(&ts);
    qmix_fq_free_copies(&ts);
    free(ts.t);
    if (r.s) qmix_session_free(r.s);
    qmix_pool_free(pool);
    free(r.base_full);
    free(r.base_ids);
    free(r.base_logp);
    free(r.erow);
    free(r.ybuf);
    free(r.ref);
    res->elapsed_s = now_s() - t0;
    res->full_estimate_s = o->sample > 0 ? estimate_full(res, t_base) : res->elapsed_s;
    if (rc) qmix_sens_result_free(res);
    return rc;
}

void qmix_sens_result_free(qmix_sens_result *r)
{
    free(r->rows);
    r->rows = NULL;
    r->n_rows = 0;
}

double qmix_sens_weight_error(const qmix_sens_cell *c)
{
    return c->has_weight && c->w_norm2 > 0 ? sqrt(c->w_err2 / c->w_norm2) : NAN;
}

double qmix_sens_output_error(const qmix_sens_cell *c)
{
    return c->has_output && c->o_norm2 > 0 ? sqrt(c->o_err2 / c->o_norm2) : NAN;
}

double qmix_sens_kld(const qmix_sens_cell *c)
{
    return c->has_kld && c->kld_rows > 0 ? c->kld_sum / (double)c->kld_rows : NAN;
}

/* ---- ordering and the suggested recipe --------------------------------------------------- */

enum { METRIC_WEIGHT, METRIC_OUTPUT, METRIC_KLD };

static int metric_of(const qmix_sens_result *r)
{
    int kind = METRIC_WEIGHT;
    for (int k = 0; k < r->n_rows; k++) {
        if (r->rows[k].cell[0].has_kld) return METRIC_KLD;
        if (r->rows[k].cell[0].has_output) kind = METRIC_OUTPUT;
    }
    return kind;
}

static double cell_metric(const qmix_sens_cell *c, int kind)
{
    return kind == METRIC_KLD ? qmix_sens_kld(c)
           : kind == METRIC_OUTPUT ? qmix_sens_output_error(c) : qmix_sens_weight_error(c);
}

static int sort_kind;

static int cmp_rows(const void *a, const void *b)
{
    const qmix_sens_row *x = a, *y = b;
    if (x->quantizable != y->quantizable) return y->quantizable - x->quantizable;
    double mx = cell_metric(&x->cell[0], sort_kind), my = cell_metric(&y->cell[0], sort_kind);
    if (isnan(mx)) mx = -1;
    if (isnan(my)) my = -1;
    if (mx != my) return mx < my ? 1 : -1;
    double wx = qmix_sens_weight_error(&x->cell[0]), wy = qmix_sens_weight_error(&y->cell[0]);
    if (!isnan(wx) && !isnan(wy) && wx != wy) return wx < wy ? 1 : -1;
    if (x->role != y->role) return (int)x->role - (int)y->role; /* stable, reproducible order */
    return x->layer - y->layer;
}

void qmix_sens_sort(qmix_sens_result *r)
{
    sort_kind = metric_of(r); /* qsort has no context argument; single-threaded use */
    qsort(r->rows, (size_t)r->n_rows, sizeof *r->rows, cmp_rows);
}

typedef struct role_agg {
    qmix_role role;
    int64_t params;
    int n_opt;                          /* options 0..n_bits-1: bits; n_bits: keep */
    int have[QMIX_SENS_MAX_BITS + 1];
    double err[QMIX_SENS_MAX_BITS + 1];
    int choice;
} role_agg;

static int opt_bits(const qmix_sens_result *r, int i) { return i < r->n_bits ? r->bits[i] : 16; }

typedef struct sbuf { char *p; size_t len, at; int overflow; } sbuf;

static void put(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->at, b->at < b->len ? b->len - b->at : 0, fmt, ap);
    va_end(ap);
    if (n < 0 || b->at + (size_t)n >= b->len) b->overflow = 1;
    else b->at += (size_t)n;
}

int qmix_sens_recipe(const qmix_sens_result *r, double target_bits, const char *label, char *buf,
                     size_t len, qmix_err *err)
{
    int kind = metric_of(r);
    static const char *const kind_name[] = {"relative weight error", "relative output error",
                                            "KLD"};
    if (target_bits <= 0) target_bits = r->bits[0] + 0.25;
    role_agg agg[QMIX_ROLE_COUNT];
    int n_agg = 0;
    for (int k = 0; k < qmix_sens_n_roles; k++) {
        qmix_role role = qmix_sens_roles[k];
        role_agg a = {.role = role, .n_opt = r->n_bits + 1};
        qmix_sens_cell sum[QMIX_SENS_MAX_BITS];
        memset(sum, 0, sizeof sum);
        int any = 0, complete[QMIX_SENS_MAX_BITS];
        for (int b = 0; b < r->n_bits; b++) complete[b] = 1;
        for (int j = 0; j < r->n_rows; j++) {
            const qmix_sens_row *row = &r->rows[j];
            if (row->role != role || !row->quantizable) continue;
            any = 1;
            a.params += row->params;
            for (int b = 0; b < r->n_bits; b++) {
                const qmix_sens_cell *c = &row->cell[b];
                int ok = kind == METRIC_KLD ? c->has_kld
                         : kind == METRIC_OUTPUT ? c->has_output : c->has_weight;
                if (!ok) complete[b] = 0;
                sum[b].has_weight = sum[b].has_output = sum[b].has_kld = 1;
                sum[b].w_err2 += c->w_err2;
                sum[b].w_norm2 += c->w_norm2;
                sum[b].o_err2 += c->o_err2;
                sum[b].o_norm2 += c->o_norm2;
                /* per-layer KLDs add up (to first order) to the role's; sampled layers
                   stand for the unsampled ones */
                if (c->kld_rows)
                    sum[b].kld_sum += c->kld_sum / (double)c->kld_rows * row->layers_total /
                                      row->layers_measured;
                sum[b].kld_rows = 1;
            }
        }
        if (!any) continue;
        int usable = 0;
        for (int b = 0; b < r->n_bits; b++) {
            a.have[b] = complete[b];
            a.err[b] = complete[b] ? cell_metric(&sum[b], kind) : NAN;
            if (isnan(a.err[b])) a.have[b] = 0;
            usable += a.have[b];
        }
        if (!usable) continue; /* not measured (stopped): no rule, so it is kept */
        a.have[r->n_bits] = 1;
        a.err[r->n_bits] = 0;
        a.choice = 0;
        while (!a.have[a.choice]) a.choice++;
        agg[n_agg++] = a;
    }

    /* Greedy upgrades under the budget: best error reduction per extra bit·parameter first. */
    double total = 0, spent = 0;
    for (int k = 0; k < n_agg; k++) {
        total += (double)agg[k].params;
        spent += (double)agg[k].params * opt_bits(r, agg[k].choice);
    }
    double budget = target_bits * total;
    for (;;) {
        int best_k = -1, best_j = -1;
        double best_gain = 0;
        for (int k = 0; k < n_agg; k++) {
            role_agg *a = &agg[k];
            for (int j = a->choice + 1; j < a->n_opt; j++) {
                if (!a->have[j]) continue;
                double extra = (double)a->params * (opt_bits(r, j) - opt_bits(r, a->choice));
                if (spent + extra > budget * (1 + 1e-12)) continue;
                double gain = (a->err[a->choice] - a->err[j]) / extra;
                if (gain > best_gain) {
                    best_gain = gain;
                    best_k = k;
                    best_j = j;
                }
            }
        }
        if (best_k < 0) break;
        spent += (double)agg[best_k].params *
                 (opt_bits(r, best_j) - opt_bits(r, agg[best_k].choice));
        agg[best_k].choice = best_j;
    }

    sbuf b = {buf, len, 0, 0};
    if (len) buf[0] = 0;
    put(&b, "# suggested by qmix sensitivity%s%s: each role at the bits that buy the most\n"
            "# %s reduction per bit spent, within %.2f code bits per weight (spent %.3f, "
            "before scales)\n",
        label ? " on " : "", label ? label : "", kind_name[kind], target_bits,
        total > 0 ? spent / total : 0.0);
    if (r->stopped) put(&b, "# interrupted: built from the roles measured before the stop\n");
    put(&b, "# role: %s at", kind_name[kind]);
    for (int i = 0; i < r->n_bits; i++) put(&b, " %d", r->bits[i]);
    put(&b, " bits -> choice\n");
    for (int k = 0; k < n_agg; k++) {
        put(&b, "#   %-18s", qmix_role_name(agg[k].role));
        for (int i = 0; i < r->n_bits; i++)
            if (agg[k].have[i]) put(&b, " %.4g", agg[k].err[i]);
            else put(&b, " -");
        if (agg[k].choice == r->n_bits) put(&b, " -> keep\n");
        else put(&b, " -> %d\n", opt_bits(r, agg[k].choice));
    }
    put(&b, "# norms and GDN parameters are always kept; roles not listed are kept\n");
    for (int i = 0; i <= r->n_bits; i++) {
        int first = 1;
        for (int k = 0; k < n_agg; k++) {
            if (agg[k].choice != i) continue;
            put(&b, "%s%s", first ? "" : ",", qmix_role_name(agg[k].role));
            first = 0;
        }
        if (first) continue;
        if (i == r->n_bits) put(&b, " keep\n");
        else put(&b, " bits=%d group=%d\n", r->bits[i], r->group_size);
    }
    if (b.overflow) return qmix_errf(err, "recipe text longer than %zu bytes", len);
    return 0;
}

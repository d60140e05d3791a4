/* Fake quantization (see fakequant.h): quantize views into malloc'd MLX affine copies, swap the
 * model's views to them, swap back. */
#include "quant/fakequant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "quant/affine.h"
#include "quant/calib.h"
#include "quant/ggml_blocks.h"
#include "quant/recipe.h"
#include "runtime/threadpool.h"
#include "util/err.h"

int qmix_fq_add(qmix_fq_set *s, qk_mat *field, int alias, int bits, int group, int method,
                int layer, int kind, int expert)
{
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        qmix_fq_target *t = realloc(s->t, (size_t)cap * sizeof *t);
        if (!t) return -1;
        s->t = t;
        s->cap = cap;
    }
    qmix_fq_target *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    t->field = field;
    t->orig = *field;
    t->alias = alias;
    t->bits = bits;
    t->group = group;
    t->method = method;
    t->layer = layer;
    t->kind = kind;
    t->expert = expert;
    /* as qmix_recipe_resolve: only an input dimension divisible by the group is quantized */
    t->quantizable = group > 0 && field->rows > 0 && field->cols > 0 && field->cols % group == 0;
    return 0;
}

/* Adds field if the recipe quantizes the tensor `suffix` of layer L; shape is the tensor's as
 * qmix quantize writes it (ndim 3: the stacked experts, field one expert's matrix). */
static int add_resolved(qmix_fq_set *s, const qmix_model *m, const qmix_recipe *r, int L,
                        const char *suffix, int ndim, const int64_t *shape, qk_mat *field,
                        int method, int kind, int expert, int *added)
{
    char name[192];
    snprintf(name, sizeof name, "language_model.model.layers.%d.%s.weight", L, suffix);
    qmix_qdecision d = qmix_recipe_resolve(r, name, ndim, shape, m->cfg.layer_is_full[L],
                                           m->cfg.n_layers);
    if (!d.bits || field->rows <= 0) return 0;
    if (qmix_fq_add(s, field, -1, d.bits, d.group, d.method ? d.method : method, L, kind, expert))
        return -1;
    ++*added;
    return 0;
}

int qmix_fq_add_layer(qmix_fq_set *s, qmix_model *m, const qmix_recipe *r, int L, int method)
{
    qmix_layer *ly = &m->layers[L];
    const qmix_config *c = &m->cfg;
    int added = 0, rc = 0;
/* a 2-D matrix reading calibration input QMIX_CIN_kind */
#define MAT(suffix, fld, kind)                                                                   \
    rc = rc ? rc                                                                                 \
            : add_resolved(s, m, r, L, suffix, 2, (int64_t[]){ly->fld.rows, ly->fld.cols},      \
                           &ly->fld, method, QMIX_CIN_##kind, -1, &added)
    if (ly->is_full) {
        MAT("self_attn.q_proj", q_proj, ATTN);
        MAT("self_attn.k_proj", k_proj, ATTN);
        MAT("self_attn.v_proj", v_proj, ATTN);
        MAT("self_attn.o_proj", o_proj, ATTN_O);
    } else {
        MAT("linear_attn.in_proj_qkv", in_qkv, ATTN);
        MAT("linear_attn.in_proj_z", in_z, ATTN);
        MAT("linear_attn.in_proj_b", in_b, ATTN);
        MAT("linear_attn.in_proj_a", in_a, ATTN);
        MAT("linear_attn.out_proj", out_proj, GDN_OUT);
    }
    MAT("mlp.gate", router, FFN);
    if (c->shared_ffn > 0) {
        MAT("mlp.shared_expert.gate_proj", shared_gate, FFN);
        MAT("mlp.shared_expert.up_proj", shared_up, FFN);
        MAT("mlp.shared_expert.down_proj", shared_down, SHARED_DOWN);
        MAT("mlp.shared_expert_gate", shared_expert_gate, FFN);
    }
#undef MAT
    for (int e = 0; e < c->n_experts && !rc; e++) {
        qmix_expert *x = &ly->experts[e];
        rc = add_resolved(s, m, r, L, "mlp.switch_mlp.gate_proj", 3,
                          (int64_t[]){c->n_experts, x->gate.rows, x->gate.cols}, &x->gate, method,
                          QMIX_CIN_EXPERT, e, &added) ||
             add_resolved(s, m, r, L, "mlp.switch_mlp.up_proj", 3,
                          (int64_t[]){c->n_experts, x->up.rows, x->up.cols}, &x->up, method,
                          QMIX_CIN_EXPERT, e, &added) ||
             add_resolved(s, m, r, L, "mlp.switch_mlp.down_proj", 3,
                          (int64_t[]){c->n_experts, x->down.rows, x->down.cols}, &x->down, method,
                          QMIX_CIN_EXPERT_DOWN, e, &added);
    }
    return rc ? -1 : added;
}

/* One matrix's quantization, split in row tasks over the pool. */
typedef struct qjob {
    qmix_fq_target *t;
    const qmix_gptq_prep *prep;    /* GPTQ for this matrix, or NULL */
    const float *imp;              /* importance-weighted RTN: E[x²] per input channel, or NULL */
    int64_t rows_per_task;
    double *err2, *norm2;          /* per task, summed in task order: thread-count independent */
    float *scratch;                /* [threads][4·cols + 2·cols/32 + 128] */
    int64_t scratch_per_thread;
} qjob;

/* Adds a row's squared quantization error and squared norm to the task's sums. */
static void add_error(const float *w, const float *deq, int64_t cols, double *e2, double *n2)
{
    for (int64_t c = 0; c < cols; c++) {
        double d = (double)w[c] - deq[c];
        *e2 += d * d;
        *n2 += (double)w[c] * w[c];
    }
}

/* The GGUF block variant of quant_task: rows encoded as the GGUF writer encodes them (from the
 * float32 widening of the source row, importance-weighted when given) and decoded back for the
 * error. */
static void ggml_task(void *arg, int task, int thread)
{
    qjob *q = arg;
    qmix_fq_target *t = q->t;
    int64_t cols = t->orig.cols;
    float *w = q->scratch + (int64_t)thread * q->scratch_per_thread, *deq = w + cols;
    int64_t r0 = (int64_t)task * q->rows_per_task, r1 = r0 + q->rows_per_task;
    if (r1 > t->orig.rows) r1 = t->orig.rows;
    double e2 = 0, n2 = 0;
    for (int64_t r = r0; r < r1; r++) {
        uint8_t *row = (uint8_t *)t->codes + (size_t)r * t->quant.row_bytes;
        qk_mat_row_f32(&t->orig, r, w);
        qmix_ggml_quantize_row(t->ggml_type, w, cols, q->imp, row);
        qmix_ggml_dequant_row(t->ggml_type, row, cols, deq);
        add_error(w, deq, cols, &e2, &n2);
    }
    q->err2[task] = e2;
    q->norm2[task] = n2;
}

static void quant_task(void *arg, int task, int thread)
{
    qjob *q = arg;
    qmix_fq_target *t = q->t;
    int bits = t->bits, group = t->group;
    int64_t cols = t->orig.cols, ng = cols / group, words = qmix_affine_row_words(cols, bits);
    float *w = q->scratch + (int64_t)thread * q->scratch_per_thread, *deq = w + cols,
          *sc = deq + cols, *bi = sc + ng;
    int64_t r0 = (int64_t)task * q->rows_per_task, r1 = r0 + q->rows_per_task;
    if (r1 > t->orig.rows) r1 = t->orig.rows;
    double e2 = 0, n2 = 0;
    for (int64_t r = r0; r < r1; r++) {
        uint32_t *codes = t->codes + r * words;
        uint16_t *s16 = t->scales + r * ng, *b16 = t->biases + r * ng;
        qk_mat_row_f32(&t->orig, r, w);
        float *work = bi + ng; /* [2·cols + 128] */
        if (q->prep)
            qmix_gptq_quantize_row(q->prep, w, bits, QMIX_BF16, work, codes, sc, bi);
        else if (q->imp)
            qmix_wrtn_quantize_row(w, q->imp, cols, bits, group, QMIX_BF16, work, codes, sc, bi);
        else
            qmix_affine_quantize_row(w, cols, bits, group, codes, sc, bi);
        /* stored as qmix quantize stores them (bf16), so the error is the checkpoint's */
        for (int64_t g = 0; g < ng; g++) {
            s16[g] = qk_f32_to_bf16(sc[g]);
            b16[g] = qk_f32_to_bf16(bi[g]);
        }
        qmix_affine_dequantize_row(codes, s16, b16, QMIX_BF16, cols, bits, group, deq);
        add_error(w, deq, cols, &e2, &n2);
    }
    q->err2[task] = e2;
    q->norm2[task] = n2;
}

void qmix_fq_free_copies(qmix_fq_set *s)
{
    for (int k = 0; k < s->n; k++) {
        qmix_fq_target *t = &s->t[k];
        if (t->alias < 0) {
            free(t->codes);
            free(t->scales);
            free(t->biases);
        }
        t->codes = NULL;
        t->scales = t->biases = NULL;
        memset(&t->quant, 0, sizeof t->quant);
    }
}

/* The statistics of target t, from the file or the collector; NULL when there are none. */
static const qmix_calib_entry *stats_of(const qmix_fq_opts *o, const qmix_fq_target *t,
                                        qmix_calib_entry *tmp)
{
    if (t->kind < 0) return NULL;
    if (o->calib) return qmix_calib_get(o->calib, t->layer, t->kind, t->expert);
    if (o->collector && qmix_calib_collector_entry(o->collector, t->layer, t->kind, t->expert, tmp))
        return tmp;
    return NULL;
}

/* What a calibrated method needs for target t: *prep prepared for GPTQ (returns QMIX_FQ_GPTQ),
 * imp filled for importance-weighted RTN (QMIX_FQ_IMATRIX), or QMIX_FQ_RTN: round to nearest
 * (RTN asked, no statistics, too few calibration rows, or no damping made H positive definite —
 * as qmix quantize falls back). -1 on error. */
static int prepare_method(const qmix_fq_opts *o, const qmix_fq_target *t, qmix_pool *pool,
                          qmix_gptq_prep *prep, float *imp, qmix_fq_counts *cnt, qmix_err *err)
{
    if (t->method != QMIX_METHOD_GPTQ && t->method != QMIX_METHOD_IMATRIX) return QMIX_FQ_RTN;
    if (t->ggml_type > 0 && t->method == QMIX_METHOD_GPTQ)
        return qmix_errf(err, "GPTQ does not map onto GGUF blocks (rtn or imatrix)");
    qmix_calib_entry tmp;
    const qmix_calib_entry *e = stats_of(o, t, &tmp);
    if (!e || e->n == 0) {
        if (!e) cnt->fb_nostats++;
        else cnt->fb_tokens++;
        return QMIX_FQ_RTN;
    }
    if (e->k != t->orig.cols)
        return qmix_errf(err, "the statistics of layer %d (%s) have %lld input channels, the "
                         "matrix %lld (calibrated on another model?)", t->layer,
                         qmix_calib_kind_name(t->kind), (long long)e->k, (long long)t->orig.cols);
    if (t->method == QMIX_METHOD_IMATRIX) {
        for (int64_t j = 0; j < e->k; j++) imp[j] = (float)(e->sumsq[j] / (double)e->n);
        return QMIX_FQ_IMATRIX;
    }
    if (!e->xtx) {
        cnt->fb_nostats++;
        return QMIX_FQ_RTN;
    }
    if ((int64_t)e->n < o->min_tokens) {
        cnt->fb_tokens++;
        return QMIX_FQ_RTN;
    }
    qmix_gptq_opts go = o->gptq;
    go.pool = pool; /* between the row jobs: idle */
    int r = qmix_gptq_prepare(e->xtx, NULL, e->k, t->group, &go, prep, err);
    if (r < 0) return -1;
    if (r > 0) {
        cnt->fb_cholesky++;
        return QMIX_FQ_RTN;
    }
    return QMIX_FQ_GPTQ;
}

static int wants_copy(const qmix_fq_target *t)
{
    return t->quantizable && t->alias < 0 && t->bits > 0;
}

int qmix_fq_quantize(qmix_fq_set *s, qmix_pool *pool, const qmix_fq_opts *o, double *err2,
                     double *norm2, qmix_fq_counts *counts, qmix_err *err)
{
    const int64_t rows_per_task = 16;
    int threads = qmix_pool_threads(pool);
    if (threads < 1) threads = 1;
    int64_t max_cols = 0, max_tasks = 1;
    for (int k = 0; k < s->n; k++) {
        const qmix_fq_target *t = &s->t[k];
        if (!wants_copy(t)) continue;
        if (t->ggml_type > 0 ? !qmix_ggml_can_quantize(t->ggml_type) ||
                                   !qmix_ggml_row_bytes(t->ggml_type, t->orig.cols)
                             : !qmix_affine_valid(t->bits, t->group))
            return qmix_errf(err, t->ggml_type > 0 ? "cannot write %d-wide rows as GGUF type %d"
                                                   : "cannot quantize to %d bits with group size %d",
                             t->ggml_type > 0 ? (int)t->orig.cols : t->bits,
                             t->ggml_type > 0 ? t->ggml_type : t->group);
        if (t->orig.cols > max_cols) max_cols = t->orig.cols;
        int64_t tasks = (t->orig.rows + rows_per_task - 1) / rows_per_task;
        if (tasks > max_tasks) max_tasks = tasks;
    }
    if (max_tasks > (1 << 30)) return qmix_errf(err, "matrix too large to quantize in memory");
    /* per thread: w, deq [cols] each, scales and biases [cols/32 at the smallest group], the
       GPTQ / weighted-RTN work area [2·cols + 128] */
    int64_t per_thread = 4 * max_cols + 2 * (max_cols / 32 + 1) + 128;
    float *scratch = malloc((size_t)(threads * per_thread + 1) * sizeof *scratch);
    double *sums = malloc((size_t)(2 * max_tasks) * sizeof *sums);
    float *imp = malloc((size_t)(max_cols + 1) * sizeof *imp);
    if (!scratch || !sums || !imp) {
        free(scratch);
        free(sums);
        free(imp);
        return qmix_errf(err, "out of memory quantizing");
    }
    qmix_fq_counts cnt = {0};
    double e2 = 0, n2 = 0;
    int rc = 0;
    for (int k = 0; k < s->n && !rc; k++) {
        qmix_fq_target *t = &s->t[k];
        t->how = QMIX_FQ_NONE;
        if (!wants_copy(t)) continue;
        int64_t rows = t->orig.rows, cols = t->orig.cols, ng = cols / t->group;
        int64_t words = qmix_affine_row_words(cols, t->bits);
        size_t grb = t->ggml_type > 0 ? qmix_ggml_row_bytes(t->ggml_type, cols) : 0;
        if (grb) {
            /* one allocation of encoded rows; the scale arrays stay empty */
            t->codes = malloc((size_t)rows * grb);
            t->scales = t->biases = NULL;
            t->quant = (qk_mat){.dtype = QMIX_U8, .rows = rows, .cols = cols, .row_bytes = grb,
                                .ggml_type = t->ggml_type};
        } else {
            t->codes = malloc((size_t)(rows * words) * sizeof *t->codes);
            t->scales = malloc((size_t)(rows * ng) * sizeof *t->scales);
            t->biases = malloc((size_t)(rows * ng) * sizeof *t->biases);
        }
        if (!t->codes || (!grb && (!t->scales || !t->biases))) {
            rc = qmix_errf(err, "out of memory for a %lld x %lld quantized copy", (long long)rows,
                           (long long)cols);
            break;
        }
        int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
        qmix_gptq_prep prep = {0};
        int how = prepare_method(o, t, pool, &prep, imp, &cnt, err);
        if (how < 0) {
            rc = -1;
            break;
        }
        t->how = how;
        cnt.rtn += how == QMIX_FQ_RTN;
        cnt.gptq += how == QMIX_FQ_GPTQ;
        cnt.imatrix += how == QMIX_FQ_IMATRIX;
        qjob q = {.t = t, .prep = how == QMIX_FQ_GPTQ ? &prep : NULL,
                  .imp = how == QMIX_FQ_IMATRIX ? imp : NULL, .rows_per_task = rows_per_task,
                  .err2 = sums, .norm2 = sums + max_tasks, .scratch = scratch,
                  .scratch_per_thread = per_thread};
        qmix_pool_run(pool, grb ? ggml_task : quant_task, &q, (int)tasks);
        qmix_gptq_prep_free(&prep);
        for (int64_t j = 0; j < tasks; j++) {
            e2 += q.err2[j];
            n2 += q.norm2[j];
        }
        if (grb) {
            t->quant.data = t->codes;
            continue;
        }
        t->quant = (qk_mat){.dtype = QMIX_U32, .rows = rows, .cols = cols,
                            .row_bytes = (size_t)words * sizeof(uint32_t), .data = t->codes,
                            .bits = t->bits, .group_size = t->group, .scale_dtype = QMIX_BF16,
                            .scales = t->scales, .biases = t->biases,
                            .scale_row_bytes = (size_t)ng * sizeof(uint16_t)};
    }
    for (int k = 0; k < s->n && !rc; k++) {
        qmix_fq_target *t = &s->t[k];
        if (t->alias < 0) continue;
        const qmix_fq_target *a = &s->t[t->alias];
        t->quant = a->quant;
        t->how = a->how;
    }
    free(scratch);
    free(sums);
    free(imp);
    if (rc) {
        qmix_fq_free_copies(s);
        return -1;
    }
    if (err2) *err2 += e2;
    if (norm2) *norm2 += n2;
    if (counts) {
        counts->rtn += cnt.rtn;
        counts->gptq += cnt.gptq;
        counts->imatrix += cnt.imatrix;
        counts->fb_nostats += cnt.fb_nostats;
        counts->fb_tokens += cnt.fb_tokens;
        counts->fb_cholesky += cnt.fb_cholesky;
    }
    return 0;
}

void qmix_fq_install(qmix_fq_set *s)
{
    for (int k = 0; k < s->n; k++)
        if (s->t[k].quant.data) *s->t[k].field = s->t[k].quant;
}

void qmix_fq_restore(qmix_fq_set *s)
{
    for (int k = 0; k < s->n; k++) *s->t[k].field = s->t[k].orig;
}

void qmix_fq_free(qmix_fq_set *s)
{
    qmix_fq_restore(s);
    qmix_fq_free_copies(s);
    free(s->t);
    s->t = NULL;
    s->n = s->cap = 0;
}

uint64_t qmix_fq_bytes(const qmix_fq_set *s)
{
    uint64_t b = 0;
    for (int k = 0; k < s->n; k++) {
        const qmix_fq_target *t = &s->t[k];
        if (t->alias >= 0 || !t->quant.data) continue;
        b += (uint64_t)t->quant.rows * (t->quant.row_bytes + 2 * t->quant.scale_row_bytes);
    }
    return b;
}

/* Calibration statistics: collecting through the matmul tap, writing the .qcal file (see
 * calib.h; the reader is calib_read.c). */
#include "quant/calib.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "runtime/session.h"
#include "runtime/threadpool.h"
#include "util/hot.h"
#include "util/err.h"

static int64_t kind_k(const qmix_config *c, int kind)
{
    switch (kind) {
    case QMIX_CIN_ATTN: case QMIX_CIN_FFN: case QMIX_CIN_EXPERT: case QMIX_CIN_HEAD:
        return c->hidden_size;
    case QMIX_CIN_ATTN_O: return (int64_t)c->n_heads * c->head_dim;
    case QMIX_CIN_GDN_OUT: return (int64_t)c->lin_n_v_heads * c->lin_v_head_dim;
    case QMIX_CIN_SHARED_DOWN: return c->shared_ffn;
    case QMIX_CIN_EXPERT_DOWN: return c->moe_ffn;
    default: return 0;
    }
}

/* The canonical entry list of layer `layer` (−1: head): calls fn for each (kind, expert). */
typedef void (*entry_fn)(void *u, int layer, int kind, int expert, int64_t k);
static void layer_entries(const qmix_config *c, int layer, entry_fn fn, void *u)
{
    if (layer < 0) {
        fn(u, -1, QMIX_CIN_HEAD, -1, kind_k(c, QMIX_CIN_HEAD));
        return;
    }
    fn(u, layer, QMIX_CIN_ATTN, -1, kind_k(c, QMIX_CIN_ATTN));
    int o = c->layer_is_full[layer] ? QMIX_CIN_ATTN_O : QMIX_CIN_GDN_OUT;
    fn(u, layer, o, -1, kind_k(c, o));
    fn(u, layer, QMIX_CIN_FFN, -1, kind_k(c, QMIX_CIN_FFN));
    if (c->shared_ffn > 0) fn(u, layer, QMIX_CIN_SHARED_DOWN, -1, kind_k(c, QMIX_CIN_SHARED_DOWN));
    for (int e = 0; e < c->n_experts; e++) fn(u, layer, QMIX_CIN_EXPERT, e, kind_k(c, QMIX_CIN_EXPERT));
    for (int e = 0; e < c->n_experts; e++)
        fn(u, layer, QMIX_CIN_EXPERT_DOWN, e, kind_k(c, QMIX_CIN_EXPERT_DOWN));
}

typedef struct sizer { uint64_t bytes; int n, hessian; } sizer;
static void size_one(void *u, int layer, int kind, int expert, int64_t k)
{
    sizer *s = u;
    s->bytes += qmix_calib_record_bytes(k, s->hessian);
    s->n++;
}

uint64_t qmix_calib_layer_bytes(const qmix_config *cfg, int layer, int hessian)
{
    sizer s = {.hessian = hessian};
    layer_entries(cfg, layer, size_one, &s);
    return s.bytes;
}

int qmix_calib_total_entries(const qmix_config *cfg)
{
    sizer s = {0};
    for (int l = -1; l < cfg->n_layers; l++) layer_entries(cfg, l, size_one, &s);
    return s.n;
}

/* ---- collecting ------------------------------------------------------------------------ */

typedef struct centry {
    int layer, kind, expert;
    int64_t k;
    uint64_t n;
    double *sumsq, *xtx;
    uint64_t stamp;       /* tap call that last accumulated it (shared inputs count once) */
} centry;

typedef struct view_ref { const qk_mat *w; int entry; } view_ref;

/* One accumulation of a step: rows of x into an entry. */
typedef struct acc_job { centry *e; const float *x; int n; int64_t ldx; } acc_job;

struct qmix_calib_collector {
    qmix_session *s;
    int hessian, failed;
    centry *e;
    int n, cap;
    view_ref *views;
    int n_views, cap_views;
    uint64_t stamp;
    acc_job *jobs;
    int n_jobs, cap_jobs;
    int stripes;          /* row stripes per job (parallel tasks) */
};

static int add_view(qmix_calib_collector *c, const qk_mat *w, int entry)
{
    if (c->n_views == c->cap_views) {
        int cap = c->cap_views ? 2 * c->cap_views : 64;
        view_ref *v = realloc(c->views, (size_t)cap * sizeof *v);
        if (!v) return -1;
        c->views = v;
        c->cap_views = cap;
    }
    c->views[c->n_views++] = (view_ref){w, entry};
    return 0;
}

typedef struct build_ctx { qmix_calib_collector *c; int fail; } build_ctx;
static void add_entry(void *u, int layer, int kind, int expert, int64_t k)
{
    build_ctx *b = u;
    qmix_calib_collector *c = b->c;
    if (b->fail) return;
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 64;
        centry *e = realloc(c->e, (size_t)cap * sizeof *e);
        if (!e) { b->fail = 1; return; }
        c->e = e;
        c->cap = cap;
    }
    centry *e = &c->e[c->n];
    memset(e, 0, sizeof *e);
    e->layer = layer; e->kind = kind; e->expert = expert; e->k = k;
    e->sumsq = calloc((size_t)k, sizeof *e->sumsq);
    if (c->hessian) e->xtx = calloc((size_t)k * (size_t)(k + 1) / 2, sizeof *e->xtx);
    if (!e->sumsq || (c->hessian && !e->xtx)) {
        free(e->sumsq);
        free(e->xtx);
        b->fail = 1;
        return;
    }
    c->n++;
}

static int cmp_view(const void *a, const void *b)
{
    const qk_mat *x = ((const view_ref *)a)->w, *y = ((const view_ref *)b)->w;
    return x < y ? -1 : x > y;
}

static int find_view(const qmix_calib_collector *c, const qk_mat *w)
{
    int lo = 0, hi = c->n_views - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c->views[mid].w == w) return c->views[mid].entry;
        if (c->views[mid].w < w) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* Task = (job, stripe): rows i ≡ stripe (mod stripes) of that job's Hessian, so no two tasks
 * write the same row and the triangle's uneven rows spread over the stripes. */
QMIX_HOT_LOOP static void acc_task(void *ctx, int task, int thread)
{
    qmix_calib_collector *c = ctx;
    const acc_job *j = &c->jobs[task / c->stripes];
    int st = task % c->stripes;
    centry *e = j->e;
    const int64_t k = e->k;
    for (int64_t i = st; i < k; i += c->stripes) {
        double ss = 0;
        double *hrow = e->xtx ? e->xtx + i * k - i * (i - 1) / 2 : NULL;
        for (int t = 0; t < j->n; t++) {
            const float *x = j->x + (int64_t)t * j->ldx;
            double xi = x[i];
            ss += xi * xi;
            if (!hrow || xi == 0) continue;
            for (int64_t q = i; q < k; q++) hrow[q - i] += xi * (double)x[q];
        }
        e->sumsq[i] += ss;
    }
}

static void tap(void *user, qmix_session *s, const qmix_mm_job *jobs, int n_jobs)
{
    qmix_calib_collector *c = user;
    if (c->failed) return;
    c->stamp++;
    c->n_jobs = 0;
    for (int i = 0; i < n_jobs; i++) {
        int ei = find_view(c, jobs[i].w);
        if (ei < 0 || jobs[i].n <= 0) continue;
        centry *e = &c->e[ei];
        if (e->stamp == c->stamp) continue; /* q/k/v, gate/up: one input, counted once */
        if (jobs[i].w->cols != e->k) { c->failed = 1; return; }
        e->stamp = c->stamp;
        if (c->n_jobs == c->cap_jobs) {
            int cap = c->cap_jobs ? 2 * c->cap_jobs : 64;
            acc_job *a = realloc(c->jobs, (size_t)cap * sizeof *a);
            if (!a) { c->failed = 1; return; }
            c->jobs = a;
            c->cap_jobs = cap;
        }
        c->jobs[c->n_jobs++] = (acc_job){e, jobs[i].x, jobs[i].n, jobs[i].ldx};
        e->n += (uint64_t)jobs[i].n;
    }
    if (c->n_jobs) qmix_pool_run(s->pool, acc_task, c, c->n_jobs * c->stripes);
}

int qmix_calib_collector_new(qmix_session *s, int lo, int hi, int with_head, int hessian,
                             qmix_calib_collector **out, qmix_err *err)
{
    *out = NULL;
    const qmix_model *m = s->model;
    const qmix_config *cfg = &m->cfg;
    if (lo < 0 || hi > cfg->n_layers || lo > hi)
        return qmix_errf(err, "calibrate: layer range %d-%d outside 0-%d", lo, hi, cfg->n_layers);
    qmix_calib_collector *c = calloc(1, sizeof *c);
    if (!c) return qmix_errf(err, "out of memory");
    c->s = s;
    c->hessian = hessian;
    int th = qmix_pool_threads(s->pool);
    c->stripes = 4 * (th > 0 ? th : 1);
    build_ctx b = {c, 0};
    int rc = 0;
    for (int l = lo; l < hi && !b.fail; l++) {
        const qmix_layer *ly = &m->layers[l];
        int first = c->n;
        layer_entries(cfg, l, add_entry, &b);
        if (b.fail) break;
        int ei = first;
        int a = ei++, o = ei++, f = ei++, sd = cfg->shared_ffn > 0 ? ei++ : -1;
        int ex = ei, exd = ei + cfg->n_experts;
        if (ly->is_full) {
            rc |= add_view(c, &ly->q_proj, a) | add_view(c, &ly->k_proj, a) |
                  add_view(c, &ly->v_proj, a) | add_view(c, &ly->o_proj, o);
        } else {
            rc |= add_view(c, &ly->in_qkv, a) | add_view(c, &ly->in_z, a) |
                  add_view(c, &ly->in_b, a) | add_view(c, &ly->in_a, a) |
                  add_view(c, &ly->out_proj, o);
        }
        rc |= add_view(c, &ly->router, f) | add_view(c, &ly->shared_gate, f) |
              add_view(c, &ly->shared_up, f) | add_view(c, &ly->shared_expert_gate, f);
        if (sd >= 0) rc |= add_view(c, &ly->shared_down, sd);
        for (int e = 0; e < cfg->n_experts; e++)
            rc |= add_view(c, &ly->experts[e].gate, ex + e) | add_view(c, &ly->experts[e].up, ex + e) |
                  add_view(c, &ly->experts[e].down, exd + e);
    }
    if (!b.fail && with_head) {
        int h = c->n;
        layer_entries(cfg, -1, add_entry, &b);
        if (!b.fail) rc |= add_view(c, &m->lm_head, h);
    }
    if (b.fail || rc) {
        qmix_calib_collector_free(c);
        return qmix_errf(err, "calibrate: out of memory for the statistics of layers %d-%d "
                         "(%.1f MiB per layer)", lo, hi - 1,
                         (double)qmix_calib_layer_bytes(cfg, lo, hessian) / 1048576.0);
    }
    qsort(c->views, (size_t)c->n_views, sizeof *c->views, cmp_view);
    s->mm_tap = tap;
    s->mm_tap_user = c;
    *out = c;
    return 0;
}

void qmix_calib_collector_free(qmix_calib_collector *c)
{
    if (!c) return;
    if (c->s && c->s->mm_tap_user == c) {
        c->s->mm_tap = NULL;
        c->s->mm_tap_user = NULL;
    }
    for (int i = 0; i < c->n; i++) {
        free(c->e[i].sumsq);
        free(c->e[i].xtx);
    }
    free(c->e);
    free(c->views);
    free(c->jobs);
    free(c);
}

int qmix_calib_collector_failed(const qmix_calib_collector *c) { return c->failed; }

int qmix_calib_collector_entry(const qmix_calib_collector *c, int layer, int kind, int expert,
                               qmix_calib_entry *out)
{
    /* a layer has a few hundred entries at most (2 per expert): a scan is cheap next to the
       quantization that asks */
    for (int i = 0; i < c->n; i++) {
        const centry *e = &c->e[i];
        if (e->layer != layer || e->kind != kind || e->expert != expert) continue;
        *out = (qmix_calib_entry){.layer = e->layer, .kind = e->kind, .expert = e->expert,
                                  .k = e->k, .n = e->n, .sumsq = e->sumsq, .xtx = e->xtx};
        return 1;
    }
    return 0;
}

static int wr(FILE *f, const void *p, size_t n, qmix_err *err)
{
    if (n && fwrite(p, 1, n, f) != n) return qmix_errf(err, "write failed: %s", strerror(errno));
    return 0;
}

int qmix_calib_write_header(FILE *f, const qmix_calib_header *h, qmix_err *err)
{
    uint8_t b[48] = {0};
    size_t dlen = h->dataset ? strlen(h->dataset) : 0;
    if (dlen > 4096) dlen = 4096;
    uint32_t flags = (h->hessian ? 1u : 0u) | (h->sequential ? 2u : 0u);
    uint32_t v32[] = {1, flags, (uint32_t)h->n_layers, (uint32_t)h->n_experts,
                      (uint32_t)h->n_entries, (uint32_t)h->ctx};
    memcpy(b, "QMIXCAL1", 8);
    memcpy(b + 8, v32, sizeof v32);
    memcpy(b + 32, &h->n_tokens, 8);
    uint32_t nw = (uint32_t)h->n_windows, dl = (uint32_t)dlen;
    memcpy(b + 40, &nw, 4);
    memcpy(b + 44, &dl, 4);
    static const uint8_t zero[8];
    if (wr(f, b, 48, err) || wr(f, h->dataset, dlen, err) || wr(f, zero, (8 - dlen % 8) % 8, err))
        return -1;
    return 0;
}

int qmix_calib_write_records(FILE *f, const qmix_calib_collector *c, qmix_err *err)
{
    if (c->failed)
        return qmix_errf(err, "calibrate: statistics incomplete (out of memory or a matrix "
                         "whose width disagrees with the geometry)");
    for (int i = 0; i < c->n; i++) {
        const centry *e = &c->e[i];
        uint8_t r[32];
        int32_t l = e->layer, x = e->expert;
        uint32_t k = (uint32_t)e->kind, z = 0;
        uint64_t kk = (uint64_t)e->k;
        memcpy(r, &l, 4); memcpy(r + 4, &k, 4); memcpy(r + 8, &x, 4); memcpy(r + 12, &z, 4);
        memcpy(r + 16, &kk, 8); memcpy(r + 24, &e->n, 8);
        if (wr(f, r, 32, err) || wr(f, e->sumsq, (size_t)e->k * 8, err)) return -1;
        if (c->hessian && wr(f, e->xtx, (size_t)e->k * (size_t)(e->k + 1) / 2 * 8, err)) return -1;
    }
    return c->n;
}

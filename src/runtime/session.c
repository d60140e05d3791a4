#include "runtime/session.h"

#include <stdlib.h>
#include <string.h>

#include "model/forward.h"
#include "util/err.h"

/* ---- parallel matmuls -------------------------------------------------------------------- */

typedef struct mm_ctx { const qmix_mm_job *jobs; const qmix_mm_task *tasks; } mm_ctx;

static void mm_task(void *arg, int task, int thread)
{
    const mm_ctx *c = arg;
    const qmix_mm_task *t = &c->tasks[task];
    const qmix_mm_job *j = &c->jobs[t->job];
    qk_matmul(j->w, t->row_begin, t->row_end, j->x, j->n, j->ldx, j->y, j->ldy);
}

/* Rows per task: enough tasks to balance the threads, each a multiple of 8 rows (the decode
 * tile), never so small that dispatch costs more than the work. */
static int64_t chunk_rows(int64_t rows, int threads)
{
    int64_t want = (rows + 4 * threads - 1) / (4 * threads);
    if (want < 16) want = 16;
    return (want + 7) & ~(int64_t)7;
}

void qmix_run_matmuls(qmix_session *s, const qmix_mm_job *jobs, int n_jobs)
{
    int threads = qmix_pool_threads(s->pool), n_tasks = 0;
    for (int j = 0; j < n_jobs; j++) {
        int64_t rows = jobs[j].w->rows, step = chunk_rows(rows, threads);
        for (int64_t r = 0; r < rows && n_tasks < s->max_tasks; r += step)
            s->tasks[n_tasks++] = (qmix_mm_task){j, r, r + step < rows ? r + step : rows};
    }
    mm_ctx ctx = {jobs, s->tasks};
    qmix_pool_run(s->pool, mm_task, &ctx, n_tasks);
    if (s->mm_tap) s->mm_tap(s->mm_tap_user, s, jobs, n_jobs);
}

/* ---- allocation -------------------------------------------------------------------------- */

/* kv / state tally the KV cache and the Gated DeltaNet state (in floats) for the sizing-only
 * callers, which report them apart from the scratch. */
typedef struct sizer { float *base; size_t used, kv, state; } sizer;

/* Two passes over the same carve calls: the first (base NULL) sums, the second hands out. */
static float *carve(sizer *z, size_t count)
{
    float *p = z->base ? z->base + z->used : NULL;
    z->used += (count + 15) & ~(size_t)15; /* 64-byte alignment for every buffer */
    return p;
}

/* Batch size of a session holding max_ctx tokens. */
static int batch_of(int max_ctx) { return max_ctx < QMIX_MAX_BATCH ? max_ctx : QMIX_MAX_BATCH; }

/* The one list of a session's buffers. The session's fields are written only when s->state is
 * set (the allocating pass); qmix_session_size runs it on a blank session, so the size the planner
 * predicts and the size a session allocates come from the same code. */
static void carve_all(qmix_session *s, const qmix_config *c, size_t threads, sizer *z)
{
    size_t B = (size_t)s->max_batch, D = c->hidden_size, E = c->n_experts, k = c->n_experts_used;
    size_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
           dv = c->lin_v_head_dim, C = 2 * nk * dk + nv * dv, Kc = c->conv_kernel;
    size_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, ctx = (size_t)s->max_ctx;
    size_t per_thread = ctx;

    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state blank, *st = s->state ? &s->state[i] : &blank;
        size_t before = z->used;
        if (c->layer_is_full[i]) {
            st->k_cache = carve(z, ctx * KV * hd);
            st->v_cache = carve(z, ctx * KV * hd);
            z->kv += z->used - before;
        } else {
            st->conv = carve(z, (Kc - 1) * C);
            st->ssm = carve(z, nv * dk * dv);
            z->state += z->used - before;
        }
    }
    s->x = carve(z, B * D);
    s->h = carve(z, B * D);
    s->out = carve(z, B * D);
    s->qkv = carve(z, B * C);
    s->z = carve(z, B * nv * dv);
    s->gdn_a = carve(z, B * nv);
    s->gdn_b = carve(z, B * nv);
    s->gdn_o = carve(z, B * nv * dv);
    s->q = carve(z, B * H * 2 * hd);
    s->k = carve(z, B * KV * hd);
    s->v = carve(z, B * KV * hd);
    s->attn = carve(z, B * H * hd);
    s->scores = carve(z, threads * per_thread);
    s->gdn_scratch_per_thread = (int64_t)(2 * B + qk_delta_rule_chunked_scratch(
                                          (int)dk, (int)dv, QMIX_GDN_CHUNK) + dv + 15) & ~(int64_t)15;
    s->gdn_scratch = carve(z, threads * (size_t)s->gdn_scratch_per_thread);
    s->router = carve(z, B * E);
    s->top_weight = carve(z, B * k);
    s->moe_x = carve(z, B * k * D);
    s->moe_gate = carve(z, B * k * c->moe_ffn);
    s->moe_up = carve(z, B * k * c->moe_ffn);
    s->moe_y = carve(z, B * k * D);
    s->sh_gate = carve(z, B * c->shared_ffn);
    s->sh_up = carve(z, B * c->shared_ffn);
    s->sh_y = carve(z, B * D);
    s->sh_g = carve(z, B);
    s->logits = carve(z, (size_t)c->vocab_size);
    s->norm_last = carve(z, D);
    /* integer buffers share the arena (int and float are both 4 bytes) */
    s->top_expert = (int *)carve(z, B * k);
    s->expert_count = (int *)carve(z, E);
    s->expert_start = (int *)carve(z, E);
    s->slot_token = (int *)carve(z, B * k);
    s->token_slot = (int *)carve(z, B * k);
}

static int jobs_of(const qmix_config *c) { return 2 * c->n_experts + 8; }
static int tasks_of(const qmix_config *c, int threads) { return jobs_of(c) * 4 * threads + 64; }

void qmix_session_size(const qmix_config *cfg, int max_ctx, int n_threads, qmix_session_sizes *out)
{
    if (max_ctx <= 0) max_ctx = 4096;
    int threads = n_threads > 0 ? n_threads : qmix_pool_default_threads();
    qmix_session blank = {.max_ctx = max_ctx, .max_batch = batch_of(max_ctx)};
    sizer z = {0};
    carve_all(&blank, cfg, (size_t)threads, &z);
    out->kv = z.kv * sizeof(float);
    out->state = z.state * sizeof(float);
    out->scratch = (z.used - z.kv - z.state) * sizeof(float);
    out->arena = z.used * sizeof(float);
    out->other = sizeof(qmix_session) + (size_t)cfg->n_layers * sizeof(qmix_layer_state) +
                 (size_t)jobs_of(cfg) * sizeof(qmix_mm_job) +
                 (size_t)tasks_of(cfg, threads) * sizeof(qmix_mm_task);
    out->total = out->arena + out->other;
}

size_t qmix_session_bytes(const qmix_config *cfg, int max_ctx, int n_threads)
{
    qmix_session_sizes sz;
    qmix_session_size(cfg, max_ctx, n_threads, &sz);
    return sz.total;
}

int qmix_session_new(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                     qmix_err *err)
{
    *out = NULL;
    const qmix_config *c = &model->cfg;
    int max_ctx = opts && opts->max_ctx > 0 ? opts->max_ctx : 4096;
    qmix_session *s = calloc(1, sizeof *s);
    if (!s) return qmix_errf(err, "out of memory");
    s->model = model;
    s->max_ctx = max_ctx;
    s->max_batch = batch_of(max_ctx);
    s->pool = qmix_pool_new(opts ? opts->n_threads : 0);
    s->state = calloc((size_t)c->n_layers, sizeof *s->state);
    int threads = s->pool ? qmix_pool_threads(s->pool) : 1;
    s->max_jobs = jobs_of(c);
    s->max_tasks = tasks_of(c, threads);
    s->jobs = calloc((size_t)s->max_jobs, sizeof *s->jobs);
    s->tasks = calloc((size_t)s->max_tasks, sizeof *s->tasks);
    if (!s->pool || !s->state || !s->jobs || !s->tasks) {
        qmix_session_free(s);
        return qmix_errf(err, "out of memory creating a session");
    }
    sizer z = {0};
    carve_all(s, c, (size_t)threads, &z);
    size_t bytes = z.used * sizeof(float);
    void *arena = NULL;
    if (posix_memalign(&arena, 64, bytes)) {
        qmix_session_free(s);
        return qmix_errf(err, "out of memory: a session with max_ctx %d needs %.1f MiB", max_ctx,
                         bytes / 1048576.0);
    }
    z = (sizer){.base = arena};
    carve_all(s, c, (size_t)threads, &z);
    s->arena = arena;
    s->arena_bytes = bytes;
    qmix_session_reset(s);
    *out = s;
    return 0;
}

void qmix_session_free(qmix_session *s)
{
    if (!s) return;
    if (s->pool) qmix_pool_free(s->pool);
    free(s->arena);
    free(s->state);
    free(s->jobs);
    free(s->tasks);
    free(s);
}

void qmix_session_reset(qmix_session *s)
{
    const qmix_config *c = &s->model->cfg;
    size_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
           dv = c->lin_v_head_dim, C = 2 * nk * dk + nv * dv;
    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state *st = &s->state[i];
        if (st->conv) memset(st->conv, 0, (size_t)(c->conv_kernel - 1) * C * sizeof(float));
        if (st->ssm) memset(st->ssm, 0, nv * dk * dv * sizeof(float));
        /* the KV cache needs no clearing: positions beyond pos are never read */
    }
    s->pos = 0;
}

static int check_tokens(const qmix_session *s, const int32_t *tokens, int n, qmix_err *err)
{
    const qmix_config *c = &s->model->cfg;
    if (n <= 0) return qmix_errf(err, "no tokens to process");
    if ((int64_t)s->pos + n > s->max_ctx)
        return qmix_errf(err, "context full: %d tokens held + %d new exceed max_ctx %d", s->pos, n,
                         s->max_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return qmix_errf(err, "token id %d at index %d is outside the vocabulary [0, %d)",
                             tokens[i], i, c->vocab_size);
    return 0;
}

int qmix_session_prefill(qmix_session *s, const int32_t *tokens, int n, float *all_logits,
                         qmix_err *err)
{
    if (check_tokens(s, tokens, n, err)) return -1;
    int64_t V = s->model->cfg.vocab_size;
    for (int at = 0; at < n; at += s->max_batch) {
        int len = n - at < s->max_batch ? n - at : s->max_batch;
        qmix_forward(s, tokens + at, len, all_logits ? all_logits + (int64_t)at * V : NULL);
    }
    return 0;
}

int qmix_session_decode(qmix_session *s, int32_t token, qmix_err *err)
{
    if (check_tokens(s, &token, 1, err)) return -1;
    qmix_forward(s, &token, 1, NULL);
    return 0;
}

const float *qmix_session_logits(const qmix_session *s) { return s->logits; }
int qmix_session_pos(const qmix_session *s) { return s->pos; }
int qmix_session_threads(const qmix_session *s) { return qmix_pool_threads(s->pool); }

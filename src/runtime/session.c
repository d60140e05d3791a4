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

static qmix_kv_type kv_resolved(qmix_kv_type kv) { return kv ? kv : QMIX_KV_F32; }

size_t qmix_kv_row_bytes(const qmix_config *c, qmix_kv_type kv)
{
    /* blocks never straddle heads (head_dim % 32 == 0 for the quantized types), so a token's row
     * of all KV heads is the heads' rows one after another */
    return (size_t)c->n_kv_heads * qk_kv_bytes(kv_resolved(kv), c->head_dim);
}

size_t qmix_kv_token_bytes(const qmix_config *c, qmix_kv_type kv)
{
    size_t n_full = 0;
    for (int i = 0; i < c->n_layers; i++) n_full += c->layer_is_full[i] != 0;
    return n_full * 2 * qmix_kv_row_bytes(c, kv);
}

int qmix_kv_check(const qmix_config *c, qmix_kv_type kv, qmix_err *err)
{
    if ((unsigned)kv >= QMIX_KV_COUNT) return qmix_errf(err, "unknown KV cache type %d", (int)kv);
    if (!qk_kv_valid(kv_resolved(kv), c->head_dim))
        return qmix_errf(err, "a %s KV cache needs head_dim a multiple of %d; this model's is %d",
                         qmix_kv_type_name(kv), QK_KV_BLOCK, c->head_dim);
    return 0;
}

/* A sequence's buffers: KV caches of the full-attention layers, conv + delta-rule state of the
 * linear ones. state NULL: only sized. */
static void carve_seq(qmix_layer_state *state, const qmix_config *c, int max_ctx, qmix_kv_type kv,
                      sizer *z)
{
    size_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
           dv = c->lin_v_head_dim, C = 2 * nk * dk + nv * dv, Kc = c->conv_kernel;
    size_t ctx = (size_t)max_ctx, cache_floats = (ctx * qmix_kv_row_bytes(c, kv) + 3) / 4;
    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state blank, *st = state ? &state[i] : &blank;
        size_t before = z->used;
        if (c->layer_is_full[i]) {
            st->k_cache = (uint8_t *)carve(z, cache_floats);
            st->v_cache = (uint8_t *)carve(z, cache_floats);
            z->kv += z->used - before;
        } else {
            st->conv = carve(z, (Kc - 1) * C);
            st->ssm = carve(z, nv * dk * dv);
            z->state += z->used - before;
        }
    }
}

/* The one list of a session's buffers. The session's fields are written only when s->seq.state
 * is set (the allocating pass); qmix_session_size runs it on a blank session, so the size the
 * planner predicts and the size a session allocates come from the same code. own_seq: whether
 * the session holds a sequence of its own (a shared session only lends its scratch). */
static void carve_all(qmix_session *s, const qmix_config *c, size_t threads, int own_seq, sizer *z)
{
    size_t B = (size_t)s->max_batch, D = c->hidden_size, E = c->n_experts, k = c->n_experts_used;
    size_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
           dv = c->lin_v_head_dim, C = 2 * nk * dk + nv * dv;
    size_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;

    if (own_seq) carve_seq(s->seq.state, c, s->max_ctx, s->kv_type, z);
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
    s->attn_scratch_per_thread = (int64_t)(qk_attend_kv_scratch(QK_ATTN_MAX_Q, hd) + 15) & ~(int64_t)15;
    s->scores = carve(z, threads * (size_t)s->attn_scratch_per_thread);
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
    /* integer buffers share the arena (int and float are both 4 bytes) */
    s->top_expert = (int *)carve(z, B * k);
    s->expert_count = (int *)carve(z, E);
    s->expert_start = (int *)carve(z, E);
    s->slot_token = (int *)carve(z, B * k);
    s->token_slot = (int *)carve(z, B * k);
    s->row_seg = (int *)carve(z, B);
    s->seg_row = (int *)carve(z, B);
}

static int jobs_of(const qmix_config *c) { return 2 * c->n_experts + 8; }
static int tasks_of(const qmix_config *c, int threads) { return jobs_of(c) * 4 * threads + 64; }

void qmix_session_size(const qmix_config *cfg, int max_ctx, int n_threads, qmix_kv_type kv,
                       qmix_session_sizes *out)
{
    if (max_ctx <= 0) max_ctx = 4096;
    int threads = n_threads > 0 ? n_threads : qmix_pool_default_threads();
    qmix_session blank = {.max_ctx = max_ctx, .max_batch = batch_of(max_ctx),
                          .kv_type = kv_resolved(kv)};
    sizer z = {0};
    carve_all(&blank, cfg, (size_t)threads, 1, &z);
    out->kv = z.kv * sizeof(float);
    out->state = z.state * sizeof(float);
    out->scratch = (z.used - z.kv - z.state) * sizeof(float);
    out->arena = z.used * sizeof(float);
    out->other = sizeof(qmix_session) + (size_t)cfg->n_layers * sizeof(qmix_layer_state) +
                 (size_t)jobs_of(cfg) * sizeof(qmix_mm_job) +
                 (size_t)tasks_of(cfg, threads) * sizeof(qmix_mm_task);
    out->total = out->arena + out->other;
}

size_t qmix_session_bytes(const qmix_config *cfg, int max_ctx, int n_threads, qmix_kv_type kv)
{
    qmix_session_sizes sz;
    qmix_session_size(cfg, max_ctx, n_threads, kv, &sz);
    return sz.total;
}

static int session_open(qmix_model *model, const qmix_session_opts *opts, int own_seq,
                        qmix_session **out, qmix_err *err)
{
    *out = NULL;
    const qmix_config *c = &model->cfg;
    int max_ctx = opts && opts->max_ctx > 0 ? opts->max_ctx : 4096;
    qmix_kv_type kv = kv_resolved(opts ? opts->kv_type : QMIX_KV_DEFAULT);
    if (qmix_kv_check(c, kv, err)) return -1;
    qmix_session *s = calloc(1, sizeof *s);
    if (!s) return qmix_errf(err, "out of memory");
    s->model = model;
    s->max_ctx = max_ctx;
    s->kv_type = s->seq.kv_type = kv;
    s->seq.kv_row_bytes = qmix_kv_row_bytes(c, kv);
    s->max_batch = batch_of(max_ctx);
    s->seq.max_ctx = max_ctx;
    s->pool = qmix_pool_new(opts ? opts->n_threads : 0);
    s->seq.state = calloc((size_t)c->n_layers, sizeof *s->seq.state);
    int threads = s->pool ? qmix_pool_threads(s->pool) : 1;
    s->max_jobs = jobs_of(c);
    s->max_tasks = tasks_of(c, threads);
    s->jobs = calloc((size_t)s->max_jobs, sizeof *s->jobs);
    s->tasks = calloc((size_t)s->max_tasks, sizeof *s->tasks);
    if (!s->pool || !s->seq.state || !s->jobs || !s->tasks) {
        qmix_session_free(s);
        return qmix_errf(err, "out of memory creating a session");
    }
    sizer z = {0};
    carve_all(s, c, (size_t)threads, own_seq, &z);
    size_t bytes = z.used * sizeof(float);
    void *arena = NULL;
    if (posix_memalign(&arena, 64, bytes)) {
        qmix_session_free(s);
        return qmix_errf(err, "out of memory: a session with max_ctx %d needs %.1f MiB", max_ctx,
                         bytes / 1048576.0);
    }
    z = (sizer){.base = arena};
    carve_all(s, c, (size_t)threads, own_seq, &z);
    s->arena = arena;
    s->arena_bytes = bytes;
    if (own_seq) qmix_session_reset(s);
    *out = s;
    return 0;
}

int qmix_session_new(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                     qmix_err *err)
{
    return session_open(model, opts, 1, out, err);
}

int qmix_session_new_shared(qmix_model *model, const qmix_session_opts *opts, qmix_session **out,
                            qmix_err *err)
{
    return session_open(model, opts, 0, out, err);
}

void qmix_session_free(qmix_session *s)
{
    if (!s) return;
    if (s->pool) qmix_pool_free(s->pool);
    free(s->arena);
    free(s->seq.state);
    free(s->jobs);
    free(s->tasks);
    free(s);
}

void qmix_seq_reset(qmix_seq *seq, const qmix_config *c)
{
    size_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
           dv = c->lin_v_head_dim, C = 2 * nk * dk + nv * dv;
    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state *st = &seq->state[i];
        if (st->conv) memset(st->conv, 0, (size_t)(c->conv_kernel - 1) * C * sizeof(float));
        if (st->ssm) memset(st->ssm, 0, nv * dk * dv * sizeof(float));
        /* the KV cache needs no clearing: positions beyond pos are never read */
    }
    seq->pos = 0;
    seq->rope_delta = 0;
}

void qmix_session_reset(qmix_session *s) { qmix_seq_reset(&s->seq, &s->model->cfg); }

int qmix_seq_new(const qmix_config *c, int max_ctx, qmix_kv_type kv, qmix_seq **out,
                 qmix_err *err)
{
    *out = NULL;
    kv = kv_resolved(kv);
    if (qmix_kv_check(c, kv, err)) return -1;
    qmix_seq *seq = calloc(1, sizeof *seq);
    if (!seq || !(seq->state = calloc((size_t)c->n_layers, sizeof *seq->state))) {
        free(seq);
        return qmix_errf(err, "out of memory");
    }
    seq->max_ctx = max_ctx;
    seq->kv_type = kv;
    seq->kv_row_bytes = qmix_kv_row_bytes(c, kv);
    sizer z = {0};
    carve_seq(NULL, c, max_ctx, kv, &z);
    if (posix_memalign(&seq->arena, 64, z.used * sizeof(float) + 64)) {
        free(seq->state);
        free(seq);
        return qmix_errf(err, "out of memory: a sequence of %d tokens needs %.1f MiB", max_ctx,
                         z.used * sizeof(float) / 1048576.0);
    }
    z = (sizer){.base = seq->arena};
    carve_seq(seq->state, c, max_ctx, kv, &z);
    qmix_seq_reset(seq, c);
    *out = seq;
    return 0;
}

void qmix_seq_free(qmix_seq *seq)
{
    if (!seq) return;
    free(seq->arena);
    free(seq->state);
    free(seq);
}

/* Bytes of one linear-attention layer's conv window and delta-rule state. */
static size_t conv_bytes(const qmix_config *c)
{
    return sizeof(float) * (size_t)(c->conv_kernel - 1) *
           (size_t)(2 * c->lin_n_k_heads * c->lin_k_head_dim + c->lin_n_v_heads * c->lin_v_head_dim);
}
static size_t ssm_bytes(const qmix_config *c)
{
    return sizeof(float) * (size_t)c->lin_n_v_heads * (size_t)c->lin_k_head_dim *
           (size_t)c->lin_v_head_dim;
}
size_t qmix_seq_layer_state_floats(const qmix_config *c)
{
    return (conv_bytes(c) + ssm_bytes(c)) / sizeof(float);
}

size_t qmix_seq_snapshot_bytes(const qmix_config *c, qmix_kv_type kv, int n)
{
    size_t bytes = 0;
    for (int i = 0; i < c->n_layers; i++)
        bytes += c->layer_is_full[i] ? 2 * (size_t)n * qmix_kv_row_bytes(c, kv)
                                     : conv_bytes(c) + ssm_bytes(c);
    return bytes;
}

/* One walk over the snapshot layout for both directions, so save and restore cannot disagree.
 * KV rows are copied in the form they are stored in: a quantized cache snapshots quantized. */
static void seq_copy(qmix_seq *seq, const qmix_config *c, uint8_t *buf, int n, int save)
{
    size_t conv = conv_bytes(c), ssm = ssm_bytes(c), kv = (size_t)n * seq->kv_row_bytes;
    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state *st = &seq->state[i];
        void *parts[2] = {c->layer_is_full[i] ? (void *)st->k_cache : (void *)st->conv,
                          c->layer_is_full[i] ? (void *)st->v_cache : (void *)st->ssm};
        size_t sizes[2] = {c->layer_is_full[i] ? kv : conv, c->layer_is_full[i] ? kv : ssm};
        for (int p = 0; p < 2; p++) {
            if (sizes[p]) {
                if (save) memcpy(buf, parts[p], sizes[p]);
                else memcpy(parts[p], buf, sizes[p]);
            }
            buf += sizes[p];
        }
    }
}

void qmix_seq_save(const qmix_seq *seq, const qmix_config *c, void *buf)
{
    seq_copy((qmix_seq *)seq, c, buf, seq->pos, 1);
}

void qmix_seq_restore(qmix_seq *seq, const qmix_config *c, const void *buf, int n)
{
    seq_copy(seq, c, (uint8_t *)buf, n, 0);
    seq->pos = n;
}

int qmix_session_check_tokens(const qmix_session *s, const int32_t *tokens, int n, qmix_err *err)
{
    const qmix_config *c = &s->model->cfg;
    if (n <= 0) return qmix_errf(err, "no tokens to process");
    if ((int64_t)s->seq.pos + n > s->max_ctx)
        return qmix_errf(err, "context full: %d tokens held + %d new exceed max_ctx %d",
                         s->seq.pos, n, s->max_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return qmix_errf(err, "token id %d at index %d is outside the vocabulary [0, %d)",
                             tokens[i], i, c->vocab_size);
    return 0;
}

int qmix_session_prefill(qmix_session *s, const int32_t *tokens, int n, float *all_logits,
                         qmix_err *err)
{
    if (qmix_session_check_tokens(s, tokens, n, err)) return -1;
    int64_t V = s->model->cfg.vocab_size;
    for (int at = 0; at < n; at += s->max_batch) {
        int len = n - at < s->max_batch ? n - at : s->max_batch;
        qmix_forward(s, tokens + at, len, all_logits ? all_logits + (int64_t)at * V : NULL);
    }
    return 0;
}

int qmix_session_prefill_mm(qmix_session *s, const int32_t *tokens, int n, const float *const *embeds,
                            const int32_t *pos3, float *all_logits, qmix_err *err)
{
    if (qmix_session_check_tokens(s, tokens, n, err)) return -1;
    int64_t V = s->model->cfg.vocab_size;
    qmix_seq *self = &s->seq;
    for (int at = 0; at < n; at += s->max_batch) {
        int len = n - at < s->max_batch ? n - at : s->max_batch;
        qmix_forward_batch_mm(s, &self, &len, 1, tokens + at, embeds ? embeds + at : NULL,
                              pos3 + 3 * (int64_t)at, s->logits,
                              all_logits ? all_logits + (int64_t)at * V : NULL);
    }
    return 0;
}

int qmix_session_decode(qmix_session *s, int32_t token, qmix_err *err)
{
    if (qmix_session_check_tokens(s, &token, 1, err)) return -1;
    qmix_forward(s, &token, 1, NULL);
    return 0;
}

const float *qmix_session_logits(const qmix_session *s) { return s->logits; }
int qmix_session_pos(const qmix_session *s) { return s->seq.pos; }
int qmix_session_threads(const qmix_session *s) { return qmix_pool_threads(s->pool); }

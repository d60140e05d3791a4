#include "server/engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "formats/config.h"
#include "runtime/session.h"
#include "util/err.h"

typedef struct slot {
    srv_engine *eng;
    int index;
    qmix_session *sess;
    int32_t *history; /* what the session holds (capacity ctx) */
    int n_history;
    /* A snapshot of the recurrent state (conv + Gated DeltaNet state of every linear-attention
     * layer) at snap_pos, taken where a chat prompt's last turn begins. The KV cache needs no
     * copy: rows below snap_pos stay valid while nothing is written below snap_pos. The next
     * turn of the conversation re-renders the previous answer differently from how it was
     * generated (the template drops the think block), so the live state cannot be reused, but
     * this snapshot can: only the last answer and the new turn are processed again. */
    float *snap;
    int32_t *snap_tokens; /* the prompt prefix the snapshot holds */
    int snap_pos;         /* 0: no snapshot */
    srv_job *job;     /* running, or assigned and about to run */
    uint64_t last_used;
    pthread_cond_t cond;
    pthread_t thread;
    int started;
} slot;

struct srv_engine {
    qmix_model *model;
    const qmix_tokenizer *tok;
    int32_t stop_ids[QMIX_MAX_EOS + 1]; /* chat's stop ids: the eos ids, then <|im_end|> */
    int n_stop_ids, n_chat_stop_ids;    /* completions stop at the first n_stop_ids only */
    int n_slots, ctx, max_queue, n_vocab;
    int32_t im_start;   /* chat prompts are snapshotted before their last <|im_start|> */
    size_t snap_floats; /* recurrent state floats of one session */
    slot *slots;
    pthread_mutex_t mu; /* guards slot assignment, the queue, job outputs and counters */
    srv_job *queue_head, *queue_tail;
    int queued, stopping;
    uint64_t tick;
    /* counters for /health */
    uint64_t requests, prefix_hits, prefix_misses, prompt_tokens, reused_tokens, generated_tokens;
    uint64_t snapshot_hits;
};

/* The recurrent state of a session: each linear-attention layer's conv window and delta-rule
 * state, in layer order (sizes as qmix_session_reset clears them). */
static size_t state_floats(const qmix_config *c)
{
    size_t nk = (size_t)c->lin_n_k_heads, nv = (size_t)c->lin_n_v_heads,
           dk = (size_t)c->lin_k_head_dim, dv = (size_t)c->lin_v_head_dim;
    size_t per = (size_t)(c->conv_kernel - 1) * (2 * nk * dk + nv * dv) + nv * dk * dv, n = 0;
    for (int i = 0; i < c->n_layers; i++)
        if (!c->layer_is_full[i]) n += per;
    return n;
}

static void state_copy(qmix_session *sess, float *snap, int save)
{
    const qmix_config *c = &sess->model->cfg;
    size_t nk = (size_t)c->lin_n_k_heads, nv = (size_t)c->lin_n_v_heads,
           dk = (size_t)c->lin_k_head_dim, dv = (size_t)c->lin_v_head_dim;
    size_t conv = (size_t)(c->conv_kernel - 1) * (2 * nk * dk + nv * dv), ssm = nv * dk * dv;
    for (int i = 0; i < c->n_layers; i++) {
        qmix_layer_state *st = &sess->state[i];
        if (c->layer_is_full[i] || !st->conv || !st->ssm) continue;
        if (save) {
            memcpy(snap, st->conv, conv * sizeof *snap);
            memcpy(snap + conv, st->ssm, ssm * sizeof *snap);
        } else {
            memcpy(st->conv, snap, conv * sizeof *snap);
            memcpy(st->ssm, snap + conv, ssm * sizeof *snap);
        }
        snap += conv + ssm;
    }
}

/* Tokens of a slot's snapshot that begin the prompt (0 if they do not all, or leave nothing). */
static int snapshot_reuse(const struct slot *s, const srv_job *j)
{
    if (!s->snap_pos || s->snap_pos >= j->n_prompt) return 0;
    return memcmp(s->snap_tokens, j->prompt, sizeof *j->prompt * (size_t)s->snap_pos)
               ? 0 : s->snap_pos;
}

srv_job *srv_job_new(void)
{
    srv_job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    pthread_cond_init(&j->cond, NULL);
    j->refs = 1;
    return j;
}

static void job_free(srv_job *j)
{
    free(j->prompt);
    for (int i = 0; i < j->n_stop; i++) free(j->stop[i]);
    free(j->stop);
    free(j->out);
    if (j->free_user) j->free_user(j->user);
    pthread_cond_destroy(&j->cond);
    free(j);
}

void srv_job_release(srv_job *j)
{
    if (!j) return;
    srv_engine *e = j->eng;
    if (!e) { /* never submitted */
        job_free(j);
        return;
    }
    pthread_mutex_lock(&e->mu);
    int last = --j->refs == 0;
    pthread_mutex_unlock(&e->mu);
    if (last) job_free(j);
}

void srv_job_emit(srv_job *j, const char *data, size_t len)
{
    if (!len) return;
    srv_engine *e = j->eng;
    static pthread_mutex_t unshared = PTHREAD_MUTEX_INITIALIZER; /* before submit: no engine */
    pthread_mutex_t *mu = e ? &e->mu : &unshared;
    pthread_mutex_lock(mu);
    if (j->out_len + len > j->out_cap) {
        size_t cap = (j->out_len + len) * 2 + 256;
        char *grown = realloc(j->out, cap);
        if (!grown) {
            j->oom = 1; /* the stream ends early rather than with a hole in it */
            j->cancel = 1;
            pthread_mutex_unlock(mu);
            return;
        }
        j->out = grown;
        j->out_cap = cap;
    }
    if (!j->oom) {
        memcpy(j->out + j->out_len, data, len);
        j->out_len += len;
    }
    pthread_cond_broadcast(&j->cond);
    pthread_mutex_unlock(mu);
}

static void deadline(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int srv_job_wait_done(srv_job *j, int timeout_ms)
{
    srv_engine *e = j->eng;
    struct timespec ts;
    deadline(&ts, timeout_ms);
    pthread_mutex_lock(&e->mu);
    while (!j->done && pthread_cond_timedwait(&j->cond, &e->mu, &ts) != ETIMEDOUT) {
    }
    int done = j->done;
    pthread_mutex_unlock(&e->mu);
    return done;
}

size_t srv_job_read(srv_job *j, char *buf, size_t max, int timeout_ms, int *eof)
{
    srv_engine *e = j->eng;
    struct timespec ts;
    deadline(&ts, timeout_ms);
    *eof = 0;
    pthread_mutex_lock(&e->mu);
    while (j->out_sent == j->out_len && !j->done &&
           pthread_cond_timedwait(&j->cond, &e->mu, &ts) != ETIMEDOUT) {
    }
    size_t n = j->out_len - j->out_sent;
    if (n > max) n = max;
    if (n) memcpy(buf, j->out + j->out_sent, n); /* out may still be NULL */
    j->out_sent += n;
    if (j->out_sent == j->out_len) j->out_sent = j->out_len = 0; /* all sent: reuse the buffer */
    if (!n && j->done) *eof = 1;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* How many prompt tokens a slot can skip: its whole history must be a prefix of the prompt
 * (the recurrent state cannot be rewound), and at least one prompt token must remain to
 * produce the first logits. This mirrors the reuse rule of qmix_generate. */
static int live_reuse(const slot *s, const srv_job *j)
{
    if (s->n_history == 0 || s->n_history >= j->n_prompt) return 0;
    return memcmp(s->history, j->prompt, sizeof *j->prompt * (size_t)s->n_history) ? 0
                                                                                   : s->n_history;
}

static int reusable(const slot *s, const srv_job *j)
{
    int live = live_reuse(s, j), snap = snapshot_reuse(s, j);
    return live > snap ? live : snap;
}

int srv_engine_submit(srv_engine *e, srv_job *j)
{
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        return 1;
    }
    slot *best = NULL;
    int best_reuse = -1;
    for (int i = 0; i < e->n_slots; i++) {
        slot *s = &e->slots[i];
        if (s->job) continue;
        int r = reusable(s, j);
        /* ties go to the least recently used slot, keeping fresher histories for their owners */
        if (r > best_reuse || (r == best_reuse && s->last_used < best->last_used)) {
            best = s;
            best_reuse = r;
        }
    }
    if (!best && e->queued >= e->max_queue) {
        pthread_mutex_unlock(&e->mu);
        return 1;
    }
    j->eng = e;
    j->refs = 2; /* the submitter and the worker */
    e->requests++;
    if (best) {
        best->job = j;
        pthread_cond_signal(&best->cond);
    } else {
        if (e->queue_tail) e->queue_tail->next = j;
        else e->queue_head = j;
        e->queue_tail = j;
        e->queued++;
    }
    pthread_mutex_unlock(&e->mu);
    return 0;
}

static void on_gen_text(void *user, const char *text, size_t len)
{
    srv_job *j = user;
    if (j->on_text) j->on_text(j, text, len);
}

/* Brings the slot's session to the longest reusable prefix of the job's prompt (the live state,
 * or the snapshot restored), and for a chat prompt prefills up to its last <|im_start|> and
 * snapshots there. Leaves history a prefix of the prompt (or empty) for qmix_generate; returns
 * the tokens reused (not computed), or -1. */
static int prepare(slot *s, srv_job *j, qmix_err *err)
{
    srv_engine *e = s->eng;
    int live = live_reuse(s, j), snap = snapshot_reuse(s, j);
    if (snap > live) {
        state_copy(s->sess, s->snap, 0);
        s->sess->pos = snap;
        memcpy(s->history, s->snap_tokens, sizeof *s->history * (size_t)snap);
        s->n_history = live = snap;
        j->used_snapshot = 1;
    } else if (!live) {
        qmix_session_reset(s->sess);
        s->n_history = 0;
    }
    j->reused = live;
    int cut = 0;
    if (j->chat && e->im_start >= 0)
        for (int i = j->n_prompt - 1; i > 0; i--)
            if (j->prompt[i] == e->im_start) {
                cut = i;
                break;
            }
    if (cut > live) {
        if (qmix_session_prefill(s->sess, j->prompt + live, cut - live, NULL, err)) return -1;
        memcpy(s->history + live, j->prompt + live, sizeof *s->history * (size_t)(cut - live));
        s->n_history = cut;
        state_copy(s->sess, s->snap, 1);
        memcpy(s->snap_tokens, j->prompt, sizeof *s->snap_tokens * (size_t)cut);
        s->snap_pos = cut;
    } else if (live < s->snap_pos && cut < s->snap_pos) {
        s->snap_pos = 0; /* what follows overwrites KV rows the snapshot relies on */
    }
    return live;
}

static void run_job(slot *s, srv_job *j)
{
    srv_engine *e = s->eng;
    qmix_err err = {{0}};
    memset(&j->res, 0, sizeof j->res);
    j->res.n_prompt = j->n_prompt;
    if (j->cancel) {
        j->res.finish = QMIX_FINISH_CANCEL;
    } else {
        qmix_sampler *smp = qmix_sampler_new(&j->sampling, e->n_vocab);
        if (!smp) {
            j->failed = 1;
            snprintf(j->error, sizeof j->error, "out of memory");
        } else {
            if (prepare(s, j, &err) < 0) {
                j->failed = 1;
                snprintf(j->error, sizeof j->error, "%s", err.msg);
                qmix_session_reset(s->sess);
                s->n_history = 0;
                s->snap_pos = 0;
                qmix_sampler_free(smp);
                smp = NULL;
            }
        }
        if (smp) {
            const char *const *stops = (const char *const *)j->stop;
            qmix_gen_opts go = {.max_tokens = j->max_tokens, .stop_ids = e->stop_ids,
                                .n_stop_ids = j->ignore_eos ? 0
                                              : j->chat ? e->n_chat_stop_ids : e->n_stop_ids,
                                .stop_strings = stops, .n_stop_strings = j->n_stop,
                                .cancel = &j->cancel};
            if (qmix_generate(s->sess, smp, e->tok, j->prompt, j->n_prompt, s->history,
                              &s->n_history, &go, on_gen_text, j, &j->res, &err)) {
                j->failed = 1;
                snprintf(j->error, sizeof j->error, "%s", err.msg);
                qmix_session_reset(s->sess);
                s->n_history = 0;
                s->snap_pos = 0;
            }
            j->res.n_prompt_reused = j->reused;
            qmix_sampler_free(smp);
        }
        pthread_mutex_lock(&e->mu);
        if (!j->failed) {
            if (j->used_snapshot) e->snapshot_hits++;
            if (j->res.n_prompt_reused) e->prefix_hits++;
            else e->prefix_misses++;
            e->prompt_tokens += (uint64_t)j->res.n_prompt;
            e->reused_tokens += (uint64_t)j->res.n_prompt_reused;
            e->generated_tokens += (uint64_t)j->res.n_generated;
        }
        pthread_mutex_unlock(&e->mu);
    }
    if (j->on_done) j->on_done(j);
}

static void *worker(void *arg)
{
    slot *s = arg;
    srv_engine *e = s->eng;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!s->job && !e->queue_head && !e->stopping) pthread_cond_wait(&s->cond, &e->mu);
        if (!s->job && e->queue_head) { /* the oldest waiting request (cancelled ones too) */
            s->job = e->queue_head;
            e->queue_head = s->job->next;
            if (!e->queue_head) e->queue_tail = NULL;
            e->queued--;
        }
        if (!s->job) break;
        srv_job *j = s->job;
        pthread_mutex_unlock(&e->mu);
        run_job(s, j);
        pthread_mutex_lock(&e->mu);
        j->done = 1;
        pthread_cond_broadcast(&j->cond);
        s->job = NULL;
        s->last_used = ++e->tick;
        if (e->queue_head) { /* a free slot means an empty queue, so take the oldest waiting */
            s->job = e->queue_head;
            e->queue_head = s->job->next;
            if (!e->queue_head) e->queue_tail = NULL;
            e->queued--;
        }
        int last = --j->refs == 0;
        if (last) {
            pthread_mutex_unlock(&e->mu);
            job_free(j);
            pthread_mutex_lock(&e->mu);
        }
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

int srv_engine_new(qmix_model *model, const qmix_tokenizer *tok,
                   const qmix_generation_config *gen, const srv_engine_opts *o,
                   srv_engine **out, qmix_err *err)
{
    *out = NULL;
    if (o->n_slots < 1 || o->ctx < 2) return qmix_errf(err, "invalid slot count or context");
    srv_engine *e = calloc(1, sizeof *e);
    if (!e) return qmix_errf(err, "out of memory");
    e->model = model;
    e->tok = tok;
    e->n_chat_stop_ids = qmix_gen_chat_stop_ids(gen, tok, e->stop_ids);
    e->n_stop_ids = gen->n_eos < QMIX_MAX_EOS ? gen->n_eos : QMIX_MAX_EOS;
    e->n_slots = o->n_slots;
    e->ctx = o->ctx;
    e->max_queue = o->max_queue;
    e->n_vocab = qmix_model_config(model)->vocab_size;
    e->im_start = qmix_tok_special_ids(tok)->im_start;
    e->snap_floats = state_floats(qmix_model_config(model));
    pthread_mutex_init(&e->mu, NULL);
    e->slots = calloc((size_t)e->n_slots, sizeof *e->slots);
    if (!e->slots) {
        free(e);
        return qmix_errf(err, "out of memory");
    }
    int threads = o->n_threads;
    if (threads <= 0) { /* the cores are shared between slots that decode at the same time */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cores > e->n_slots ? (int)(cores / e->n_slots) : 1;
    }
    *out = e;
    for (int i = 0; i < e->n_slots; i++) {
        slot *s = &e->slots[i];
        s->eng = e;
        s->index = i;
        pthread_cond_init(&s->cond, NULL);
        qmix_session_opts so = {.max_ctx = e->ctx, .n_threads = threads};
        if (qmix_session_new(model, &so, &s->sess, err)) goto fail;
        s->history = malloc(sizeof *s->history * (size_t)e->ctx);
        s->snap_tokens = malloc(sizeof *s->snap_tokens * (size_t)e->ctx);
        s->snap = malloc(sizeof *s->snap * (e->snap_floats ? e->snap_floats : 1));
        if (!s->history || !s->snap_tokens || !s->snap) {
            qmix_errf(err, "out of memory");
            goto fail;
        }
        if (pthread_create(&s->thread, NULL, worker, s)) {
            qmix_errf(err, "cannot start a worker thread");
            goto fail;
        }
        s->started = 1;
    }
    return 0;
fail:
    srv_engine_free(e);
    *out = NULL;
    return -1;
}

int srv_engine_ctx(const srv_engine *e) { return e->ctx; }

void srv_engine_stop(srv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    for (int i = 0; i < e->n_slots; i++) {
        if (e->slots[i].job) e->slots[i].job->cancel = 1;
        pthread_cond_signal(&e->slots[i].cond);
    }
    for (srv_job *j = e->queue_head; j; j = j->next) j->cancel = 1;
    pthread_mutex_unlock(&e->mu);
}

void srv_engine_free(srv_engine *e)
{
    if (!e) return;
    srv_engine_stop(e);
    for (int i = 0; i < e->n_slots; i++) {
        slot *s = &e->slots[i];
        if (s->started) pthread_join(s->thread, NULL);
        qmix_session_free(s->sess);
        free(s->history);
        free(s->snap_tokens);
        free(s->snap);
        pthread_cond_destroy(&s->cond);
    }
    pthread_mutex_destroy(&e->mu);
    free(e->slots);
    free(e);
}

json_t *srv_engine_stats(srv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int busy = 0;
    json_t *slots = json_array();
    for (int i = 0; i < e->n_slots; i++) {
        busy += e->slots[i].job != NULL;
        const slot *sl = &e->slots[i];
        json_array_append_new(slots, json_pack("{s:i, s:b, s:i, s:i}", "id", i, "busy",
                                               sl->job != NULL, "cached_tokens",
                                               sl->job ? 0 : sl->n_history, "snapshot_tokens",
                                               sl->job ? 0 : sl->snap_pos));
    }
    json_t *st = json_pack(
        "{s:i, s:i, s:i, s:i, s:o, s:{s:I, s:I, s:I, s:I, s:I, s:I}, s:I}", "slots_total", e->n_slots,
        "slots_busy", busy, "queued", e->queued, "ctx", e->ctx, "slots", slots, "prefix_cache",
        "hits", (json_int_t)e->prefix_hits, "misses", (json_int_t)e->prefix_misses,
        "snapshot_hits", (json_int_t)e->snapshot_hits,
        "prompt_tokens", (json_int_t)e->prompt_tokens, "reused_tokens",
        (json_int_t)e->reused_tokens, "generated_tokens", (json_int_t)e->generated_tokens,
        "requests", (json_int_t)e->requests);
    pthread_mutex_unlock(&e->mu);
    return st;
}

#include "server/engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "formats/config.h"
#include "util/err.h"

typedef struct slot {
    srv_engine *eng;
    int index;
    qmix_session *sess;
    int32_t *history; /* what the session holds (capacity ctx) */
    int n_history;
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
    slot *slots;
    pthread_mutex_t mu; /* guards slot assignment, the queue, job outputs and counters */
    srv_job *queue_head, *queue_tail;
    int queued, stopping;
    uint64_t tick;
    /* counters for /health */
    uint64_t requests, prefix_hits, prefix_misses, prompt_tokens, reused_tokens, generated_tokens;
};

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
    memcpy(buf, j->out + j->out_sent, n);
    j->out_sent += n;
    if (!n && j->done) *eof = 1;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* How many prompt tokens a slot can skip: its whole history must be a prefix of the prompt
 * (the recurrent state cannot be rewound), and at least one prompt token must remain to
 * produce the first logits. This mirrors the reuse rule of qmix_generate. */
static int reusable(const slot *s, const srv_job *j)
{
    if (s->n_history == 0 || s->n_history >= j->n_prompt) return 0;
    return memcmp(s->history, j->prompt, sizeof *j->prompt * (size_t)s->n_history) ? 0
                                                                                   : s->n_history;
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
            }
            qmix_sampler_free(smp);
        }
        pthread_mutex_lock(&e->mu);
        if (!j->failed) {
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
        if (!s->history) {
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
        json_array_append_new(slots, json_pack("{s:i, s:b, s:i}", "id", i, "busy",
                                               e->slots[i].job != NULL, "cached_tokens",
                                               e->slots[i].job ? 0 : e->slots[i].n_history));
    }
    json_t *st = json_pack(
        "{s:i, s:i, s:i, s:i, s:o, s:{s:I, s:I, s:I, s:I, s:I}, s:I}", "slots_total", e->n_slots,
        "slots_busy", busy, "queued", e->queued, "ctx", e->ctx, "slots", slots, "prefix_cache",
        "hits", (json_int_t)e->prefix_hits, "misses", (json_int_t)e->prefix_misses,
        "prompt_tokens", (json_int_t)e->prompt_tokens, "reused_tokens",
        (json_int_t)e->reused_tokens, "generated_tokens", (json_int_t)e->generated_tokens,
        "requests", (json_int_t)e->requests);
    pthread_mutex_unlock(&e->mu);
    return st;
}

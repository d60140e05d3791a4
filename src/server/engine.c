#include "server/engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "formats/config.h"
#include "model/forward.h"
#include "runtime/mm_input.h"
#include "runtime/session.h"
#include "util/err.h"

typedef enum slot_phase { SLOT_FREE, SLOT_PREFILL, SLOT_DECODE } slot_phase;

typedef struct slot {
    qmix_seq *seq;
    int32_t *history; /* what seq holds (capacity ctx); kept after a job for the next one */
    int n_history;
    srv_job *job;     /* assigned (under the engine lock); the rest is the scheduler's alone */
    slot_phase phase;
    int cuts[2], n_cuts; /* prompt positions where a snapshot goes into the prefix cache */
    qmix_sampler *sampler;
    qmix_gen_stream gen;
    qmix_gen_opts gen_opts;
    int32_t next_token; /* decoding: the token to feed next step */
    uint64_t last_used, started;
} slot;

/* A snapshot of a sequence at n tokens (qmix_seq_save's layout), in the LRU list. */
typedef struct cache_entry {
    int32_t *tokens;
    int n;
    void *data; /* qmix_seq_save of a slot: KV rows in their stored (maybe quantized) form */
    size_t bytes;
    uint64_t last_used;
    struct cache_entry *next;
} cache_entry;

struct srv_engine {
    qmix_model *model;
    const qmix_config *cfg;
    const qmix_tokenizer *tok;
    int32_t stop_ids[QMIX_MAX_EOS + 1]; /* chat's stop ids: the eos ids, then <|im_end|> */
    int n_stop_ids, n_chat_stop_ids;    /* completions stop at the first n_stop_ids only */
    int n_slots, ctx, max_queue, n_vocab, prefill_chunk;
    int32_t im_start;   /* chat prompts are snapshotted at their <|im_start|> turn boundaries */
    qmix_session *sess; /* the batched forward pass's scratch and threads */
    slot *slots;
    /* one step's batch, built by the scheduler */
    qmix_seq **step_seqs;
    slot **step_slots;
    int *step_n;
    int32_t *step_tokens;
    float *step_logits; /* [n_slots][vocab] */
    /* a step with image rows: real token ids (step_tokens holds keys), embeddings, positions */
    int32_t *step_ids, *step_pos3;
    const float **step_embeds;
    pthread_t thread;
    int started;

    /* the prefix cache: only the scheduler thread changes it; the sizes are read under mu */
    cache_entry *cache;
    size_t cache_bytes, cache_limit;
    int cache_entries;

    pthread_mutex_t mu; /* guards slot assignment, the queue, job outputs and counters */
    pthread_cond_t work; /* a job was submitted, or the engine is stopping */
    srv_job *queue_head, *queue_tail;
    int queued, stopping, active;
    uint64_t tick;
    /* counters for /health and /metrics */
    uint64_t requests, prefix_hits, prefix_misses, prompt_tokens, reused_tokens, generated_tokens;
    uint64_t snapshot_hits, cache_stores, cache_evictions, steps, step_rows, finished, failures;
    double busy_s, started_at;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
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
    if (j->mm) qmix_mm_request_free(j->mm);
    free(j->mm);
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

int srv_engine_submit(srv_engine *e, srv_job *j)
{
    pthread_mutex_lock(&e->mu);
    if (e->stopping || (e->active + e->queued >= e->n_slots && e->queued >= e->max_queue)) {
        pthread_mutex_unlock(&e->mu);
        return 1;
    }
    j->eng = e;
    j->refs = 2; /* the submitter and the scheduler */
    e->requests++;
    if (e->queue_tail) e->queue_tail->next = j;
    else e->queue_head = j;
    e->queue_tail = j;
    e->queued++;
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* ---- prefix cache (scheduler thread) --------------------------------------------------------- */

/* The longest entry that is a proper prefix of the prompt (one token must remain to compute). */
static cache_entry *cache_lookup(srv_engine *e, const srv_job *j)
{
    cache_entry *best = NULL;
    for (cache_entry *c = e->cache; c; c = c->next)
        if (c->n < j->n_prompt && (!best || c->n > best->n) &&
            !memcmp(c->tokens, j->prompt, sizeof *c->tokens * (size_t)c->n))
            best = c;
    return best;
}

static void cache_entry_free(cache_entry *c)
{
    free(c->tokens);
    free(c->data);
    free(c);
}

/* Drops least recently used entries until need more bytes fit. */
static void cache_make_room(srv_engine *e, size_t need)
{
    while (e->cache && e->cache_bytes + need > e->cache_limit) {
        cache_entry **oldest = &e->cache;
        for (cache_entry **c = &e->cache; *c; c = &(*c)->next)
            if ((*c)->last_used < (*oldest)->last_used) oldest = c;
        cache_entry *victim = *oldest;
        *oldest = victim->next;
        pthread_mutex_lock(&e->mu);
        e->cache_bytes -= victim->bytes;
        e->cache_entries--;
        e->cache_evictions++;
        pthread_mutex_unlock(&e->mu);
        cache_entry_free(victim);
    }
}

/* Stores the slot's sequence as it is now (history[0, pos)) unless the same prefix is stored. */
static void cache_store(srv_engine *e, slot *s)
{
    int n = s->seq->pos;
    if (!e->cache_limit || n <= 0) return;
    for (cache_entry *c = e->cache; c; c = c->next)
        if (c->n == n && !memcmp(c->tokens, s->history, sizeof *c->tokens * (size_t)n)) {
            c->last_used = ++e->tick;
            return;
        }
    size_t bytes = qmix_seq_snapshot_bytes(e->cfg, s->seq->kv_type, n) + sizeof(int32_t) * (size_t)n;
    if (bytes > e->cache_limit) return;
    cache_make_room(e, bytes);
    cache_entry *c = calloc(1, sizeof *c);
    if (c) {
        c->tokens = malloc(sizeof *c->tokens * (size_t)n);
        c->data = malloc(qmix_seq_snapshot_bytes(e->cfg, s->seq->kv_type, n));
    }
    if (!c || !c->tokens || !c->data) { /* no room after all: the cache is an optimisation */
        if (c) cache_entry_free(c);
        return;
    }
    memcpy(c->tokens, s->history, sizeof *c->tokens * (size_t)n);
    qmix_seq_save(s->seq, e->cfg, c->data);
    c->n = n;
    c->bytes = bytes;
    c->last_used = ++e->tick;
    c->next = e->cache;
    e->cache = c;
    pthread_mutex_lock(&e->mu);
    e->cache_bytes += bytes;
    e->cache_entries++;
    e->cache_stores++;
    pthread_mutex_unlock(&e->mu);
}

/* ---- the scheduler ------------------------------------------------------------------------- */

static void on_gen_text(void *user, const char *text, size_t len)
{
    srv_job *j = user;
    if (j->on_text) j->on_text(j, text, len);
}

static void on_gen_token(void *user, int32_t id, const float *logits)
{
    srv_job *j = user;
    if (j->on_token) j->on_token(j, id, logits);
}

/* Ends the slot's job: its result, the counters, the HTTP side told; the slot is free again (its
 * sequence and history stay for a later prompt that extends them). */
static void finish(srv_engine *e, slot *s, qmix_finish why, const char *error)
{
    srv_job *j = s->job;
    int generated = s->sampler ? s->gen.n_generated : 0;
    if (s->sampler) {
        qmix_gen_stream_end(&s->gen, !error);
        if (!error && why != QMIX_FINISH_CANCEL) why = s->gen.finish;
        qmix_sampler_free(s->sampler);
        s->sampler = NULL;
    }
    memset(&j->res, 0, sizeof j->res);
    j->res.n_prompt = j->n_prompt;
    j->res.n_prompt_reused = j->reused;
    j->res.n_generated = generated;
    j->res.finish = why;
    if (error) {
        j->failed = 1;
        snprintf(j->error, sizeof j->error, "%s", error);
        qmix_seq_reset(s->seq, e->cfg); /* the state may be half-updated: forget it */
        s->n_history = 0;
    }
    pthread_mutex_lock(&e->mu);
    if (!j->failed && j->prefilled) { /* a job cancelled before it ran counts as nothing */
        if (j->used_snapshot) e->snapshot_hits++;
        if (j->reused) e->prefix_hits++;
        else e->prefix_misses++;
        e->prompt_tokens += (uint64_t)j->n_prompt;
        e->reused_tokens += (uint64_t)j->reused;
    }
    e->generated_tokens += (uint64_t)generated;
    e->failures += j->failed;
    e->finished++;
    pthread_mutex_unlock(&e->mu);
    if (j->on_done) j->on_done(j);
    pthread_mutex_lock(&e->mu);
    j->done = 1;
    pthread_cond_broadcast(&j->cond);
    s->job = NULL;
    s->phase = SLOT_FREE;
    s->last_used = ++e->tick;
    e->active--;
    int last = --j->refs == 0;
    pthread_mutex_unlock(&e->mu);
    if (last) job_free(j);
}

/* Brings a newly assigned slot to the longest reusable prefix of its job's prompt (its live
 * history or a prefix-cache snapshot), and sets up sampling. For a chat prompt the positions of
 * its second and last <|im_start|> become snapshot points: the end of the system prompt (shared
 * by conversations that begin alike) and the start of the last turn (the next turn of this
 * conversation re-renders the previous answer differently from how it was generated — the
 * template drops the think block — so only a snapshot before that answer can be reused).
 * A completion is snapshotted at its prompt's end. */
static void start_job(srv_engine *e, slot *s)
{
    srv_job *j = s->job;
    if (j->cancel) {
        finish(e, s, QMIX_FINISH_CANCEL, NULL);
        return;
    }
    int live = live_reuse(s, j);
    cache_entry *hit = cache_lookup(e, j);
    if (hit && hit->n > live) {
        qmix_seq_restore(s->seq, e->cfg, hit->data, hit->n);
        s->seq->rope_delta = 0; /* the slot's last job may have left another */
        if (j->mm) { /* continue after the largest M-RoPE position of the restored prefix */
            const int32_t *p = j->mm->prompt.pos3 + 3 * (hit->n - 1);
            int32_t hi = p[0] > p[1] ? p[0] : p[1];
            s->seq->rope_delta = (hi > p[2] ? hi : p[2]) + 1 - hit->n;
        }
        memcpy(s->history, hit->tokens, sizeof *s->history * (size_t)hit->n);
        s->n_history = live = hit->n;
        hit->last_used = ++e->tick;
        j->used_snapshot = 1;
    } else if (!live) {
        qmix_seq_reset(s->seq, e->cfg);
        s->n_history = 0;
    }
    /* the live history may run past the prompt's shared prefix only by generated tokens,
     * which live_reuse excluded: pos == n_history == live here */
    j->reused = j->prefilled = live;
    s->n_cuts = 0;
    if (j->chat && e->im_start >= 0) {
        int first = -1, second = -1, last = -1;
        for (int i = 0; i < j->n_prompt; i++)
            if (j->prompt[i] == e->im_start) {
                if (first < 0) first = i;
                else if (second < 0) second = i;
                last = i;
            }
        if (second > live && second < last) s->cuts[s->n_cuts++] = second;
        if (last > live && last > 0) s->cuts[s->n_cuts++] = last;
    } else if (j->n_prompt > live) {
        s->cuts[s->n_cuts++] = j->n_prompt;
    }
    qmix_err err = {{0}};
    s->sampler = qmix_sampler_new(&j->sampling, e->n_vocab);
    s->gen_opts = (qmix_gen_opts){
        .max_tokens = j->max_tokens, .stop_ids = e->stop_ids,
        .n_stop_ids = j->ignore_eos ? 0 : j->chat ? e->n_chat_stop_ids : e->n_stop_ids,
        .stop_strings = (const char *const *)j->stop, .n_stop_strings = j->n_stop};
    if (!s->sampler) {
        finish(e, s, QMIX_FINISH_STOP, "out of memory");
        return;
    }
    if (qmix_gen_stream_init(&s->gen, s->sampler, e->tok, j->mm ? j->mm->prompt.tokens : j->prompt,
                             j->n_prompt, &s->gen_opts,
                             on_gen_text, j, &err)) {
        qmix_sampler_free(s->sampler);
        s->sampler = NULL;
        finish(e, s, QMIX_FINISH_STOP, err.msg);
        return;
    }
    s->gen.on_token = on_gen_token;
    s->phase = SLOT_PREFILL;
}

/* After a step: the slot's logits are those of its last token. Samples, streams, and either
 * queues the token for the next step or ends the job. */
static void sample(srv_engine *e, slot *s, const float *logits)
{
    if (s->job->cancel) {
        finish(e, s, QMIX_FINISH_CANCEL, NULL);
        return;
    }
    qmix_err err = {{0}};
    int32_t id;
    int r = qmix_gen_stream_next(&s->gen, logits, &id, &err);
    if (r) {
        finish(e, s, QMIX_FINISH_STOP, r < 0 ? err.msg : NULL);
        return;
    }
    if (s->seq->pos + 1 > s->seq->max_ctx) { /* context full: the answer ends here */
        finish(e, s, QMIX_FINISH_LENGTH, NULL);
        return;
    }
    s->next_token = id;
    s->phase = SLOT_DECODE;
}

/* Takes queued jobs into free slots (oldest job first; the slot holding the longest prefix of
 * its prompt, ties to the least recently used). */
static void admit(srv_engine *e, slot **started, int *n_started)
{
    *n_started = 0;
    while (e->queue_head && e->active < e->n_slots) {
        srv_job *j = e->queue_head;
        e->queue_head = j->next;
        if (!e->queue_head) e->queue_tail = NULL;
        e->queued--;
        slot *best = NULL;
        int best_reuse = -1;
        for (int i = 0; i < e->n_slots; i++) {
            slot *s = &e->slots[i];
            if (s->job) continue;
            int r = live_reuse(s, j);
            if (r > best_reuse || (r == best_reuse && s->last_used < best->last_used)) {
                best = s;
                best_reuse = r;
            }
        }
        best->job = j;
        best->started = ++e->tick;
        e->active++;
        started[(*n_started)++] = best;
    }
}

/* One step: every decoding slot's next token, then prompt chunks of prefilling slots (oldest
 * first) within the step's budget — the whole batch when nothing decodes, prefill_chunk tokens
 * otherwise so running streams keep their pace. A chunk ends at the slot's next snapshot point. */
static void step(srv_engine *e)
{
    int n_seqs = 0, rows = 0, max_rows = e->sess->max_batch, decoding = 0;
    for (int i = 0; i < e->n_slots; i++) {
        slot *s = &e->slots[i];
        if (s->phase != SLOT_FREE && s->job->cancel) finish(e, s, QMIX_FINISH_CANCEL, NULL);
    }
    /* when more slots decode than a batch holds (a tiny --ctx), the first slot taken rotates so
     * none waits for ever */
    for (int k = 0; k < e->n_slots && rows < max_rows; k++) {
        slot *s = &e->slots[(k + e->steps) % (uint64_t)e->n_slots];
        if (s->phase != SLOT_DECODE) continue;
        e->step_slots[n_seqs] = s;
        e->step_seqs[n_seqs] = s->seq;
        e->step_n[n_seqs++] = 1;
        e->step_tokens[rows++] = s->next_token;
        decoding++;
    }
    int budget = decoding ? e->prefill_chunk : max_rows;
    for (;;) { /* prefilling slots in the order they started */
        slot *next = NULL;
        for (int i = 0; i < e->n_slots; i++) {
            slot *s = &e->slots[i];
            int taken = 0;
            for (int k = decoding; k < n_seqs; k++) taken |= e->step_slots[k] == s;
            if (s->phase == SLOT_PREFILL && !taken && (!next || s->started < next->started))
                next = s;
        }
        int room = max_rows - rows < budget ? max_rows - rows : budget;
        if (!next || room <= 0) break;
        srv_job *j = next->job;
        int end = j->n_prompt;
        for (int c = 0; c < next->n_cuts; c++)
            if (next->cuts[c] > j->prefilled && next->cuts[c] < end) end = next->cuts[c];
        int n = end - j->prefilled < room ? end - j->prefilled : room;
        e->step_slots[n_seqs] = next;
        e->step_seqs[n_seqs] = next->seq;
        e->step_n[n_seqs++] = n;
        memcpy(e->step_tokens + rows, j->prompt + j->prefilled, sizeof *e->step_tokens * (size_t)n);
        rows += n;
        budget -= n;
    }
    if (!n_seqs) return;
    int with_images = 0;
    for (int k = 0; k < n_seqs; k++)
        with_images |= e->step_slots[k]->phase == SLOT_PREFILL && e->step_slots[k]->job->mm;
    if (with_images) /* every row gets its token id, embedding (images) and M-RoPE position */
        for (int k = 0, row = 0; k < n_seqs; row += e->step_n[k], k++) {
            slot *s = e->step_slots[k];
            const qmix_mm_prompt *mp = s->phase == SLOT_PREFILL && s->job->mm ? &s->job->mm->prompt : NULL;
            for (int i = 0; i < e->step_n[k]; i++) {
                int at = s->job->prefilled + i, r = row + i;
                e->step_ids[r] = mp ? mp->tokens[at] : e->step_tokens[r];
                e->step_embeds[r] = mp ? mp->embeds[at] : NULL;
                for (int c = 0; c < 3; c++)
                    e->step_pos3[3 * r + c] = mp ? mp->pos3[3 * at + c]
                                                 : s->seq->pos + i + s->seq->rope_delta;
            }
        }
    double t0 = now_s();
    qmix_forward_batch_mm(e->sess, e->step_seqs, e->step_n, n_seqs,
                          with_images ? e->step_ids : e->step_tokens,
                          with_images ? e->step_embeds : NULL, with_images ? e->step_pos3 : NULL,
                          e->step_logits, NULL);
    double t1 = now_s();
    pthread_mutex_lock(&e->mu);
    e->steps++;
    e->step_rows += (uint64_t)rows;
    e->busy_s += t1 - t0;
    pthread_mutex_unlock(&e->mu);
    for (int k = 0, row = 0; k < n_seqs; row += e->step_n[k], k++) {
        slot *s = e->step_slots[k];
        srv_job *j = s->job;
        memcpy(s->history + s->n_history, e->step_tokens + row,
               sizeof *s->history * (size_t)e->step_n[k]);
        s->n_history += e->step_n[k];
        const float *logits = e->step_logits + (int64_t)k * e->n_vocab;
        if (s->phase == SLOT_DECODE) {
            sample(e, s, logits);
            continue;
        }
        j->prefilled += e->step_n[k];
        for (int c = 0; c < s->n_cuts; c++)
            if (s->cuts[c] == j->prefilled) cache_store(e, s);
        if (j->prefilled == j->n_prompt) sample(e, s, logits);
    }
}

static void *scheduler(void *arg)
{
    srv_engine *e = arg;
    slot **started = malloc(sizeof *started * (size_t)e->n_slots);
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->active && !e->queue_head && !e->stopping) pthread_cond_wait(&e->work, &e->mu);
        if (e->stopping) /* everything waiting or running is cancelled, and ends cleanly */
            for (srv_job *j = e->queue_head; j; j = j->next) j->cancel = 1;
        int n_started;
        admit(e, started, &n_started);
        if (!e->active && e->stopping && !e->queue_head) break;
        pthread_mutex_unlock(&e->mu);
        for (int i = 0; i < n_started; i++) start_job(e, started[i]);
        step(e);
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    free(started);
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
    e->cfg = qmix_model_config(model);
    e->tok = tok;
    e->n_chat_stop_ids = qmix_gen_chat_stop_ids(gen, tok, e->stop_ids);
    e->n_stop_ids = gen->n_eos < QMIX_MAX_EOS ? gen->n_eos : QMIX_MAX_EOS;
    e->n_slots = o->n_slots;
    e->ctx = o->ctx;
    e->max_queue = o->max_queue;
    e->prefill_chunk = o->prefill_chunk > 0 ? o->prefill_chunk : 128;
    e->cache_limit = o->cache_bytes;
    e->n_vocab = e->cfg->vocab_size;
    e->im_start = qmix_tok_special_ids(tok)->im_start;
    e->started_at = now_s();
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->work, NULL);
    *out = e;
    qmix_session_opts so = {.max_ctx = e->ctx, .n_threads = o->n_threads, .kv_type = o->kv_type};
    if (qmix_session_new_shared(model, &so, &e->sess, err)) goto fail;
    size_t n = (size_t)e->n_slots;
    e->slots = calloc(n, sizeof *e->slots);
    e->step_seqs = calloc(n, sizeof *e->step_seqs);
    e->step_slots = calloc(n, sizeof *e->step_slots);
    e->step_n = calloc(n, sizeof *e->step_n);
    e->step_tokens = malloc(sizeof *e->step_tokens * (size_t)e->sess->max_batch);
    e->step_ids = malloc(sizeof *e->step_ids * (size_t)e->sess->max_batch);
    e->step_pos3 = malloc(sizeof *e->step_pos3 * 3 * (size_t)e->sess->max_batch);
    e->step_embeds = malloc(sizeof *e->step_embeds * (size_t)e->sess->max_batch);
    e->step_logits = malloc(sizeof *e->step_logits * n * (size_t)e->n_vocab);
    if (!e->slots || !e->step_seqs || !e->step_slots || !e->step_n || !e->step_tokens ||
        !e->step_logits || !e->step_ids || !e->step_pos3 || !e->step_embeds) {
        qmix_errf(err, "out of memory");
        goto fail;
    }
    for (int i = 0; i < e->n_slots; i++) {
        slot *s = &e->slots[i];
        if (qmix_seq_new(e->cfg, e->ctx, o->kv_type, &s->seq, err)) goto fail;
        if (!(s->history = malloc(sizeof *s->history * (size_t)e->ctx))) {
            qmix_errf(err, "out of memory");
            goto fail;
        }
    }
    if (pthread_create(&e->thread, NULL, scheduler, e)) {
        qmix_errf(err, "cannot start the scheduler thread");
        goto fail;
    }
    e->started = 1;
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
    for (int i = 0; i < e->n_slots && e->slots; i++)
        if (e->slots[i].job) e->slots[i].job->cancel = 1;
    for (srv_job *j = e->queue_head; j; j = j->next) j->cancel = 1;
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mu);
}

void srv_engine_free(srv_engine *e)
{
    if (!e) return;
    srv_engine_stop(e);
    if (e->started) pthread_join(e->thread, NULL);
    for (int i = 0; e->slots && i < e->n_slots; i++) {
        qmix_seq_free(e->slots[i].seq);
        free(e->slots[i].history);
    }
    while (e->cache) {
        cache_entry *c = e->cache;
        e->cache = c->next;
        cache_entry_free(c);
    }
    qmix_session_free(e->sess);
    pthread_cond_destroy(&e->work);
    pthread_mutex_destroy(&e->mu);
    free(e->slots);
    free(e->step_seqs);
    free(e->step_slots);
    free(e->step_n);
    free(e->step_tokens);
    free(e->step_logits);
    free(e->step_ids);
    free(e->step_pos3);
    free(e->step_embeds);
    free(e);
}

json_t *srv_engine_stats(srv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    json_t *slots = json_array();
    for (int i = 0; i < e->n_slots; i++) {
        const slot *sl = &e->slots[i];
        json_array_append_new(slots, json_pack("{s:i, s:b, s:i}", "id", i, "busy",
                                               sl->job != NULL, "cached_tokens",
                                               sl->job ? 0 : sl->n_history));
    }
    json_t *st = json_pack(
        "{s:i, s:i, s:i, s:i, s:o, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:i, s:I, s:I}, s:I}",
        "slots_total", e->n_slots, "slots_busy", e->active, "queued", e->queued, "ctx", e->ctx,
        "slots", slots, "prefix_cache", "hits", (json_int_t)e->prefix_hits, "misses",
        (json_int_t)e->prefix_misses, "snapshot_hits", (json_int_t)e->snapshot_hits,
        "prompt_tokens", (json_int_t)e->prompt_tokens, "reused_tokens",
        (json_int_t)e->reused_tokens, "generated_tokens", (json_int_t)e->generated_tokens,
        "evicted", (json_int_t)e->cache_evictions, "entries", e->cache_entries, "bytes",
        (json_int_t)e->cache_bytes, "capacity_bytes", (json_int_t)e->cache_limit, "requests",
        (json_int_t)e->requests);
    pthread_mutex_unlock(&e->mu);
    return st;
}

/* Appends one metric (HELP, TYPE and its value) to the text. */
static void metric(char **buf, size_t *len, size_t *cap, const char *name, const char *type,
                   const char *help, double value)
{
    char line[512];
    int n = snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name,
                     type, name, value);
    if (n < 0 || !*buf) return;
    if (*len + (size_t)n + 1 > *cap) {
        size_t grown_cap = (*len + (size_t)n + 1) * 2;
        char *grown = realloc(*buf, grown_cap);
        if (!grown) {
            free(*buf);
            *buf = NULL;
            return;
        }
        *buf = grown;
        *cap = grown_cap;
    }
    memcpy(*buf + *len, line, (size_t)n + 1);
    *len += (size_t)n;
}

char *srv_engine_metrics(srv_engine *e)
{
    size_t len = 0, cap = 4096;
    char *b = malloc(cap);
    if (!b) return NULL;
    b[0] = 0;
    pthread_mutex_lock(&e->mu);
    double uptime = now_s() - e->started_at;
    metric(&b, &len, &cap, "qmix_requests_total", "counter", "Requests accepted.",
           (double)e->requests);
    metric(&b, &len, &cap, "qmix_requests_finished_total", "counter",
           "Requests finished (including cancelled and failed ones).", (double)e->finished);
    metric(&b, &len, &cap, "qmix_requests_failed_total", "counter", "Requests that failed.",
           (double)e->failures);
    metric(&b, &len, &cap, "qmix_prompt_tokens_total", "counter", "Prompt tokens of requests.",
           (double)e->prompt_tokens);
    metric(&b, &len, &cap, "qmix_prompt_tokens_cached_total", "counter",
           "Prompt tokens not computed: resumed from a slot's history or the prefix cache.",
           (double)e->reused_tokens);
    metric(&b, &len, &cap, "qmix_generation_tokens_total", "counter", "Tokens generated.",
           (double)e->generated_tokens);
    metric(&b, &len, &cap, "qmix_prefix_cache_hits_total", "counter",
           "Requests that resumed from a stored prefix.", (double)e->prefix_hits);
    metric(&b, &len, &cap, "qmix_prefix_cache_misses_total", "counter",
           "Requests processed from the first token.", (double)e->prefix_misses);
    metric(&b, &len, &cap, "qmix_prefix_cache_snapshot_hits_total", "counter",
           "Requests that resumed from a prefix-cache snapshot.", (double)e->snapshot_hits);
    metric(&b, &len, &cap, "qmix_prefix_cache_stores_total", "counter",
           "Snapshots stored in the prefix cache.", (double)e->cache_stores);
    metric(&b, &len, &cap, "qmix_prefix_cache_evictions_total", "counter",
           "Snapshots evicted (least recently used first) to stay within the budget.",
           (double)e->cache_evictions);
    metric(&b, &len, &cap, "qmix_prefix_cache_entries", "gauge", "Snapshots held.",
           (double)e->cache_entries);
    metric(&b, &len, &cap, "qmix_prefix_cache_bytes", "gauge", "Bytes the snapshots hold.",
           (double)e->cache_bytes);
    metric(&b, &len, &cap, "qmix_prefix_cache_capacity_bytes", "gauge",
           "The prefix cache budget (--prefix-cache).", (double)e->cache_limit);
    metric(&b, &len, &cap, "qmix_slots_total", "gauge", "Sequences decoded together (--parallel).",
           (double)e->n_slots);
    metric(&b, &len, &cap, "qmix_slots_active", "gauge", "Slots running a request.",
           (double)e->active);
    metric(&b, &len, &cap, "qmix_requests_queued", "gauge", "Requests waiting for a slot.",
           (double)e->queued);
    metric(&b, &len, &cap, "qmix_batch_steps_total", "counter", "Batched forward passes run.",
           (double)e->steps);
    metric(&b, &len, &cap, "qmix_batch_rows_total", "counter",
           "Tokens those passes processed (prompt chunks and decoded tokens).",
           (double)e->step_rows);
    metric(&b, &len, &cap, "qmix_busy_seconds_total", "counter",
           "Seconds spent in forward passes.", e->busy_s);
    metric(&b, &len, &cap, "qmix_generation_tokens_per_second", "gauge",
           "Tokens generated per second of forward-pass time, since start.",
           e->busy_s > 0 ? (double)e->generated_tokens / e->busy_s : 0);
    metric(&b, &len, &cap, "qmix_uptime_seconds", "gauge", "Seconds since the server started.",
           uptime);
    pthread_mutex_unlock(&e->mu);
    return b;
}

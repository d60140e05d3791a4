#include "server/api.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/mm_input.h"
#include "text/chat.h"
#include "text/toolcall.h"

/* Per-job state of the response being built (lives in job->user). */
typedef struct gen_state {
    int chat, stream, include_usage;
    char id[48];
    long long created;
    char *model;
    qmix_toolcall_parser *parser; /* chat: reasoning / content / tool calls */
    size_t shown_reasoning, shown_content;
    char *text; /* completions, non-streaming: the generated text */
    size_t text_len, text_cap;
    int oom;
    int cut_short; /* cancelled before it finished: answered as an error */
    /* logprobs: per generated token, OpenAI's entries; "pending" ones go out with the next
     * streamed chunk, "all" ones in the final body */
    int logprobs, top_logprobs;
    const qmix_tokenizer *tok;
    json_t *lp_pending, *lp_all;
    size_t text_offset; /* completions: bytes of text generated before the next token */
} gen_state;

static atomic_ullong id_counter;

static void gen_state_free(void *p)
{
    gen_state *g = p;
    if (!g) return;
    qmix_toolcall_parser_free(g->parser);
    json_decref(g->lp_pending);
    json_decref(g->lp_all);
    free(g->model);
    free(g->text);
    free(g);
}

char *api_error(const char *type, const char *param, const char *code, const char *fmt, ...)
{
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", msg, "type", type,
                          "param", param ? json_string(param) : json_null(), "code",
                          code ? json_string(code) : json_null());
    if (!e) /* a message that is not valid UTF-8 (it quotes the request) */
        e = json_pack("{s:{s:s, s:s, s:n, s:n}}", "error", "message", "invalid request", "type",
                      type, "param", "code");
    char *s = json_dumps(e, JSON_COMPACT);
    json_decref(e);
    return s;
}

static void fail(api_reply *r, int status, const char *param, const char *code, const char *fmt,
                 ...) __attribute__((format(printf, 5, 6)));
static void fail(api_reply *r, int status, const char *param, const char *code, const char *fmt,
                 ...)
{
    char msg[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    r->status = status;
    free(r->body);
    r->body = api_error(status >= 500 ? "server_error" : "invalid_request_error", param, code,
                        "%s", msg);
}

/* ---- request fields: null counts as absent; a present field of the wrong type or range is a 400 */

static int get_number(json_t *root, const char *key, double lo, double hi, int *given,
                      double *out, api_reply *r)
{
    json_t *v = json_object_get(root, key);
    *given = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) {
        fail(r, 400, key, "invalid_type", "'%s' must be a number", key);
        return -1;
    }
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi)) {
        fail(r, 400, key, "invalid_value", "'%s' must be between %g and %g", key, lo, hi);
        return -1;
    }
    *out = d;
    *given = 1;
    return 0;
}

static int get_int(json_t *root, const char *key, long long lo, long long hi, int *given,
                   long long *out, api_reply *r)
{
    json_t *v = json_object_get(root, key);
    *given = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) {
        fail(r, 400, key, "invalid_type", "'%s' must be an integer", key);
        return -1;
    }
    long long n = json_integer_value(v);
    if (n < lo || n > hi) {
        fail(r, 400, key, "invalid_value", "'%s' must be between %lld and %lld", key, lo, hi);
        return -1;
    }
    *out = n;
    *given = 1;
    return 0;
}

static int get_bool(json_t *root, const char *key, int *out, api_reply *r)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        fail(r, 400, key, "invalid_type", "'%s' must be a boolean", key);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

static uint64_t fresh_seed(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^
                 (atomic_fetch_add(&id_counter, 1) * 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    return z ^ (z >> 31);
}

/* Fields shared by both endpoints: model, n, sampling, seed, stop, max_tokens, stream, logprobs. */
typedef struct common_req {
    qmix_sampling sp;
    long long max_tokens;
    int has_max_tokens, stream, include_usage, ignore_eos;
    int logprobs, top_logprobs; /* logprobs wanted; alternatives per token (0..20) */
    char **stop;
    int n_stop;
} common_req;

static void free_stop(char **stop, int n)
{
    if (!stop) return;
    for (int i = 0; i < n; i++) free(stop[i]);
    free(stop);
}

static int parse_common(const api_ctx *ctx, json_t *root, int chat, common_req *c, api_reply *r)
{
    memset(c, 0, sizeof *c);
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            fail(r, 400, "model", "invalid_type", "'model' must be a string");
            return -1;
        }
        const char *m = json_string_value(model);
        if (strcmp(m, ctx->model_id) && strcmp(m, ctx->model_path)) {
            fail(r, 404, "model", "model_not_found", "The model '%s' does not exist (this server "
                 "serves '%s')", m, ctx->model_id);
            return -1;
        }
    }
    int given;
    long long n;
    double d;
    if (get_int(root, "n", 1, 1, &given, &n, r)) return -1; /* one choice per request for now */
    if (get_int(root, "best_of", 1, 1, &given, &n, r)) return -1;
    c->sp = ctx->defaults;
    if (get_number(root, "temperature", 0, 100, &given, &d, r)) return -1;
    if (given) c->sp.temperature = (float)d;
    if (get_number(root, "top_p", 0, 1, &given, &d, r)) return -1;
    if (given) {
        if (d <= 0) {
            fail(r, 400, "top_p", "invalid_value", "'top_p' must be in (0, 1]");
            return -1;
        }
        c->sp.top_p = (float)d;
    }
    if (get_int(root, "top_k", -1, 1 << 30, &given, &n, r)) return -1;
    if (given) c->sp.top_k = n < 0 ? 0 : (int)n; /* vLLM's -1 and 0 both mean off */
    if (get_number(root, "min_p", 0, 1, &given, &d, r)) return -1;
    if (given) c->sp.min_p = (float)d;
    if (get_number(root, "presence_penalty", -2, 2, &given, &d, r)) return -1;
    if (given) c->sp.presence_penalty = (float)d;
    if (get_number(root, "frequency_penalty", -2, 2, &given, &d, r)) return -1;
    if (given) c->sp.frequency_penalty = (float)d;
    if (get_number(root, "repetition_penalty", 0, 100, &given, &d, r)) return -1;
    if (given) {
        if (d <= 0) {
            fail(r, 400, "repetition_penalty", "invalid_value", "'repetition_penalty' must be > 0");
            return -1;
        }
        c->sp.repetition_penalty = (float)d;
    }
    json_t *seed = json_object_get(root, "seed");
    if (seed && !json_is_null(seed)) {
        if (!json_is_integer(seed)) {
            fail(r, 400, "seed", "invalid_type", "'seed' must be an integer");
            return -1;
        }
        c->sp.seed = (uint64_t)json_integer_value(seed);
    } else if (!ctx->seed_given) {
        c->sp.seed = fresh_seed();
    }
    if (get_int(root, "max_tokens", 1, 1 << 30, &c->has_max_tokens, &c->max_tokens, r)) return -1;
    if (chat) {
        long long mct;
        if (get_int(root, "max_completion_tokens", 1, 1 << 30, &given, &mct, r)) return -1;
        if (given) { /* the newer name wins */
            c->max_tokens = mct;
            c->has_max_tokens = 1;
        }
    }
    if (get_bool(root, "stream", &c->stream, r)) return -1;
    if (get_bool(root, "ignore_eos", &c->ignore_eos, r)) return -1;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) {
            fail(r, 400, "stream_options", "invalid_type", "'stream_options' must be an object");
            return -1;
        }
        if (get_bool(so, "include_usage", &c->include_usage, r)) return -1;
    }
    if (chat) { /* logprobs: bool, top_logprobs: how many alternatives (needs logprobs) */
        if (get_bool(root, "logprobs", &c->logprobs, r)) return -1;
        if (get_int(root, "top_logprobs", 0, 20, &given, &n, r)) return -1;
        if (given && n > 0 && !c->logprobs) {
            fail(r, 400, "top_logprobs", "invalid_value",
                 "'top_logprobs' needs 'logprobs': true");
            return -1;
        }
        if (given) c->top_logprobs = (int)n;
    } else { /* completions: logprobs is the number of alternatives, 0 the sampled token only */
        if (get_int(root, "logprobs", 0, 20, &given, &n, r)) return -1;
        c->logprobs = given;
        if (given) c->top_logprobs = (int)n;
    }
    json_t *stop = json_object_get(root, "stop");
    if (stop && !json_is_null(stop)) {
        size_t ns = json_is_string(stop) ? 1 : json_is_array(stop) ? json_array_size(stop) : 0;
        if (!json_is_string(stop) && !json_is_array(stop)) {
            fail(r, 400, "stop", "invalid_type", "'stop' must be a string or a list of strings");
            return -1;
        }
        if (ns > 16) {
            fail(r, 400, "stop", "invalid_value", "at most 16 stop strings");
            return -1;
        }
        c->stop = calloc(ns ? ns : 1, sizeof *c->stop);
        if (!c->stop) {
            fail(r, 500, NULL, NULL, "out of memory");
            return -1;
        }
        for (size_t i = 0; i < ns; i++) {
            json_t *s = json_is_string(stop) ? stop : json_array_get(stop, i);
            if (!json_is_string(s)) {
                fail(r, 400, "stop", "invalid_type", "'stop' must be a string or a list of strings");
                return -1;
            }
            if (!json_string_length(s)) continue; /* an empty stop string would stop at once */
            if (!(c->stop[c->n_stop++] = strdup(json_string_value(s)))) {
                fail(r, 500, NULL, NULL, "out of memory");
                return -1;
            }
        }
    }
    return 0;
}

/* ---- log probabilities (scheduler thread) */

/* A token's text as a JSON string: its bytes where they are valid UTF-8, U+FFFD for each byte
 * that is not (a token may hold part of a character). */
static json_t *token_string(const char *b, size_t len)
{
    json_t *v = json_stringn(b, len);
    if (v) return v;
    char *out = malloc(len * 3 + 1);
    if (!out) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)b[i];
        size_t n = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3
                 : (c & 0xf8) == 0xf0 ? 4 : 0;
        int ok = n > 0 && i + n <= len;
        for (size_t k = 1; ok && k < n; k++) ok = ((unsigned char)b[i + k] & 0xc0) == 0x80;
        json_t *probe = ok ? json_stringn(b + i, n) : NULL; /* also rejects overlongs, surrogates */
        if (probe) {
            json_decref(probe);
            memcpy(out + o, b + i, n);
            o += n;
            i += n;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    v = json_stringn(out, o);
    free(out);
    return v;
}

static json_t *token_bytes(const char *b, size_t len)
{
    json_t *a = json_array();
    for (size_t i = 0; i < len && a; i++) json_array_append_new(a, json_integer((unsigned char)b[i]));
    return a;
}

/* log p(id) under the model's distribution: log-softmax of the raw logits (before temperature
 * and the other sampling filters, as OpenAI and vLLM report them). */
static double log_sum_exp(const float *logits, int n)
{
    float max = logits[0];
    for (int i = 1; i < n; i++)
        if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - max);
    return max + log(sum);
}

/* The k most likely ids, most likely first (ties: lower id), in one pass over the vocabulary. */
static int top_ids(const float *logits, int n, int k, int32_t *out)
{
    int have = 0;
    for (int i = 0; i < n; i++) {
        if (have == k && logits[i] <= logits[out[k - 1]]) continue;
        int at = have < k ? have++ : k - 1;
        while (at > 0 && logits[out[at - 1]] < logits[i]) {
            out[at] = out[at - 1];
            at--;
        }
        out[at] = i;
    }
    return have;
}

static void on_token(srv_job *job, int32_t id, const float *logits)
{
    gen_state *g = job->user;
    if (!g->logprobs) return;
    int V = qmix_tok_vocab_size(g->tok);
    double lse = log_sum_exp(logits, V);
    size_t len;
    const char *b = qmix_tok_id_bytes(g->tok, id, &len);
    if (!b) len = 0;
    int32_t top[20];
    int n_top = g->top_logprobs > 0 ? top_ids(logits, V, g->top_logprobs, top) : 0;
    json_t *e;
    if (g->chat) { /* {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} */
        json_t *alts = json_array();
        for (int i = 0; i < n_top; i++) {
            size_t tl;
            const char *tb = qmix_tok_id_bytes(g->tok, top[i], &tl);
            if (!tb) tl = 0;
            json_array_append_new(alts, json_pack("{s:o, s:f, s:o}", "token",
                                                  token_string(tb ? tb : "", tl), "logprob",
                                                  logits[top[i]] - lse, "bytes",
                                                  token_bytes(tb, tl)));
        }
        e = json_pack("{s:o, s:f, s:o, s:o}", "token", token_string(b ? b : "", len), "logprob",
                      logits[id] - lse, "bytes", token_bytes(b, len), "top_logprobs", alts);
    } else { /* one token of the legacy shape, merged into the arrays when sent */
        json_t *alts = json_object();
        for (int i = 0; i < n_top; i++) {
            size_t tl;
            const char *tb = qmix_tok_id_bytes(g->tok, top[i], &tl);
            json_t *key = token_string(tb ? tb : "", tb ? tl : 0);
            if (key) json_object_set_new(alts, json_string_value(key), json_real(logits[top[i]] - lse));
            json_decref(key);
        }
        e = json_pack("{s:o, s:f, s:o, s:I}", "token", token_string(b ? b : "", len), "logprob",
                      logits[id] - lse, "top", alts, "offset", (json_int_t)g->text_offset);
        g->text_offset += len;
    }
    if (!e || json_array_append_new(g->stream ? g->lp_pending : g->lp_all, e)) {
        g->oom = 1;
        job->cancel = 1;
    }
}

/* The logprobs object of a choice for the given entries (and empties the list): chat's
 * {"content": [...]}, or the completions' parallel arrays. */
static json_t *logprobs_json(gen_state *g, json_t *entries)
{
    if (!g->logprobs) return json_null();
    json_t *v;
    if (g->chat) {
        v = json_pack("{s:o}", "content", json_copy(entries)); /* shallow: shares the entries */
    } else {
        json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
               *offs = json_array();
        size_t i;
        json_t *e;
        json_array_foreach(entries, i, e) {
            json_array_append(tokens, json_object_get(e, "token"));
            json_array_append(lps, json_object_get(e, "logprob"));
            json_array_append(tops, json_object_get(e, "top"));
            json_array_append(offs, json_object_get(e, "offset"));
        }
        v = json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps,
                      "top_logprobs", tops, "text_offset", offs);
    }
    json_array_clear(entries);
    return v ? v : json_null();
}

/* ---- output formatting (scheduler thread) */

static void emit_json(srv_job *job, json_t *v)
{
    if (!v) return;
    char *s = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    if (!s) return;
    srv_job_emit(job, "data: ", 6);
    srv_job_emit(job, s, strlen(s));
    srv_job_emit(job, "\n\n", 2);
    free(s);
}

static json_t *chunk(gen_state *g, json_t *choice)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", g->id, "object",
                     g->chat ? "chat.completion.chunk" : "text_completion", "created",
                     (json_int_t)g->created, "model", g->model, "choices", choice);
}

static void emit_delta(srv_job *job, const char *field, const char *text, size_t len)
{
    gen_state *g = job->user;
    json_t *s = json_stringn(text, len);
    if (!s) return;
    json_t *choice = json_pack("{s:i, s:{s:o}, s:n}", "index", 0, "delta", field, s,
                               "finish_reason");
    if (choice && g->logprobs) /* the tokens sampled since the last chunk */
        json_object_set_new(choice, "logprobs", logprobs_json(g, g->lp_pending));
    emit_json(job, chunk(g, choice));
}

static void chat_stream_new_text(srv_job *job)
{
    gen_state *g = job->user;
    size_t rl, cl;
    const char *rs = qmix_toolcall_reasoning(g->parser, &rl);
    const char *cs = qmix_toolcall_content(g->parser, &cl);
    if (rl > g->shown_reasoning) {
        emit_delta(job, "reasoning_content", rs + g->shown_reasoning, rl - g->shown_reasoning);
        g->shown_reasoning = rl;
    }
    if (cl > g->shown_content) {
        emit_delta(job, "content", cs + g->shown_content, cl - g->shown_content);
        g->shown_content = cl;
    }
}

static void on_text(srv_job *job, const char *text, size_t len)
{
    gen_state *g = job->user;
    if (g->chat) {
        if (qmix_toolcall_feed(g->parser, text, len)) {
            g->oom = 1;
            job->cancel = 1;
            return;
        }
        if (g->stream) chat_stream_new_text(job);
    } else if (g->stream) {
        json_t *s = json_stringn(text, len);
        if (s)
            emit_json(job, chunk(g, json_pack("{s:i, s:o, s:o, s:n}", "index", 0, "text", s,
                                              "logprobs", logprobs_json(g, g->lp_pending),
                                              "finish_reason")));
    } else {
        if (g->text_len + len + 1 > g->text_cap) {
            size_t cap = (g->text_len + len + 1) * 2;
            char *grown = realloc(g->text, cap);
            if (!grown) {
                g->oom = 1;
                job->cancel = 1;
                return;
            }
            g->text = grown;
            g->text_cap = cap;
        }
        memcpy(g->text + g->text_len, text, len);
        g->text_len += len;
        g->text[g->text_len] = 0;
    }
}

static json_t *tool_calls_json(gen_state *g, int with_index)
{
    json_t *calls = json_array();
    for (size_t i = 0; i < qmix_toolcall_count(g->parser); i++) {
        const qmix_tool_call *tc = qmix_toolcall_at(g->parser, i);
        char id[80];
        snprintf(id, sizeof id, "call_%s_%zu", g->id + 9, i); /* unique per response */
        json_t *c = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", id, "type", "function",
                              "function", "name", tc->name, "arguments", tc->arguments);
        if (c && with_index) json_object_set_new(c, "index", json_integer((json_int_t)i));
        if (c) json_array_append_new(calls, c);
    }
    return calls;
}

static const char *finish_reason(srv_job *job)
{
    gen_state *g = job->user;
    if (job->res.finish == QMIX_FINISH_LENGTH) return "length";
    if (g->chat && qmix_toolcall_count(g->parser)) return "tool_calls";
    return "stop"; /* a cancelled generation is answered as an error (on_done) */
}

static const char *cancel_code(const srv_job *job)
{
    const gen_state *g = job->user;
    return g->cut_short ? "cancelled" : NULL;
}

static json_t *usage(srv_job *job)
{
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", job->res.n_prompt,
                     "completion_tokens", job->res.n_generated, "total_tokens",
                     job->res.n_prompt + job->res.n_generated, "prompt_tokens_details",
                     "cached_tokens", job->res.n_prompt_reused);
}

static void on_done(srv_job *job)
{
    gen_state *g = job->user;
    if (g->chat && qmix_toolcall_finish(g->parser)) g->oom = 1;
    if (g->oom && !job->failed) {
        job->failed = 1;
        snprintf(job->error, sizeof job->error, "out of memory");
    }
    if (job->res.finish == QMIX_FINISH_CANCEL && !job->failed) {
        /* a shutdown (or a client gone, who reads nothing): not a normal "stop" */
        job->failed = g->cut_short = 1;
        snprintf(job->error, sizeof job->error,
                 "the request was cancelled (the server is shutting down) before the answer "
                 "was complete");
    }
    if (!g->stream) return; /* api_final builds the body */
    if (job->failed) {
        char *e = api_error("server_error", NULL, cancel_code(job), "%s", job->error);
        if (e) {
            srv_job_emit(job, "data: ", 6);
            srv_job_emit(job, e, strlen(e));
            srv_job_emit(job, "\n\n", 2);
            free(e);
        }
    } else {
        if (g->chat) {
            chat_stream_new_text(job);
            if (qmix_toolcall_count(g->parser))
                emit_json(job, chunk(g, json_pack("{s:i, s:{s:o}, s:n}", "index", 0, "delta",
                                                  "tool_calls", tool_calls_json(g, 1),
                                                  "finish_reason")));
            json_t *last = json_pack("{s:i, s:{}, s:s}", "index", 0, "delta", "finish_reason",
                                     finish_reason(job));
            if (last && g->logprobs) /* tokens whose text was held back or shown as no delta */
                json_object_set_new(last, "logprobs", logprobs_json(g, g->lp_pending));
            emit_json(job, chunk(g, last));
        } else {
            emit_json(job, chunk(g, json_pack("{s:i, s:s, s:o, s:s}", "index", 0, "text", "",
                                              "logprobs", logprobs_json(g, g->lp_pending),
                                              "finish_reason", finish_reason(job))));
        }
        if (g->include_usage) { /* OpenAI's last chunk: no choices, the usage */
            json_t *u = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", g->id, "object",
                                  g->chat ? "chat.completion.chunk" : "text_completion",
                                  "created", (json_int_t)g->created, "model", g->model,
                                  "choices", "usage", usage(job));
            emit_json(job, u);
        }
    }
    srv_job_emit(job, "data: [DONE]\n\n", 14);
}

char *api_final(srv_job *job, int *status)
{
    gen_state *g = job->user;
    if (job->failed) {
        *status = cancel_code(job) ? 503 : 500;
        return api_error("server_error", NULL, cancel_code(job), "%s", job->error);
    }
    json_t *choice;
    if (g->chat) {
        size_t rl, cl;
        const char *rs = qmix_toolcall_reasoning(g->parser, &rl);
        const char *cs = qmix_toolcall_content(g->parser, &cl);
        json_t *msg = json_pack("{s:s, s:s#}", "role", "assistant", "content", cs, cl);
        if (msg && rl) json_object_set_new(msg, "reasoning_content", json_stringn(rs, rl));
        if (msg && qmix_toolcall_count(g->parser))
            json_object_set_new(msg, "tool_calls", tool_calls_json(g, 0));
        choice = json_pack("{s:i, s:o, s:o, s:s}", "index", 0, "message", msg, "logprobs",
                           logprobs_json(g, g->lp_all), "finish_reason", finish_reason(job));
    } else {
        choice = json_pack("{s:i, s:s#, s:o, s:s}", "index", 0, "text",
                           g->text ? g->text : "", g->text_len, "logprobs",
                           logprobs_json(g, g->lp_all), "finish_reason", finish_reason(job));
    }
    json_t *v = json_pack("{s:s, s:s, s:I, s:s, s:[o], s:o}", "id", g->id, "object",
                          g->chat ? "chat.completion" : "text_completion", "created",
                          (json_int_t)g->created, "model", g->model, "choices", choice, "usage",
                          usage(job));
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (!s) {
        *status = 500;
        return api_error("server_error", NULL, NULL, "cannot encode the response");
    }
    *status = 200;
    return s;
}

/* ---- requests */

static json_t *parse_body(const char *body, size_t len, api_reply *r)
{
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        fail(r, 400, NULL, "invalid_json", "the body is not valid JSON: %s (line %d, column %d)",
             je.text, je.line, je.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        fail(r, 400, NULL, "invalid_type", "the body must be a JSON object");
        return NULL;
    }
    return root;
}

/* Fills the job from the shared fields and hands it to the engine. Takes prompt and c->stop. */
static void submit(const api_ctx *ctx, int chat, common_req *c, int32_t *prompt, size_t n_prompt,
                   qmix_mm_request *mm, gen_state *g, api_reply *r)
{
    srv_job *job = srv_job_new();
    if (!job) {
        free(prompt);
        qmix_mm_request_free(mm);
        free(mm);
        free_stop(c->stop, c->n_stop);
        gen_state_free(g);
        fail(r, 500, NULL, NULL, "out of memory");
        return;
    }
    job->prompt = prompt;
    job->n_prompt = (int)n_prompt;
    job->mm = mm;
    job->stop = c->stop;
    job->n_stop = c->n_stop;
    c->stop = NULL;
    c->n_stop = 0;
    job->sampling = c->sp;
    long room = (long)ctx->ctx - (long)n_prompt;
    job->max_tokens = (int)(c->has_max_tokens && c->max_tokens < room ? c->max_tokens : room);
    job->chat = chat;
    job->ignore_eos = c->ignore_eos;
    job->on_text = on_text;
    job->on_token = on_token;
    job->on_done = on_done;
    job->user = g;
    job->free_user = gen_state_free;
    g->chat = chat;
    g->stream = c->stream;
    g->include_usage = c->stream && c->include_usage;
    g->logprobs = c->logprobs;
    g->top_logprobs = c->top_logprobs;
    g->tok = ctx->tok;
    if (g->logprobs && (!(g->lp_pending = json_array()) || !(g->lp_all = json_array()))) {
        srv_job_release(job);
        fail(r, 500, NULL, NULL, "out of memory");
        return;
    }
    snprintf(g->id, sizeof g->id, "%s-%llx%06llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)time(NULL), atomic_fetch_add(&id_counter, 1) & 0xffffff);
    g->created = (long long)time(NULL);
    if (g->chat && g->stream) /* the first chunk names the role, as OpenAI's does */
        emit_json(job, chunk(g, json_pack("{s:i, s:{s:s, s:s}, s:n}", "index", 0, "delta",
                                          "role", "assistant", "content", "", "finish_reason")));
    if (!ctx->eng) { /* parse-only (fuzz/fuzz_api.c): the request was accepted, nothing runs */
        srv_job_release(job);
        r->status = 200;
        return;
    }
    if (srv_engine_submit(ctx->eng, job)) {
        srv_job_release(job);
        fail(r, 503, NULL, "server_busy", "every slot is busy and the queue is full; retry later");
        r->retry_after = 1;
        return;
    }
    r->job = job;
    r->stream = c->stream;
    r->status = 200;
}

/* Checks and normalizes messages: text content parts become one string (the template joins
 * them the same way); with image parts (a model with a vision tower) the parts stay a list. */
static json_t *normalize_messages(json_t *messages, int allow_images, api_reply *r)
{
    if (!json_is_array(messages) || !json_array_size(messages)) {
        fail(r, 400, "messages", messages ? "invalid_type" : "missing",
             "'messages' must be a non-empty array");
        return NULL;
    }
    json_t *out = json_deep_copy(messages);
    if (!out) {
        fail(r, 500, NULL, NULL, "out of memory");
        return NULL;
    }
    size_t i;
    json_t *m;
    json_array_foreach(out, i, m) {
        json_t *role = json_object_get(m, "role");
        if (!json_is_object(m) || !json_is_string(role)) {
            fail(r, 400, "messages", "invalid_type",
                 "messages[%zu] must be an object with a string 'role'", i);
            goto bad;
        }
        const char *rs = json_string_value(role);
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
            strcmp(rs, "tool") && strcmp(rs, "developer")) {
            fail(r, 400, "messages", "invalid_value", "messages[%zu]: unknown role '%s'", i, rs);
            goto bad;
        }
        if (!strcmp(rs, "developer")) { /* replacing the role frees the string rs points to */
            json_object_set_new(m, "role", json_string("system"));
            rs = "system";
        }
        json_t *content = json_object_get(m, "content");
        if (!content || json_is_null(content)) {
            if (strcmp(rs, "assistant")) {
                fail(r, 400, "messages", "missing", "messages[%zu] has no 'content'", i);
                goto bad;
            }
            json_object_set_new(m, "content", json_string(""));
        } else if (json_is_array(content)) {
            size_t cap = 64, len = 0, k;
            char *text = malloc(cap);
            json_t *part;
            int images = 0;
            json_array_foreach(content, k, part) {
                const char *type = json_string_value(json_object_get(part, "type"));
                json_t *t = json_object_get(part, "text");
                int image = type && (!strcmp(type, "image_url") || !strcmp(type, "image") ||
                                     !strcmp(type, "input_image"));
                if (image && allow_images && strcmp(rs, "system")) {
                    images++;
                    continue;
                }
                if (image || (type && (!strcmp(type, "video") || !strcmp(type, "video_url") ||
                                       !strcmp(type, "input_audio")))) {
                    free(text);
                    fail(r, 400, "messages", "unsupported_content",
                         "messages[%zu].content[%zu]: %s parts are not supported%s", i, k, type,
                         !image ? "" : !allow_images ? ": this model has no vision tower"
                                                     : " in system messages");
                    goto bad;
                }
                if (!type || strcmp(type, "text") || !json_is_string(t)) {
                    free(text);
                    fail(r, 400, "messages", "invalid_type", "messages[%zu].content[%zu] must be "
                         "{\"type\": \"text\", \"text\": string}", i, k);
                    goto bad;
                }
                size_t n = json_string_length(t);
                if (len + n + 1 > cap) {
                    char *grown = realloc(text, cap = (len + n + 1) * 2);
                    if (!grown) {
                        free(text);
                        text = NULL;
                    }
                    text = grown;
                }
                if (!text) {
                    fail(r, 500, NULL, NULL, "out of memory");
                    goto bad;
                }
                memcpy(text + len, json_string_value(t), n);
                len += n;
            }
            if (!text) {
                fail(r, 500, NULL, NULL, "out of memory");
                goto bad;
            }
            if (!images) json_object_set_new(m, "content", json_stringn(text, len));
            free(text);
        } else if (!json_is_string(content)) {
            fail(r, 400, "messages", "invalid_type",
                 "messages[%zu].content must be a string or a list of content parts", i);
            goto bad;
        }
        json_t *tc = json_object_get(m, "tool_calls");
        if (tc && !json_is_null(tc) && !json_is_array(tc)) {
            fail(r, 400, "messages", "invalid_type", "messages[%zu].tool_calls must be a list", i);
            goto bad;
        }
    }
    return out;
bad:
    json_decref(out);
    return NULL;
}

void api_chat_completions(const api_ctx *ctx, const char *body, size_t len, api_reply *r)
{
    memset(r, 0, sizeof *r);
    json_t *root = parse_body(body, len, r), *messages = NULL, *tools = NULL;
    common_req c = {0};
    char *text = NULL;
    int32_t *prompt = NULL;
    size_t text_len = 0, n_prompt = 0;
    qmix_mm_request *mm = NULL;
    if (!root || parse_common(ctx, root, 1, &c, r)) goto done;
    if (!(messages = normalize_messages(json_object_get(root, "messages"), ctx->vision != NULL, r))) goto done;
    tools = json_object_get(root, "tools");
    if (tools && json_is_null(tools)) tools = NULL;
    if (tools && !json_is_array(tools)) {
        fail(r, 400, "tools", "invalid_type", "'tools' must be a list");
        goto done;
    }
    size_t ti;
    json_t *t;
    json_array_foreach(tools, ti, t) {
        json_t *fn = json_object_get(t, "function");
        if (!json_is_object(fn) || !json_is_string(json_object_get(fn, "name"))) {
            fail(r, 400, "tools", "invalid_type",
                 "tools[%zu] must be {\"type\": \"function\", \"function\": {\"name\": ...}}", ti);
            goto done;
        }
    }
    /* tool_choice: "none" hides the tools from the model; "required" and a named function are
     * forced by writing the opening of the call after the generation prompt (the model
     * continues inside <tool_call>, and for a named function after <function=NAME>); the
     * arguments are the model's own (no constrained decoding). Forcing skips the thinking. */
    json_t *choice = json_object_get(root, "tool_choice");
    int force_call = 0;
    const char *force_name = NULL;
    if (choice && !json_is_null(choice)) {
        const char *cs = json_string_value(choice);
        if (cs && !strcmp(cs, "none")) {
            tools = NULL; /* the model is not told about them, so it cannot call them */
        } else if (cs && !strcmp(cs, "required")) {
            force_call = 1;
        } else if (json_is_object(choice)) {
            const char *type = json_string_value(json_object_get(choice, "type"));
            force_name = json_string_value(json_object_get(json_object_get(choice, "function"),
                                                           "name"));
            if (!type || strcmp(type, "function") || !force_name) {
                fail(r, 400, "tool_choice", "invalid_type", "'tool_choice' must be \"none\", "
                     "\"auto\", \"required\" or {\"type\": \"function\", \"function\": "
                     "{\"name\": ...}}");
                goto done;
            }
            force_call = 1;
        } else if (!cs || strcmp(cs, "auto")) {
            fail(r, 400, "tool_choice", "invalid_value", "'tool_choice' must be \"none\", "
                 "\"auto\", \"required\" or a named function");
            goto done;
        }
    }
    if (force_call && (!tools || !json_array_size(tools))) {
        fail(r, 400, "tool_choice", "invalid_value", "'tool_choice' forces a tool call, but the "
             "request has no 'tools'");
        goto done;
    }
    if (force_name) {
        int known = 0;
        json_array_foreach(tools, ti, t) {
            const char *name = json_string_value(json_object_get(json_object_get(t, "function"),
                                                                 "name"));
            known |= name && !strcmp(name, force_name);
        }
        size_t nl = strlen(force_name);
        if (!known || !nl || nl > 64 || strspn(force_name, "abcdefghijklmnopqrstuvwxyz"
                                               "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") != nl) {
            fail(r, 400, "tool_choice", "invalid_value", "'tool_choice' names function '%s', "
                 "which is not one of the request's tools", force_name);
            goto done;
        }
    }
    if (tools && !json_array_size(tools)) tools = NULL;
    json_t *rf = json_object_get(root, "response_format");
    if (rf && !json_is_null(rf)) {
        const char *type = json_string_value(json_object_get(rf, "type"));
        if (!type || strcmp(type, "text")) {
            fail(r, 400, "response_format", "unsupported", "only response_format {\"type\": "
                 "\"text\"} is supported (no constrained decoding yet)");
            goto done;
        }
    }
    qmix_chat_opts co;
    qmix_chat_opts_default(&co);
    int thinking = co.enable_thinking;
    if (ctx->template_args && get_bool((json_t *)ctx->template_args, "enable_thinking",
                                       &thinking, r))
        goto done;
    json_t *kw = json_object_get(root, "chat_template_kwargs");
    if (kw && !json_is_null(kw)) {
        if (!json_is_object(kw)) {
            fail(r, 400, "chat_template_kwargs", "invalid_type",
                 "'chat_template_kwargs' must be an object");
            goto done;
        }
        if (get_bool(kw, "enable_thinking", &thinking, r)) goto done;
    }
    co.enable_thinking = thinking;
    qmix_err err;
    if (qmix_chat_render(messages, tools, &co, &text, &text_len, &err)) {
        fail(r, 400, "messages", "invalid_value", "%s", err.msg);
        goto done;
    }
    char forced[160] = "";
    if (force_call) { /* the call's opening, after the thinking (closed empty if it was open) */
        snprintf(forced, sizeof forced, "%s<tool_call>\n%s%s%s", thinking ? "</think>\n\n" : "",
                 force_name ? "<function=" : "", force_name ? force_name : "",
                 force_name ? ">\n" : "");
        size_t fl = strlen(forced);
        char *grown = realloc(text, text_len + fl + 1);
        if (!grown) {
            fail(r, 500, NULL, NULL, "out of memory");
            goto done;
        }
        text = grown;
        memcpy(text + text_len, forced, fl + 1);
        text_len += fl;
    }
    pthread_mutex_lock(ctx->tok_mu);
    int erc = qmix_chat_encode(ctx->tok, text, text_len, messages, &prompt, &n_prompt, &err);
    pthread_mutex_unlock(ctx->tok_mu);
    if (erc) {
        fail(r, 400, "messages", "invalid_value", "%s", err.msg);
        goto done;
    }
    if (ctx->vision) { /* images: encoded here (one request at a time), spliced into the prompt */
        mm = calloc(1, sizeof *mm);
        if (!mm) {
            fail(r, 500, NULL, NULL, "out of memory");
            goto done;
        }
        pthread_mutex_lock(ctx->vision_mu);
        erc = qmix_mm_request_images(ctx->vision, ctx->vision_pool, prompt, (int)n_prompt,
                                     messages, 0, ctx->max_images, ctx->vision->cfg.out_hidden,
                                     mm, &err);
        pthread_mutex_unlock(ctx->vision_mu);
        if (erc) {
            free(mm);
            mm = NULL;
            fail(r, 400, "messages", "invalid_value", "%s", err.msg);
            goto done;
        }
        if (!mm->n_images) { /* text only: the plain path */
            qmix_mm_request_free(mm);
            free(mm);
            mm = NULL;
        } else { /* the job's prompt: keys that tell images apart (prefix reuse) */
            int32_t *keys = malloc(sizeof *keys * (size_t)mm->prompt.n);
            if (!keys) {
                fail(r, 500, NULL, NULL, "out of memory");
                goto done;
            }
            memcpy(keys, mm->prompt.keys, sizeof *keys * (size_t)mm->prompt.n);
            free(prompt);
            prompt = keys;
            n_prompt = (size_t)mm->prompt.n;
        }
    }
    if ((long)n_prompt + 1 >= ctx->ctx) {
        fail(r, 400, "messages", "context_length_exceeded", "the prompt has %zu tokens; this "
             "server's context is %d tokens (--ctx), which leaves no room to answer", n_prompt,
             ctx->ctx);
        goto done;
    }
    gen_state *g = calloc(1, sizeof *g);
    if (g) {
        g->model = strdup(ctx->model_id);
        g->parser = qmix_toolcall_parser_new(tools, thinking);
    }
    if (g && g->parser && forced[0] && qmix_toolcall_feed(g->parser, forced, strlen(forced))) {
        qmix_toolcall_parser_free(g->parser); /* the parser reads the output as if generated */
        g->parser = NULL;
    }
    if (!g || !g->model || !g->parser) {
        gen_state_free(g);
        fail(r, 500, NULL, NULL, "out of memory");
        goto done;
    }
    submit(ctx, 1, &c, prompt, n_prompt, mm, g, r);
    prompt = NULL;
    mm = NULL;
done:
    free_stop(c.stop, c.n_stop);
    free(prompt);
    if (mm) qmix_mm_request_free(mm);
    free(mm);
    free(text);
    json_decref(messages);
    json_decref(root);
}

void api_completions(const api_ctx *ctx, const char *body, size_t len, api_reply *r)
{
    memset(r, 0, sizeof *r);
    json_t *root = parse_body(body, len, r);
    common_req c = {0};
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    if (!root || parse_common(ctx, root, 0, &c, r)) goto done;
    int echo = 0;
    if (get_bool(root, "echo", &echo, r)) goto done;
    json_t *suffix = json_object_get(root, "suffix");
    if (echo || (suffix && !json_is_null(suffix))) {
        fail(r, 400, echo ? "echo" : "suffix", "unsupported", "'%s' is not supported",
             echo ? "echo" : "suffix");
        goto done;
    }
    json_t *p = json_object_get(root, "prompt");
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
        p = json_array_get(p, 0); /* a batch of one prompt */
    if (json_is_string(p)) {
        qmix_err err;
        pthread_mutex_lock(ctx->tok_mu);
        int erc = qmix_tok_encode(ctx->tok, json_string_value(p), json_string_length(p), 1,
                                  &prompt, &n_prompt, &err);
        pthread_mutex_unlock(ctx->tok_mu);
        if (erc) {
            fail(r, 400, "prompt", "invalid_value", "%s", err.msg);
            goto done;
        }
    } else if (json_is_array(p) && json_array_size(p) > 0 &&
               json_is_integer(json_array_get(p, 0))) { /* token ids */
        n_prompt = json_array_size(p);
        prompt = malloc(sizeof *prompt * n_prompt);
        if (!prompt) {
            fail(r, 500, NULL, NULL, "out of memory");
            goto done;
        }
        int32_t vocab = qmix_tok_vocab_size(ctx->tok);
        for (size_t i = 0; i < n_prompt; i++) {
            json_t *v = json_array_get(p, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) >= vocab) {
                fail(r, 400, "prompt", "invalid_value", "prompt[%zu] is not a token id in "
                     "[0, %d)", i, (int)vocab);
                goto done;
            }
            prompt[i] = (int32_t)json_integer_value(v);
        }
    } else {
        fail(r, 400, "prompt", p ? "invalid_type" : "missing",
             "'prompt' must be a string (or a list of one string, or a list of token ids)");
        goto done;
    }
    if (!n_prompt) {
        fail(r, 400, "prompt", "invalid_value", "the prompt is empty");
        goto done;
    }
    if ((long)n_prompt + 1 >= ctx->ctx) {
        fail(r, 400, "prompt", "context_length_exceeded", "the prompt has %zu tokens; this "
             "server's context is %d tokens (--ctx), which leaves no room to answer", n_prompt,
             ctx->ctx);
        goto done;
    }
    gen_state *g = calloc(1, sizeof *g);
    if (!g || !(g->model = strdup(ctx->model_id))) {
        gen_state_free(g);
        fail(r, 500, NULL, NULL, "out of memory");
        goto done;
    }
    submit(ctx, 0, &c, prompt, n_prompt, NULL, g, r);
    prompt = NULL;
done:
    free_stop(c.stop, c.n_stop);
    free(prompt);
    json_decref(root);
}

char *api_models(const api_ctx *ctx)
{
    json_t *v = json_pack("{s:s, s:[{s:s, s:s, s:I, s:s, s:i}]}", "object", "list", "data", "id",
                          ctx->model_id, "object", "model", "created", (json_int_t)0, "owned_by",
                          "qmix", "max_model_len", ctx->ctx);
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    return s;
}

char *api_health(const api_ctx *ctx)
{
    json_t *v = srv_engine_stats(ctx->eng);
    if (v) {
        json_object_set_new(v, "status", json_string("ok"));
        json_object_set_new(v, "model", json_string(ctx->model_id));
    }
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    return s;
}

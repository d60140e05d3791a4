/* The HTTP side of `qmix serve`, on libmicrohttpd: one thread per connection, so a handler may
 * block while its request waits for a slot or its generation runs (the engine's scheduler does the
 * computing). Streaming responses are read from the job's output as the scheduler produces it. */
#include "server/server.h"

#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "formats/config.h"
#include "runtime/generate.h"
#include "model/vision.h"
#include "server/api.h"
#include "server/engine.h"
#include "server/http_guard.h"
#include "text/tokenizer.h"
#include "util/err.h"

struct qmix_server {
    struct MHD_Daemon *daemon;
    qmix_model *model;
    qmix_tokenizer *tok;
    pthread_mutex_t tok_mu;
    srv_engine *eng;
    api_ctx api;
    qmix_vision *vision;       /* the model's vision tower, or NULL */
    qmix_pool *vision_pool;
    pthread_mutex_t vision_mu;
    char *model_id, *model_path, *api_key;
    json_t *template_args;
    size_t max_body;
    int port;
    http_guard *guard;
    unsigned idle_timeout, busy_timeout; /* seconds of silence before a connection is closed */
    atomic_int active; /* requests between their first call and their completion */
};

/* One HTTP request: its body as it arrives. */
typedef struct request {
    char *body;
    size_t len, cap;
    int too_big;
} request;

/* A streaming response's source: the job (one reference) and the connection it goes to. */
typedef struct stream_src {
    srv_job *job;
    struct MHD_Connection *conn;
} stream_src;

/* The client closed its end (or the socket failed): its generation is no longer wanted. */
static int client_gone(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static enum MHD_Result send_body(const qmix_server *s, struct MHD_Connection *conn,
                                 unsigned status, char *body, int retry_after)
{
    if (!body) { /* out of memory while building it */
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\","
                      "\"param\":null,\"code\":null}}");
        if (!body) return MHD_NO;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    http_guard_decorate(s->guard, conn, resp);
    if (status == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_after);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    enum MHD_Result rc = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result send_error(const qmix_server *s, struct MHD_Connection *conn,
                                  unsigned status, const char *type, const char *code,
                                  const char *msg)
{
    return send_body(s, conn, status, api_error(type, NULL, code, "%s", msg), 0);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    stream_src *src = cls;
    (void)pos;
    for (;;) {
        int eof;
        size_t n = srv_job_read(src->job, buf, max, 100, &eof);
        if (n) return (ssize_t)n;
        if (eof) return MHD_CONTENT_READER_END_OF_STREAM;
        if (client_gone(src->conn)) {
            src->job->cancel = 1;
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls)
{
    stream_src *src = cls;
    /* The response is dropped: either everything was sent (the job is done and this is a
     * no-op) or the connection failed part-way, and nobody will read the rest. */
    src->job->cancel = 1;
    srv_job_release(src->job);
    free(src);
}

/* Runs a submitted job to its response: streamed as it is generated, or waited for. */
static enum MHD_Result respond_job(const qmix_server *s, struct MHD_Connection *conn,
                                   api_reply *r)
{
    srv_job *job = r->job;
    if (r->stream) {
        stream_src *src = malloc(sizeof *src);
        struct MHD_Response *resp =
            src ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read,
                                                    src, stream_free)
                : NULL;
        if (!resp) {
            free(src);
            job->cancel = 1;
            srv_job_release(job);
            return send_error(s, conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                              "out of memory");
        }
        src->job = job;
        src->conn = conn;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        http_guard_decorate(s->guard, conn, resp);
        enum MHD_Result rc = MHD_queue_response(conn, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        return rc;
    }
    int gone = 0;
    while (!srv_job_wait_done(job, 100))
        if (!gone && client_gone(conn)) {
            job->cancel = 1; /* finishes after the current token */
            gone = 1;
        }
    int status;
    char *body = api_final(job, &status);
    srv_job_release(job);
    if (gone) {
        free(body);
        return MHD_NO; /* close the connection: there is nobody to answer */
    }
    return send_body(s, conn, (unsigned)status, body, 0);
}

/* Prometheus text exposition format. */
static enum MHD_Result send_metrics(const qmix_server *s, struct MHD_Connection *conn,
                                    char *text)
{
    if (!text) return send_body(s, conn, MHD_HTTP_INTERNAL_SERVER_ERROR, NULL, 0);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; version=0.0.4");
    http_guard_decorate(s->guard, conn, resp);
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* A CORS preflight that --cors allows: no body, the CORS headers. */
static enum MHD_Result send_preflight(const qmix_server *s, struct MHD_Connection *conn)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    http_guard_decorate(s->guard, conn, resp);
    enum MHD_Result rc = MHD_queue_response(conn, MHD_HTTP_NO_CONTENT, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **req_cls)
{
    qmix_server *s = cls;
    (void)version;
    request *rq = *req_cls;
    int is_get = !strcmp(method, MHD_HTTP_METHOD_GET), is_post = !strcmp(method, "POST");
    int chat = !strcmp(url, "/v1/chat/completions"), completions = !strcmp(url, "/v1/completions");
    if (!rq) { /* first call: only the headers are here */
        if (!(rq = calloc(1, sizeof *rq))) return MHD_NO;
        *req_cls = rq;
        atomic_fetch_add(&s->active, 1);
        http_refusal why;
        int g = http_guard_check(s->guard, conn, method, &why);
        if (g == 2) return send_preflight(s, conn);
        if (g) return send_error(s, conn, why.status, "invalid_request_error", why.code,
                                 why.message);
        if (!strcmp(url, "/health") || !strcmp(url, "/v1/health")) {
            if (!is_get)
                return send_error(s, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "invalid_request_error",
                                  NULL, "use GET");
            return send_body(s, conn, MHD_HTTP_OK, api_health(&s->api), 0);
        }
        if (!strcmp(url, "/metrics")) { /* like /health, open to scrapers without the key */
            if (!is_get)
                return send_error(s, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "invalid_request_error",
                                  NULL, "use GET");
            return send_metrics(s, conn, srv_engine_metrics(s->eng));
        }
        if (s->api_key) {
            const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                           MHD_HTTP_HEADER_AUTHORIZATION);
            if (!http_guard_bearer_ok(auth, s->api_key))
                return send_error(s, conn, MHD_HTTP_UNAUTHORIZED, "invalid_request_error",
                                  "invalid_api_key",
                                  "missing or wrong API key (Authorization: Bearer KEY)");
        }
        if (!strcmp(url, "/v1/models")) {
            if (!is_get)
                return send_error(s, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "invalid_request_error",
                                  NULL, "use GET");
            return send_body(s, conn, MHD_HTTP_OK, api_models(&s->api), 0);
        }
        if (!chat && !completions)
            return send_error(s, conn, MHD_HTTP_NOT_FOUND, "invalid_request_error", "not_found",
                              "no such endpoint");
        if (!is_post)
            return send_error(s, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "invalid_request_error", NULL,
                              "use POST");
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->max_body) /* refused before it is read */
            return send_error(s, conn, MHD_HTTP_CONTENT_TOO_LARGE, "invalid_request_error",
                              "request_too_large", "the request body is over the size limit");
        return MHD_YES;
    }
    if (*upload_size) { /* a piece of the body */
        size_t n = *upload_size;
        *upload_size = 0;
        if (rq->too_big || rq->len + n > s->max_body) { /* chunked bodies: count and drop */
            rq->too_big = 1;
            free(rq->body);
            rq->body = NULL;
            rq->len = rq->cap = 0;
            return MHD_YES;
        }
        if (rq->len + n > rq->cap) {
            size_t cap = (rq->len + n) * 2;
            if (cap > s->max_body) cap = s->max_body;
            char *grown = realloc(rq->body, cap);
            if (!grown) return MHD_NO;
            rq->body = grown;
            rq->cap = cap;
        }
        memcpy(rq->body + rq->len, upload, n);
        rq->len += n;
        return MHD_YES;
    }
    if (rq->too_big)
        return send_error(s, conn, MHD_HTTP_CONTENT_TOO_LARGE, "invalid_request_error",
                          "request_too_large", "the request body is over the size limit");
    /* the request is complete: a generation may keep this connection silent for long (a long
     * prompt's prefill, a non-streamed answer); completed() shortens it again */
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, s->busy_timeout);
    api_reply r;
    if (chat) api_chat_completions(&s->api, rq->body ? rq->body : "", rq->len, &r);
    else api_completions(&s->api, rq->body ? rq->body : "", rq->len, &r);
    if (!r.job) return send_body(s, conn, (unsigned)r.status, r.body, r.retry_after);
    free(r.body);
    return respond_job(s, conn, &r);
}

static void completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                      enum MHD_RequestTerminationCode toe)
{
    qmix_server *s = cls;
    (void)toe;
    request *rq = *req_cls;
    if (!rq) return;
    if (conn) /* waiting for the next request on a kept-alive connection: the short timeout */
        MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, s->idle_timeout);
    atomic_fetch_sub(&s->active, 1);
    free(rq->body);
    free(rq);
    *req_cls = NULL;
}

int qmix_server_start(const qmix_server_opts *o, qmix_server **out, qmix_err *err)
{
    *out = NULL;
    qmix_server *s = calloc(1, sizeof *s);
    if (!s) return qmix_errf(err, "out of memory");
    pthread_mutex_init(&s->tok_mu, NULL);
    pthread_mutex_init(&s->vision_mu, NULL);
    qmix_generation_config gen;
    if (qmix_model_open(o->model_path, &s->model, err) || qmix_tok_load(o->model_dir, &s->tok, err) ||
        qmix_generation_config_load(o->model_dir, &gen, err))
        goto fail;
    /* The model id clients name: the checkpoint directory's last component. */
    size_t dl = strlen(o->model_dir);
    while (dl > 1 && o->model_dir[dl - 1] == '/') dl--;
    size_t b = dl;
    while (b > 0 && o->model_dir[b - 1] != '/') b--;
    s->model_id = o->model_id ? strdup(o->model_id) : strndup(o->model_dir + b, dl - b);
    s->model_path = strdup(o->model_path);
    s->api_key = o->api_key ? strdup(o->api_key) : NULL;
    s->template_args = o->template_args ? json_deep_copy(o->template_args) : NULL;
    if (!s->model_id || !s->model_path || (o->api_key && !s->api_key) ||
        (o->template_args && !s->template_args)) {
        qmix_errf(err, "out of memory");
        goto fail;
    }
    s->max_body = o->max_body ? o->max_body : 8u << 20;
    srv_engine_opts eo = {.n_slots = o->parallel > 0 ? o->parallel : 1, .ctx = o->ctx,
                          .n_threads = o->threads, .max_queue = o->max_queue,
                          .prefill_chunk = o->prefill_chunk, .cache_bytes = o->prefix_cache_bytes,
                          .kv_type = o->kv_type};
    if (srv_engine_new(s->model, s->tok, &gen, &eo, &s->eng, err)) goto fail;
    if ((o->mmproj || qmix_model_has_vision(s->model)) &&
        ((o->mmproj ? qmix_vision_open_mmproj(s->model, o->mmproj, s->tok, &s->vision, err)
                    : qmix_vision_open(s->model, &s->vision, err)) ||
         !(s->vision_pool = qmix_pool_new(o->threads)))) {
        if (s->vision) qmix_errf(err, "cannot start the image encoder's threads");
        goto fail;
    }

    qmix_sampling sp = o->sampling;
    if (!o->sampling_given) qmix_gen_sampling_defaults(&sp, &gen); /* as `qmix chat` does */
    s->api = (api_ctx){.eng = s->eng, .tok = s->tok, .tok_mu = &s->tok_mu,
                       .model_id = s->model_id, .model_path = s->model_path, .defaults = sp,
                       .seed_given = o->seed_given, .template_args = s->template_args,
                       .ctx = o->ctx, .vision = s->vision, .vision_pool = s->vision_pool,
                       .vision_mu = &s->vision_mu,
                       .max_images = o->max_images > 0 ? o->max_images : 8};

    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_PASSIVE},
                    *ai = NULL;
    int gai = getaddrinfo(o->host ? o->host : "127.0.0.1", port, &hints, &ai);
    if (gai) {
        qmix_errf(err, "cannot resolve --host %s: %s", o->host, gai_strerror(gai));
        goto fail;
    }
    /* Room for many idle sockets: one descriptor each (plus a thread while it is open). */
    unsigned max_conn = o->max_connections ? o->max_connections : 1024;
    struct rlimit nofile;
    if (!getrlimit(RLIMIT_NOFILE, &nofile)) {
        if (nofile.rlim_cur < nofile.rlim_max && nofile.rlim_cur < (rlim_t)max_conn + 128) {
            nofile.rlim_cur = nofile.rlim_max; /* the hard limit allows it: take it */
            setrlimit(RLIMIT_NOFILE, &nofile);
            getrlimit(RLIMIT_NOFILE, &nofile);
        }
        if (nofile.rlim_cur != RLIM_INFINITY && nofile.rlim_cur < (rlim_t)max_conn + 128)
            max_conn = nofile.rlim_cur > 192 ? (unsigned)nofile.rlim_cur - 128 : 64;
    }
    s->idle_timeout = o->idle_timeout ? o->idle_timeout : 10;
    s->busy_timeout = 600;
    http_guard_opts go = {.bound = ai->ai_addr, .port = o->port, .cors_origin = o->cors_origin,
                          .per_ip_limit = o->per_ip_limit};
    if (http_guard_new(&go, &s->guard, err)) {
        freeaddrinfo(ai);
        goto fail;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_POLL | MHD_USE_ITC | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    s->daemon = MHD_start_daemon(
        flags, (uint16_t)o->port, http_guard_accept, s->guard, handle, s, MHD_OPTION_SOCK_ADDR,
        ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
        MHD_OPTION_NOTIFY_CONNECTION, http_guard_notify, s->guard,
        /* headers beyond this (and request lines) get 431 / 414 from libmicrohttpd */
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
        /* Headroom: idle sockets cost a descriptor and a thread; a connection that is silent
         * for idle_timeout while its request is incomplete (or between requests) is closed,
         * so half-sent headers cannot hold a slot for long. Generating requests get
         * busy_timeout (handle, completed). */
        MHD_OPTION_CONNECTION_LIMIT, max_conn,
        MHD_OPTION_CONNECTION_TIMEOUT, s->idle_timeout, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->daemon) {
        qmix_errf(err, "cannot listen on %s:%d (address in use, or not an address here?)",
                  o->host ? o->host : "127.0.0.1", o->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : o->port;
    http_guard_set_port(s->guard, s->port);
    *out = s;
    return 0;
fail:
    qmix_server_stop(s);
    return -1;
}

int qmix_server_port(const qmix_server *s) { return s->port; }
const char *qmix_server_model_id(const qmix_server *s) { return s->model_id; }

void qmix_server_stop(qmix_server *s)
{
    if (!s) return;
    if (s->eng) srv_engine_stop(s->eng); /* running generations end after their next token */
    if (s->daemon) {
        /* No new connections; requests in flight get their (cut short) answers before the
         * connections are closed, for up to 10 s. */
        MHD_socket listen_fd = MHD_quiesce_daemon(s->daemon);
        if (listen_fd != MHD_INVALID_SOCKET) close(listen_fd);
        for (int i = 0; i < 1000 && atomic_load(&s->active) > 0; i++) {
            struct timespec ts = {0, 10 * 1000000L};
            nanosleep(&ts, NULL);
        }
        MHD_stop_daemon(s->daemon); /* closes idle connections, joins their threads */
    }
    srv_engine_free(s->eng);
    qmix_tok_free(s->tok);
    if (s->vision_pool) qmix_pool_free(s->vision_pool);
    qmix_vision_free(s->vision);
    qmix_model_close(s->model);
    pthread_mutex_destroy(&s->tok_mu);
    pthread_mutex_destroy(&s->vision_mu);
    json_decref(s->template_args);
    free(s->model_id);
    free(s->model_path);
    free(s->api_key);
    http_guard_free(s->guard);
    free(s);
}

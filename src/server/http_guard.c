#include "server/http_guard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util/err.h"

/* One client address and its open connections. */
typedef struct addr_count {
    unsigned char addr[16]; /* IPv4 as an IPv4-mapped IPv6 address */
    unsigned n;
} addr_count;

struct http_guard {
    int loopback;  /* bound to a loopback address: Host must name this machine */
    int port;
    char *cors_origin;
    unsigned per_ip_limit;
    pthread_mutex_t mu;
    addr_count *counts; /* addresses with a connection open, unordered */
    size_t n_counts, cap_counts;
};

/* The address as 16 bytes (IPv4 mapped into IPv6); 0 if it is neither. */
static int addr_key(const struct sockaddr *sa, unsigned char key[16])
{
    if (!sa) return 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        memset(key, 0, 10);
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &a->sin_addr, 4);
        return 1;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return 1;
    }
    return 0;
}

static int key_is_loopback(const unsigned char k[16])
{
    static const unsigned char v6_loop[16] = {[15] = 1};
    static const unsigned char v4_mapped[12] = {[10] = 0xff, [11] = 0xff};
    /* 127.0.0.1 and ::1 only, where a local reverse proxy connects from; the rest of 127/8
     * counts as any other address */
    return !memcmp(k, v6_loop, 16) ||
           (!memcmp(k, v4_mapped, 12) && k[12] == 127 && !k[13] && !k[14] && k[15] == 1);
}

int http_guard_new(const http_guard_opts *o, http_guard **out, qmix_err *err)
{
    *out = NULL;
    http_guard *g = calloc(1, sizeof *g);
    if (!g) return qmix_errf(err, "out of memory");
    unsigned char k[16];
    static const unsigned char v4_mapped[12] = {[10] = 0xff, [11] = 0xff};
    g->loopback = addr_key(o->bound, k) && (key_is_loopback(k) ||
                                            (!memcmp(k, v4_mapped, 12) && k[12] == 127));
    g->port = o->port;
    g->per_ip_limit = o->per_ip_limit;
    if (o->cors_origin && !(g->cors_origin = strdup(o->cors_origin))) {
        free(g);
        return qmix_errf(err, "out of memory");
    }
    pthread_mutex_init(&g->mu, NULL);
    *out = g;
    return 0;
}

void http_guard_set_port(http_guard *g, int port) { g->port = port; }

void http_guard_free(http_guard *g)
{
    if (!g) return;
    pthread_mutex_destroy(&g->mu);
    free(g->counts);
    free(g->cors_origin);
    free(g);
}

static addr_count *find_count(http_guard *g, const unsigned char k[16])
{
    for (size_t i = 0; i < g->n_counts; i++)
        if (!memcmp(g->counts[i].addr, k, 16)) return &g->counts[i];
    return NULL;
}

/* Runs on the listening thread after libmicrohttpd's own (total) limit; the count itself moves
 * in http_guard_notify, which sees every connection that was really opened and closed. */
enum MHD_Result http_guard_accept(void *cls, const struct sockaddr *addr, socklen_t len)
{
    http_guard *g = cls;
    (void)len;
    unsigned char k[16];
    if (!g->per_ip_limit || !addr_key(addr, k) || key_is_loopback(k)) return MHD_YES;
    pthread_mutex_lock(&g->mu);
    addr_count *c = find_count(g, k);
    int over = c && c->n >= g->per_ip_limit;
    pthread_mutex_unlock(&g->mu);
    return over ? MHD_NO : MHD_YES;
}

void http_guard_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                       enum MHD_ConnectionNotificationCode code)
{
    http_guard *g = cls;
    (void)socket_context;
    if (!g->per_ip_limit) return;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    unsigned char k[16];
    if (!ci || !addr_key(ci->client_addr, k) || key_is_loopback(k)) return;
    pthread_mutex_lock(&g->mu);
    addr_count *c = find_count(g, k);
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        if (!c && g->n_counts == g->cap_counts) {
            size_t cap = g->cap_counts ? g->cap_counts * 2 : 64;
            addr_count *grown = realloc(g->counts, cap * sizeof *grown);
            if (grown) g->counts = grown, g->cap_counts = cap;
        }
        if (!c && g->n_counts < g->cap_counts) { /* else uncounted: out of memory */
            c = &g->counts[g->n_counts++];
            memcpy(c->addr, k, 16);
            c->n = 0;
        }
        if (c) c->n++;
    } else if (c && c->n && !--c->n) {
        *c = g->counts[--g->n_counts]; /* the last one moves into the hole */
    }
    pthread_mutex_unlock(&g->mu);
}

/* Host names this machine: localhost, 127.0.0.1 or [::1], with this port or none. */
static int host_is_local(const char *host, int port)
{
    static const char *const names[] = {"localhost", "127.0.0.1", "[::1]"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        size_t n = strlen(names[i]);
        if (strncasecmp(host, names[i], n)) continue;
        const char *rest = host + n;
        if (!*rest) return 1;
        if (*rest != ':') continue;
        char *end;
        long p = strtol(rest + 1, &end, 10);
        return rest[1] && !*end && p == port;
    }
    return 0;
}

/* The media type is application/json (any parameters, e.g. charset, after a ';'). */
static int is_json_type(const char *ct)
{
    if (!ct) return 0;
    while (*ct == ' ' || *ct == '\t') ct++;
    static const char want[] = "application/json";
    if (strncasecmp(ct, want, sizeof want - 1)) return 0;
    ct += sizeof want - 1;
    while (*ct == ' ' || *ct == '\t') ct++;
    return !*ct || *ct == ';';
}

static int origin_allowed(const http_guard *g, const char *origin)
{
    return g->cors_origin && (!strcmp(g->cors_origin, "*") || !strcmp(g->cors_origin, origin));
}

int http_guard_check(const http_guard *g, struct MHD_Connection *conn, const char *method,
                     http_refusal *why)
{
    if (g->loopback) { /* DNS rebinding: a page's own name that resolves to 127.0.0.1 */
        const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                       MHD_HTTP_HEADER_HOST);
        if (host && !host_is_local(host, g->port)) {
            *why = (http_refusal){MHD_HTTP_FORBIDDEN, "invalid_host",
                                  "the Host header must name this machine (localhost, "
                                  "127.0.0.1 or [::1] with the server's port)"};
            return 1;
        }
    }
    const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_ORIGIN);
    if (origin && !origin_allowed(g, origin)) {
        *why = (http_refusal){MHD_HTTP_FORBIDDEN, "cross_origin",
                              g->cors_origin ? "cross-origin requests from this origin are not "
                                               "allowed (see --cors)"
                                             : "cross-origin requests are not allowed (start the "
                                               "server with --cors ORIGIN to allow one)"};
        return 1;
    }
    if (!strcmp(method, MHD_HTTP_METHOD_OPTIONS)) {
        if (origin) return 2; /* allowed above */
        *why = (http_refusal){MHD_HTTP_METHOD_NOT_ALLOWED, NULL, "OPTIONS is only answered "
                                                                 "to a CORS preflight"};
        return 1;
    }
    if (!strcmp(method, MHD_HTTP_METHOD_POST) &&
        !is_json_type(MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                  MHD_HTTP_HEADER_CONTENT_TYPE))) {
        /* text/plain, forms and bodies without a type are what a page may send cross-origin
         * without a preflight; real clients send JSON */
        *why = (http_refusal){MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                              "the request body must be JSON (Content-Type: application/json)"};
        return 1;
    }
    return 0;
}

void http_guard_decorate(const http_guard *g, struct MHD_Connection *conn,
                         struct MHD_Response *resp)
{
    if (!g || !g->cors_origin) return;
    const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_ORIGIN);
    if (!origin || !origin_allowed(g, origin)) return;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_VARY, "Origin");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCESS_CONTROL_ALLOW_METHODS,
                            "GET, POST, OPTIONS");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCESS_CONTROL_ALLOW_HEADERS,
                            "Authorization, Content-Type");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCESS_CONTROL_MAX_AGE, "600");
}

int http_guard_bearer_ok(const char *auth, const char *key)
{
    if (!auth || strncasecmp(auth, "Bearer", 6) || (auth[6] != ' ' && auth[6] != '\t')) return 0;
    const char *given = auth + 6;
    while (*given == ' ' || *given == '\t') given++;
    /* every byte of the key is looked at whatever the given one holds: the time does not tell
     * how much of a guess was right */
    size_t lk = strlen(key), lg = strlen(given);
    unsigned char d = lk != lg;
    for (size_t i = 0; i < lk; i++) d |= (unsigned char)(key[i] ^ (i < lg ? given[i] : 0));
    return d == 0;
}

/* The server's defences at the HTTP edge, kept apart from routing (server.c) and the API (api.c):
 * a per-address connection limit, the checks a request passes before it is routed (Host when
 * bound to loopback, JSON-only POST bodies, Origin / CORS) and the API key check.
 *
 * Why: a browser page can reach a local server (a cross-origin "simple" POST with text/plain runs
 * without a preflight; DNS rebinding makes a page's own origin resolve to 127.0.0.1), and one
 * remote address can hold every connection slot with idle sockets. */
#ifndef QMIX_SERVER_HTTP_GUARD_H
#define QMIX_SERVER_HTTP_GUARD_H

#include <microhttpd.h>
#include <sys/socket.h>

#include "qmix.h"

typedef struct http_guard http_guard;

typedef struct http_guard_opts {
    const struct sockaddr *bound; /* the listening address: loopback turns the Host check on */
    int port;                     /* the port Host must name (set again once bound, for port 0) */
    const char *cors_origin;      /* NULL: cross-origin requests refused; "*" or one origin */
    unsigned per_ip_limit;        /* connections per client address (loopback exempt); 0: none */
} http_guard_opts;

int http_guard_new(const http_guard_opts *o, http_guard **out, qmix_err *err);
void http_guard_set_port(http_guard *g, int port);
void http_guard_free(http_guard *g);

/* libmicrohttpd's accept policy and connection notifier (pass g as their cls): together they
 * count connections per client address and refuse one over the limit. */
enum MHD_Result http_guard_accept(void *cls, const struct sockaddr *addr, socklen_t len);
void http_guard_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                       enum MHD_ConnectionNotificationCode code);

/* A refusal: the HTTP status and an OpenAI-style error code and message. */
typedef struct http_refusal {
    unsigned status;
    const char *code, *message;
} http_refusal;

/* Checks run on a request's headers before it is routed. Returns 0 to go on, 1 when the request
 * is refused (*why says how), 2 when it is a CORS preflight that is allowed (answer 204 with
 * http_guard_decorate's headers). */
int http_guard_check(const http_guard *g, struct MHD_Connection *conn, const char *method,
                     http_refusal *why);
/* Adds the CORS headers a response to this connection's request needs (none unless --cors). */
void http_guard_decorate(const http_guard *g, struct MHD_Connection *conn,
                         struct MHD_Response *resp);

/* "Bearer KEY" (scheme case-insensitive) naming key, compared in constant time. */
int http_guard_bearer_ok(const char *authorization, const char *key);

#endif

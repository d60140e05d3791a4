/* The tool-call parser: a three-state machine (reasoning, content, inside a <tool_call>) over a
 * buffer of undecided bytes. See toolcall.h for the contract. */
#include "text/toolcall.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/chat.h"

typedef struct {
    char *p;
    size_t n, cap;
} buf;

static int buf_put(buf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) return -1;
        b->p = q;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

static void buf_consume(buf *b, size_t n)
{
    memmove(b->p, b->p + n, b->n - n);
    b->n -= n;
    if (b->p) b->p[b->n] = 0;
}

enum { S_REASON, S_CONTENT, S_CALL };

/* A stream (reasoning or content) that skips leading whitespace and holds trailing whitespace. */
typedef struct {
    buf text, held;
    int started;
} stream;

struct qmix_toolcall_parser {
    json_t *tools;
    int state, finished, oom;
    int think_checked; /* content has begun with something other than <think> */
    buf pend;          /* undecided bytes; in S_CALL the call body so far */
    size_t scan_from;  /* in S_CALL, where the next tag search starts */
    stream reason, content;
    qmix_tool_call *calls;
    size_t n_calls, cap_calls;
    char **warnings;
    size_t n_warn, cap_warn;
};

static const char T_THINK[] = "<think>", T_ENDTHINK[] = "</think>", T_CALL[] = "<tool_call>",
                  T_ENDCALL[] = "</tool_call>";

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static void stream_put(qmix_toolcall_parser *p, stream *s, const char *t, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        if (is_ws(t[i])) {
            while (j < n && is_ws(t[j])) j++;
            if (s->started && buf_put(&s->held, t + i, j - i)) p->oom = 1;
        } else {
            while (j < n && !is_ws(t[j])) j++;
            if (buf_put(&s->text, s->held.p ? s->held.p : "", s->held.n) ||
                buf_put(&s->text, t + i, j - i))
                p->oom = 1;
            s->held.n = 0;
            s->started = 1;
        }
        i = j;
    }
}

static void warn(qmix_toolcall_parser *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void warn(qmix_toolcall_parser *p, const char *fmt, ...)
{
    if (p->n_warn == p->cap_warn) {
        size_t cap = p->cap_warn ? p->cap_warn * 2 : 4;
        char **w = realloc(p->warnings, cap * sizeof *w);
        if (!w) {
            p->oom = 1;
            return;
        }
        p->warnings = w;
        p->cap_warn = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *msg = NULL;
    if (vasprintf(&msg, fmt, ap) < 0) msg = NULL;
    va_end(ap);
    if (!msg) {
        p->oom = 1;
        return;
    }
    p->warnings[p->n_warn++] = msg;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of tag. */
static size_t partial_suffix(const char *s, size_t n, const char *tag)
{
    size_t k = strlen(tag) - 1;
    if (k > n) k = n;
    for (; k > 0; k--)
        if (!memcmp(s + n - k, tag, k)) return k;
    return 0;
}

/* ---- a call body: "\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n" ---- */

static const json_t *schema_of(const json_t *tools, const char *fn, const char *param,
                               int *known_fn)
{
    *known_fn = 0;
    for (size_t i = 0; i < json_array_size(tools); i++) {
        const json_t *t = json_array_get(tools, i), *f = json_object_get(t, "function");
        if (!f) f = t;
        const char *name = json_string_value(json_object_get(f, "name"));
        if (!name || strcmp(name, fn)) continue;
        *known_fn = 1;
        if (!param) return NULL;
        const json_t *props = json_object_get(json_object_get(f, "parameters"), "properties");
        return json_object_get(props, param);
    }
    return NULL;
}

static json_t *typed_as(const char *type, const char *v, size_t n)
{
    while (n && is_ws(*v)) v++, n--;
    while (n && is_ws(v[n - 1])) n--;
    if (!n) return NULL;
    char *tmp = strndup(v, n);
    if (!tmp) return NULL;
    json_t *r = NULL;
    if (!strcmp(type, "boolean")) {
        if (!strcmp(tmp, "true") || !strcmp(tmp, "True")) r = json_true();
        else if (!strcmp(tmp, "false") || !strcmp(tmp, "False")) r = json_false();
    } else if (!strcmp(type, "null")) {
        if (!strcmp(tmp, "null") || !strcmp(tmp, "None")) r = json_null();
    } else if (!strcmp(type, "integer") || !strcmp(type, "number") || !strcmp(type, "object") ||
               !strcmp(type, "array")) {
        r = json_loadb(tmp, n, JSON_DECODE_ANY, NULL);
        int ok = r && ((!strcmp(type, "integer") && json_is_integer(r)) ||
                       (!strcmp(type, "number") && json_is_number(r)) ||
                       (!strcmp(type, "object") && json_is_object(r)) ||
                       (!strcmp(type, "array") && json_is_array(r)));
        if (!ok) {
            json_decref(r);
            r = NULL;
        }
    }
    free(tmp);
    return r;
}

/* Parameter `param` typed by its schema; the string when untyped or not convertible. */
static json_t *typed_value(qmix_toolcall_parser *p, const char *fn, const char *param,
                           const char *v, size_t n)
{
    int known;
    const json_t *prop = schema_of(p->tools, fn, param, &known);
    const json_t *type = json_object_get(prop, "type");
    const char *types[16];
    size_t nt = 0;
    if (json_is_string(type)) types[nt++] = json_string_value(type);
    for (size_t i = 0; json_is_array(type) && i < json_array_size(type) && nt < 16; i++)
        if (json_is_string(json_array_get(type, i)))
            types[nt++] = json_string_value(json_array_get(type, i));
    int wants_string = nt == 0;
    for (size_t i = 0; i < nt; i++) {
        if (!strcmp(types[i], "string")) {
            wants_string = 1;
            continue;
        }
        json_t *r = typed_as(types[i], v, n);
        if (r) return r;
    }
    if (!wants_string)
        warn(p, "tool call %s: parameter '%s' is not a valid %s; kept as a string", fn, param,
             types[0]);
    return json_stringn(v, n);
}

static int starts(const char *s, const char *end, const char *tag)
{
    size_t k = strlen(tag);
    return (size_t)(end - s) >= k && !memcmp(s, tag, k);
}

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && is_ws(*s)) s++;
    return s;
}

/* "<tag=NAME>": returns NAME's end (at '>') or NULL. */
static const char *tag_name(const char *s, const char *end, const char **name)
{
    *name = s;
    while (s < end && *s != '>' && *s != '\n' && *s != '<') s++;
    if (s == end || *s != '>' || s == *name) return NULL;
    return s;
}

/* Parses a call body; on success appends the call and returns 0, else sets *why. */
static int parse_call(qmix_toolcall_parser *p, const char *s, size_t len, const char **why)
{
    const char *end = s + len, *name;
    s = skip_ws(s, end);
    if (!starts(s, end, "<function=")) {
        *why = "no <function=NAME>";
        return -1;
    }
    const char *name_end = tag_name(s + 10, end, &name);
    if (!name_end) {
        *why = "unterminated or empty function name";
        return -1;
    }
    char *fn = strndup(name, (size_t)(name_end - name));
    json_t *args = json_object();
    if (!fn || !args) {
        p->oom = 1;
        free(fn);
        json_decref(args);
        *why = "out of memory";
        return -1;
    }
    s = name_end + 1;
    for (;;) {
        s = skip_ws(s, end);
        if (starts(s, end, "</function>")) {
            s = skip_ws(s + 11, end);
            if (s != end) {
                *why = "text after </function>";
                goto bad;
            }
            break;
        }
        if (s == end) {
            *why = "no </function>";
            goto bad;
        }
        if (!starts(s, end, "<parameter=")) {
            *why = "expected <parameter=NAME> or </function>";
            goto bad;
        }
        const char *pname;
        const char *pend = tag_name(s + 11, end, &pname);
        if (!pend) {
            *why = "unterminated or empty parameter name";
            goto bad;
        }
        const char *v = pend + 1;
        if (v < end && *v == '\n') v++;
        const char *close = memmem(v, (size_t)(end - v), "</parameter>", 12);
        if (!close) {
            *why = "a parameter without </parameter>";
            goto bad;
        }
        size_t vn = (size_t)(close - v);
        if (vn && v[vn - 1] == '\n') vn--;
        char *key = strndup(pname, (size_t)(pend - pname));
        if (!key) {
            p->oom = 1;
            *why = "out of memory";
            goto bad;
        }
        if (json_object_get(args, key)) {
            free(key);
            *why = "a parameter given twice";
            goto bad;
        }
        /* NULL or a refused key: bytes that are not UTF-8 text (jansson checks); a malformed
         * call, not out of memory (which would stop the parser for good) */
        json_t *val = typed_value(p, fn, key, v, vn);
        int bad_text = !val || json_object_set_new(args, key, val); /* takes val either way */
        free(key);
        if (bad_text) {
            *why = "a parameter name or value that is not UTF-8 text";
            goto bad;
        }
        s = close + 12;
    }
    int known;
    schema_of(p->tools, fn, NULL, &known);
    if (p->tools && !known) warn(p, "tool call: function '%s' is not among the tools", fn);
    char *arg_text;
    if (qmix_chat_json_dumps(args, &arg_text, NULL)) {
        p->oom = 1;
        *why = "out of memory";
        goto bad;
    }
    json_decref(args);
    if (p->n_calls == p->cap_calls) {
        size_t cap = p->cap_calls ? p->cap_calls * 2 : 4;
        qmix_tool_call *c = realloc(p->calls, cap * sizeof *c);
        if (!c) {
            p->oom = 1;
            free(fn);
            free(arg_text);
            *why = "out of memory";
            return -1;
        }
        p->calls = c;
        p->cap_calls = cap;
    }
    p->calls[p->n_calls++] = (qmix_tool_call){fn, arg_text};
    return 0;
bad:
    free(fn);
    json_decref(args);
    return -1;
}

/* A call body that did not parse: warn, keep the raw text as content. */
static void keep_raw(qmix_toolcall_parser *p, const char *body, size_t n, int closed,
                     const char *why)
{
    warn(p, "malformed tool call (%s)%s; its text is kept in the content", why,
         closed ? "" : ", truncated before </tool_call>");
    stream_put(p, &p->content, T_CALL, strlen(T_CALL));
    stream_put(p, &p->content, body, n);
    if (closed) stream_put(p, &p->content, T_ENDCALL, strlen(T_ENDCALL));
}

/* ---- the state machine ---- */

static void step(qmix_toolcall_parser *p)
{
    buf *b = &p->pend;
    for (;;) {
        if (p->state == S_REASON) {
            const char *at = b->n ? memmem(b->p, b->n, T_ENDTHINK, 8) : NULL;
            if (at) {
                stream_put(p, &p->reason, b->p, (size_t)(at - b->p));
                buf_consume(b, (size_t)(at - b->p) + 8);
                p->state = S_CONTENT;
                p->think_checked = 1;
                continue;
            }
            size_t keep = partial_suffix(b->p, b->n, T_ENDTHINK);
            stream_put(p, &p->reason, b->p, b->n - keep);
            buf_consume(b, b->n - keep);
            return;
        }
        if (p->state == S_CONTENT) {
            if (!p->think_checked) {
                size_t ws = 0;
                while (ws < b->n && is_ws(b->p[ws])) ws++;
                size_t rest = b->n - ws, k = strlen(T_THINK);
                if (rest >= k && !memcmp(b->p + ws, T_THINK, k)) {
                    buf_consume(b, ws + k);
                    p->state = S_REASON;
                    p->think_checked = 1;
                    continue;
                }
                if (rest < k && !memcmp(b->p + ws, T_THINK, rest)) return; /* undecided */
                p->think_checked = 1;
            }
            const char *at = b->n ? memmem(b->p, b->n, T_CALL, 11) : NULL;
            if (at) {
                stream_put(p, &p->content, b->p, (size_t)(at - b->p));
                buf_consume(b, (size_t)(at - b->p) + 11);
                p->state = S_CALL;
                p->scan_from = 0;
                continue;
            }
            size_t keep = partial_suffix(b->p, b->n, T_CALL);
            stream_put(p, &p->content, b->p, b->n - keep);
            buf_consume(b, b->n - keep);
            return;
        }
        /* S_CALL: the body ends at </tool_call>, or at a new <tool_call> (this one left open) */
        const char *from = b->p + p->scan_from, *end = b->p + b->n;
        const char *close = memmem(from, (size_t)(end - from), T_ENDCALL, 12);
        const char *reopen = memmem(from, (size_t)(end - from), T_CALL, 11);
        if (reopen && (!close || reopen < close)) {
            keep_raw(p, b->p, (size_t)(reopen - b->p), 0, "a new <tool_call> began inside it");
            buf_consume(b, (size_t)(reopen - b->p) + 11);
            p->scan_from = 0;
            continue;
        }
        if (close) {
            const char *why = NULL;
            size_t n = (size_t)(close - b->p);
            if (parse_call(p, b->p, n, &why)) keep_raw(p, b->p, n, 1, why);
            buf_consume(b, n + 12);
            p->state = S_CONTENT;
            continue;
        }
        p->scan_from = b->n > 11 ? b->n - 11 : 0;
        return;
    }
}

qmix_toolcall_parser *qmix_toolcall_parser_new(const json_t *tools, bool thinking_open)
{
    qmix_toolcall_parser *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    if (tools) p->tools = json_incref((json_t *)tools);
    p->state = thinking_open ? S_REASON : S_CONTENT;
    p->think_checked = thinking_open;
    if (buf_put(&p->pend, "", 0) || buf_put(&p->reason.text, "", 0) ||
        buf_put(&p->content.text, "", 0)) {
        qmix_toolcall_parser_free(p);
        return NULL;
    }
    return p;
}

void qmix_toolcall_parser_free(qmix_toolcall_parser *p)
{
    if (!p) return;
    json_decref(p->tools);
    free(p->pend.p);
    free(p->reason.text.p);
    free(p->reason.held.p);
    free(p->content.text.p);
    free(p->content.held.p);
    for (size_t i = 0; i < p->n_calls; i++) {
        free(p->calls[i].name);
        free(p->calls[i].arguments);
    }
    free(p->calls);
    for (size_t i = 0; i < p->n_warn; i++) free(p->warnings[i]);
    free(p->warnings);
    free(p);
}

int qmix_toolcall_feed(qmix_toolcall_parser *p, const char *text, size_t len)
{
    if (p->finished || p->oom) return -1;
    if (buf_put(&p->pend, text, len)) return -1;
    step(p);
    return p->oom ? -1 : 0;
}

int qmix_toolcall_finish(qmix_toolcall_parser *p)
{
    if (p->finished || p->oom) return -1;
    p->finished = 1;
    buf *b = &p->pend;
    if (p->state == S_REASON) {
        stream_put(p, &p->reason, b->p, b->n);
        warn(p, "reasoning was not closed by </think> (output truncated?)");
    } else if (p->state == S_CONTENT) {
        stream_put(p, &p->content, b->p, b->n);
    } else {
        /* A call cut off before </tool_call>: kept if its body is complete, else raw content. */
        const char *why = NULL;
        if (parse_call(p, b->p, b->n, &why)) keep_raw(p, b->p, b->n, 0, why);
        else warn(p, "tool call %s: no </tool_call> at the end of the output",
                  p->calls[p->n_calls - 1].name);
    }
    b->n = 0;
    p->reason.held.n = p->content.held.n = 0;
    return p->oom ? -1 : 0;
}

const char *qmix_toolcall_reasoning(const qmix_toolcall_parser *p, size_t *len)
{
    if (len) *len = p->reason.text.n;
    return p->reason.text.p;
}

const char *qmix_toolcall_content(const qmix_toolcall_parser *p, size_t *len)
{
    if (len) *len = p->content.text.n;
    return p->content.text.p;
}

size_t qmix_toolcall_count(const qmix_toolcall_parser *p) { return p->n_calls; }

const qmix_tool_call *qmix_toolcall_at(const qmix_toolcall_parser *p, size_t i)
{
    return i < p->n_calls ? &p->calls[i] : NULL;
}

size_t qmix_toolcall_warning_count(const qmix_toolcall_parser *p) { return p->n_warn; }

const char *qmix_toolcall_warning(const qmix_toolcall_parser *p, size_t i)
{
    return i < p->n_warn ? p->warnings[i] : NULL;
}

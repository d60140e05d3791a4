/* qmix serve, end to end: the real binary on a free loopback port with the tiny-a fixture, driven
 * by curl as any client would. Covers the endpoints, streaming (SSE), seeds, stop strings, usage,
 * error statuses, slots under concurrent streaming, prefix reuse, disconnects and shutdown. */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>

#include "serverutil.h"
#include "testutil.h"

#define MODEL "testdata/fixtures/tiny-a"

/* qmix serve on the tiny-a fixture (tests/serverutil.h) */
static void start(server *s, const char *const *extra) { tu_serve(s, MODEL, extra); }

typedef struct resp {
    int status;
    char *body;
} resp;

/* The shell command for one curl request; its body goes to *out_path. */
static void curl_cmd(server *s, const char *path, const char *body, const char *extra, char *cmd,
                     size_t cap, char *out_path, size_t out_cap)
{
    int k = s->n_files++;
    char req[1024];
    snprintf(req, sizeof req, "%s/req%d.json", s->dir, k);
    snprintf(out_path, out_cap, "%s/resp%d", s->dir, k);
    if (body) tu_write(req, body, strlen(body));
    snprintf(cmd, cap,
             "curl -s -N -o '%s' -w '%%{http_code}' %s%s%s %s 'http://127.0.0.1:%d%s'", out_path,
             body ? "-H 'Content-Type: application/json' --data-binary '@" : "",
             body ? req : "", body ? "'" : "", extra ? extra : "", s->port, path);
}

static resp http(server *s, const char *path, const char *body, const char *extra)
{
    char cmd[4096], out[1024];
    curl_cmd(s, path, body, extra, cmd, sizeof cmd, out, sizeof out);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    resp r = {0};
    ck_assert_int_eq(fscanf(p, "%d", &r.status), 1);
    pclose(p);
    FILE *f = fopen(out, "rb");
    if (f) {
        fclose(f);
        r.body = tu_read(out, NULL);
    } else {
        r.body = strdup("");
    }
    return r;
}

static json_t *parse(const char *text)
{
    json_error_t je;
    json_t *v = json_loads(text, JSON_ALLOW_NUL, &je);
    ck_assert_msg(v != NULL, "not JSON (%s): %s", je.text, text);
    return v;
}

static const char *str_at(json_t *v, const char *path) /* "choices.0.message.content" */
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *tok = strtok(buf, "."); tok && v; tok = strtok(NULL, "."))
        v = json_is_array(v) ? json_array_get(v, (size_t)atoi(tok)) : json_object_get(v, tok);
    return json_string_value(v);
}

static long long int_at(json_t *v, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *tok = strtok(buf, "."); tok && v; tok = strtok(NULL, "."))
        v = json_is_array(v) ? json_array_get(v, (size_t)atoi(tok)) : json_object_get(v, tok);
    ck_assert_msg(json_is_integer(v), "no integer at %s", path);
    return json_integer_value(v);
}

/* What a streamed response said, put together. */
typedef struct sse {
    char content[1 << 16], reasoning[1 << 16];
    char finish[32];
    int n_events, done, usage_completion, usage_prompt;
} sse;

static void parse_sse(const char *body, sse *out)
{
    memset(out, 0, sizeof *out);
    out->usage_completion = out->usage_prompt = -1;
    const char *line = body;
    while (*line) {
        const char *eol = strchr(line, '\n');
        size_t n = eol ? (size_t)(eol - line) : strlen(line);
        if (n) {
            ck_assert_msg(!strncmp(line, "data: ", 6), "not an SSE data line: %.*s", (int)n, line);
            ck_assert_msg(!out->done, "an event after [DONE]");
            char *data = strndup(line + 6, n - 6);
            if (!strcmp(data, "[DONE]")) {
                out->done = 1;
            } else {
                json_t *v = parse(data);
                out->n_events++;
                json_t *c = json_array_get(json_object_get(v, "choices"), 0);
                json_t *d = json_object_get(c, "delta");
                const char *t = json_string_value(json_object_get(d, "content"));
                if (t) strncat(out->content, t, sizeof out->content - strlen(out->content) - 1);
                t = json_string_value(json_object_get(d, "reasoning_content"));
                if (t) strncat(out->reasoning, t, sizeof out->reasoning - strlen(out->reasoning) - 1);
                t = json_string_value(json_object_get(c, "text")); /* completions */
                if (t) strncat(out->content, t, sizeof out->content - strlen(out->content) - 1);
                t = json_string_value(json_object_get(c, "finish_reason"));
                if (t) snprintf(out->finish, sizeof out->finish, "%s", t);
                json_t *u = json_object_get(v, "usage");
                if (json_is_object(u)) {
                    out->usage_completion = (int)int_at(u, "completion_tokens");
                    out->usage_prompt = (int)int_at(u, "prompt_tokens");
                }
                json_decref(v);
            }
            free(data);
        }
        line += n + (eol ? 1 : 0);
    }
}

/* A value from GET /metrics (Prometheus text): the line "NAME VALUE". */
static double metric(server *s, const char *name)
{
    resp r = http(s, "/metrics", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    size_t n = strlen(name);
    for (const char *line = r.body; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (!strncmp(line, name, n) && line[n] == ' ') {
            double v = atof(line + n + 1);
            free(r.body);
            return v;
        }
    ck_abort_msg("no metric %s in:\n%s", name, r.body);
    return 0;
}

static const char *hello(int stream, int seed, int max_tokens, char *buf, size_t cap)
{
    snprintf(buf, cap,
             "{\"model\": \"tiny-a\", \"messages\": [{\"role\": \"system\", \"content\": \"Be "
             "brief.\"}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
             "\"Hello\"}, {\"type\": \"text\", \"text\": \" there\"}]}], \"max_tokens\": %d, "
             "\"temperature\": 0.9, \"top_p\": 0.95, \"seed\": %d, \"stream\": %s, "
             "\"stream_options\": {\"include_usage\": true}, \"some_unknown_field\": 1}",
             max_tokens, seed, stream ? "true" : "false");
    return buf;
}

START_TEST(endpoints_and_chat)
{
    server s;
    start(&s, NULL);
    resp r = http(&s, "/health", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    json_t *v = parse(r.body);
    ck_assert_str_eq(str_at(v, "status"), "ok");
    ck_assert_int_eq(int_at(v, "slots_total"), 1);
    json_decref(v);
    free(r.body);

    r = http(&s, "/v1/models", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    v = parse(r.body);
    ck_assert_str_eq(str_at(v, "data.0.id"), "tiny-a");
    json_decref(v);
    free(r.body);

    char body[2048];
    r = http(&s, "/v1/chat/completions", hello(0, 7, 12, body, sizeof body), NULL);
    ck_assert_msg(r.status == 200, "status %d: %s", r.status, r.body);
    v = parse(r.body);
    ck_assert_str_eq(str_at(v, "object"), "chat.completion");
    ck_assert_str_eq(str_at(v, "choices.0.message.role"), "assistant");
    ck_assert_str_eq(str_at(v, "choices.0.finish_reason"), "length"); /* max_tokens reached */
    ck_assert_int_eq(int_at(v, "usage.completion_tokens"), 12);
    long long prompt = int_at(v, "usage.prompt_tokens");
    ck_assert_int_gt(prompt, 5);
    ck_assert_int_eq(int_at(v, "usage.total_tokens"), prompt + 12);
    /* thinking is on by default: the random model's words are all reasoning */
    const char *reasoning = str_at(v, "choices.0.message.reasoning_content");
    ck_assert_ptr_nonnull(reasoning);
    ck_assert_int_gt(strlen(reasoning), 0);
    char *first = strdup(reasoning);
    json_decref(v);
    free(r.body);

    /* the same seed gives the same text, a different one another */
    r = http(&s, "/v1/chat/completions", hello(0, 7, 12, body, sizeof body), NULL);
    v = parse(r.body);
    ck_assert_str_eq(str_at(v, "choices.0.message.reasoning_content"), first);
    json_decref(v);
    free(r.body);
    r = http(&s, "/v1/chat/completions", hello(0, 8, 12, body, sizeof body), NULL);
    v = parse(r.body);
    ck_assert_str_ne(str_at(v, "choices.0.message.reasoning_content"), first);
    json_decref(v);
    free(r.body);

    /* streaming: the same text in deltas, a finish chunk, the usage chunk, then [DONE] */
    r = http(&s, "/v1/chat/completions", hello(1, 7, 12, body, sizeof body), NULL);
    ck_assert_int_eq(r.status, 200);
    sse *e = malloc(sizeof *e);
    parse_sse(r.body, e);
    ck_assert(e->done);
    ck_assert_int_gt(e->n_events, 3);
    ck_assert_str_eq(e->reasoning, first);
    ck_assert_str_eq(e->finish, "length");
    ck_assert_int_eq(e->usage_completion, 12);
    ck_assert_int_eq(e->usage_prompt, prompt);
    free(r.body);

    /* thinking off: the answer is content, no reasoning */
    r = http(&s, "/v1/chat/completions",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 8, "
             "\"seed\": 1, \"chat_template_kwargs\": {\"enable_thinking\": false}}", NULL);
    ck_assert_int_eq(r.status, 200);
    v = parse(r.body);
    ck_assert_ptr_null(str_at(v, "choices.0.message.reasoning_content"));
    ck_assert_int_gt(strlen(str_at(v, "choices.0.message.content")), 0);
    json_decref(v);
    free(r.body);

    /* a tool round trip in the history renders and runs (arguments as a JSON string) */
    r = http(&s, "/v1/chat/completions",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Paris?\"},"
             " {\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"c1\", "
             "\"type\": \"function\", \"function\": {\"name\": \"weather\", \"arguments\": "
             "\"{\\\"city\\\": \\\"Paris\\\"}\"}}]}, {\"role\": \"tool\", \"tool_call_id\": "
             "\"c1\", \"content\": \"sunny\"}], \"tools\": [{\"type\": \"function\", "
             "\"function\": {\"name\": \"weather\", \"parameters\": {\"type\": \"object\", "
             "\"properties\": {\"city\": {\"type\": \"string\"}}}}}], \"tool_choice\": \"auto\", "
             "\"max_tokens\": 4, \"seed\": 1}", NULL);
    ck_assert_msg(r.status == 200, "status %d: %s", r.status, r.body);
    free(r.body);
    free(first);
    free(e);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

START_TEST(completions_and_stop_strings)
{
    server s;
    start(&s, NULL);
    resp r = http(&s, "/v1/completions",
                  "{\"prompt\": \"The cat sat\", \"max_tokens\": 40, \"temperature\": 0}", NULL);
    ck_assert_int_eq(r.status, 200);
    json_t *v = parse(r.body);
    ck_assert_str_eq(str_at(v, "object"), "text_completion");
    char *text = strdup(str_at(v, "choices.0.text"));
    ck_assert_int_eq(int_at(v, "usage.completion_tokens"), 40);
    json_decref(v);
    free(r.body);
    /* a stop string from the middle of that text: the answer ends just before it */
    size_t at = 0, len = strlen(text);
    for (size_t i = 4; i + 3 <= len; i++)
        if ((unsigned char)text[i] < 0x80 && (unsigned char)text[i + 1] < 0x80 &&
            (unsigned char)text[i + 2] < 0x80 && text[i] != '"' && text[i] != '\\' &&
            text[i + 1] != '"' && text[i + 1] != '\\' && (unsigned char)text[i] >= 0x20 &&
            (unsigned char)text[i + 1] >= 0x20) {
            at = i;
            break;
        }
    ck_assert_msg(at > 0, "no ASCII pair in %s", text);
    char stop_s[3] = {text[at], text[at + 1], 0};
    size_t first = (size_t)(strstr(text, stop_s) - text);
    char body[512];
    snprintf(body, sizeof body, "{\"prompt\": \"The cat sat\", \"max_tokens\": 40, "
             "\"temperature\": 0, \"stop\": [\"\\u0001never\", \"%s\"]}", stop_s);
    r = http(&s, "/v1/completions", body, NULL);
    ck_assert_int_eq(r.status, 200);
    v = parse(r.body);
    ck_assert_str_eq(str_at(v, "choices.0.finish_reason"), "stop");
    ck_assert_int_eq(strlen(str_at(v, "choices.0.text")), first);
    ck_assert(!strncmp(str_at(v, "choices.0.text"), text, first));
    json_decref(v);
    free(r.body);
    /* streamed, with a plain-string stop: the same */
    snprintf(body, sizeof body, "{\"prompt\": \"The cat sat\", \"max_tokens\": 40, "
             "\"temperature\": 0, \"stop\": \"%s\", \"stream\": true}", stop_s);
    r = http(&s, "/v1/completions", body, NULL);
    sse *e = malloc(sizeof *e);
    parse_sse(r.body, e);
    ck_assert(e->done);
    ck_assert_str_eq(e->finish, "stop");
    ck_assert_int_eq(strlen(e->content), first);
    free(r.body);
    free(e);
    free(text);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

static void expect_error(server *s, const char *path, const char *body, const char *extra,
                         int status, const char *needle)
{
    resp r = http(s, path, body, extra);
    ck_assert_msg(r.status == status, "%s: status %d, expected %d: %s", body ? body : path,
                  r.status, status, r.body);
    json_t *v = parse(r.body);
    const char *msg = str_at(v, "error.message");
    ck_assert_msg(msg && strstr(msg, needle), "error message '%s' lacks '%s'", msg, needle);
    ck_assert_ptr_nonnull(str_at(v, "error.type"));
    json_decref(v);
    free(r.body);
}

START_TEST(errors)
{
    server s;
    const char *extra[] = {"--ctx", "64", "--max-body", "4096", "--api-key", "sekrit", NULL};
    start(&s, extra);
    const char *auth = "-H 'Authorization: Bearer sekrit'";
    const char *ok = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], "
                     "\"max_tokens\": 2}";
    expect_error(&s, "/v1/chat/completions", ok, NULL, 401, "API key");
    expect_error(&s, "/v1/chat/completions", ok, "-H 'Authorization: Bearer wrong'", 401,
                 "API key");
    expect_error(&s, "/v1/models", NULL, NULL, 401, "API key");
    resp r = http(&s, "/health", NULL, NULL); /* health checks need no key */
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    r = http(&s, "/v1/chat/completions", ok, auth);
    ck_assert_msg(r.status == 200, "status %d: %s", r.status, r.body);
    free(r.body);

    expect_error(&s, "/v1/chat/completions", "{\"messages\": [", auth, 400, "not valid JSON");
    expect_error(&s, "/v1/chat/completions", "[1, 2]", auth, 400, "JSON object");
    expect_error(&s, "/v1/chat/completions",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], "
                 "\"temperature\": \"hot\"}", auth, 400, "temperature");
    expect_error(&s, "/v1/chat/completions",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 0}",
                 auth, 400, "max_tokens");
    expect_error(&s, "/v1/chat/completions",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"n\": 2}", auth,
                 400, "'n'");
    expect_error(&s, "/v1/chat/completions",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"stop\": 5}", auth,
                 400, "stop");
    expect_error(&s, "/v1/chat/completions", "{\"messages\": \"Hi\"}", auth, 400, "messages");
    /* a developer message without content (renaming its role once freed the role's string
     * before it was read again: found by fuzz/fuzz_api.c) */
    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"developer\"}]}",
                 auth, 400, "has no 'content'");
    expect_error(&s, "/v1/chat/completions",
                 "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", "
                 "\"image_url\": {\"url\": \"data:image/png;base64,AAAA\"}}]}]}", auth, 400,
                 "not supported");
    expect_error(&s, "/v1/chat/completions",
                 "{\"model\": \"gpt-4\", \"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}]}", auth, 404, "gpt-4");
    /* 64 tokens of context: a long prompt does not fit */
    char body[4096] = "{\"messages\": [{\"role\": \"user\", \"content\": \"";
    for (int i = 0; i < 100; i++) strcat(body, "word ");
    strcat(body, "\"}]}");
    expect_error(&s, "/v1/chat/completions", body, auth, 400, "context");
    expect_error(&s, "/v1/completions", "{\"prompt\": 42}", auth, 400, "prompt");
    expect_error(&s, "/v1/nothing", "{}", auth, 404, "endpoint");
    /* over --max-body: 413, whether announced by Content-Length or sent chunked */
    char *big = malloc(10000);
    memset(big, ' ', 9999);
    big[0] = '{';
    big[9998] = '}';
    big[9999] = 0;
    expect_error(&s, "/v1/chat/completions", big, auth, 413, "size limit");
    char chunked[256];
    snprintf(chunked, sizeof chunked, "%s -H 'Transfer-Encoding: chunked'", auth);
    expect_error(&s, "/v1/chat/completions", big, chunked, 413, "size limit");
    free(big);
    /* and the server is still fine */
    r = http(&s, "/v1/chat/completions", ok, auth);
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* Four clients stream at once through two slots (two wait their turn); each gets exactly what
 * it gets alone. */
START_TEST(concurrent_streams)
{
    server s;
    const char *extra[] = {"--parallel", "2", NULL};
    start(&s, extra);
    enum { N = 4 };
    char body[2048], alone[N][1 << 16];
    for (int i = 0; i < N; i++) {
        resp r = http(&s, "/v1/chat/completions", hello(1, 100 + i, 24, body, sizeof body), NULL);
        ck_assert_int_eq(r.status, 200);
        sse *e = malloc(sizeof *e);
        parse_sse(r.body, e);
        ck_assert(e->done);
        memcpy(alone[i], e->reasoning, sizeof alone[i]);
        free(e);
        free(r.body);
    }
    char script[16384] = "", out[N][1024];
    for (int i = 0; i < N; i++) {
        char cmd[4096];
        curl_cmd(&s, "/v1/chat/completions", hello(1, 100 + i, 24, body, sizeof body), NULL,
                 cmd, sizeof cmd, out[i], sizeof out[i]);
        strcat(script, cmd);
        strcat(script, " >/dev/null & ");
    }
    strcat(script, "wait");
    ck_assert_int_eq(system(script), 0);
    for (int i = 0; i < N; i++) {
        char *text = tu_read(out[i], NULL);
        sse *e = malloc(sizeof *e);
        parse_sse(text, e);
        ck_assert_msg(e->done, "client %d: no [DONE]", i);
        ck_assert_msg(!strcmp(e->reasoning, alone[i]), "client %d: '%s' != '%s' alone", i,
                      e->reasoning, alone[i]);
        free(e);
        free(text);
    }
    resp r = http(&s, "/health", NULL, NULL);
    json_t *v = parse(r.body);
    ck_assert_int_eq(int_at(v, "requests"), 2 * N);
    ck_assert_int_eq(int_at(v, "slots_busy"), 0);
    json_decref(v);
    free(r.body);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* Client i of the batching test: its own prompt length, seed and answer length, so the eight
 * streams start, decode and leave at different steps. */
static const char *client_body(int i, char *buf, size_t cap)
{
    char words[512] = "";
    for (int w = 0; w <= i * 3; w++) strcat(words, " and more");
    snprintf(buf, cap,
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello%s\"}], \"max_tokens\": %d, "
             "\"temperature\": 0.9, \"seed\": %d, \"stream\": true, \"ignore_eos\": true, "
             "\"stream_options\": {\"include_usage\": true}}", words, 12 + 5 * i, 500 + i);
    return buf;
}

/* Eight clients stream at once through eight slots decoded together (continuous batching):
 * each gets exactly the tokens it gets alone with the same seed. A prompt is prefilled 5 tokens
 * per step while others decode (alone: at once), so chunked prefill is covered too. */
START_TEST(eight_batched_streams)
{
    server s;
    const char *extra[] = {"--parallel", "8", "--prefix-cache", "0", "--prefill-chunk", "5", NULL};
    start(&s, extra);
    enum { N = 8 };
    char body[2048];
    static char alone[N][1 << 17];
    int alone_tokens[N];
    for (int i = 0; i < N; i++) {
        resp r = http(&s, "/v1/chat/completions", client_body(i, body, sizeof body), NULL);
        ck_assert_int_eq(r.status, 200);
        sse *e = malloc(sizeof *e);
        parse_sse(r.body, e);
        ck_assert(e->done);
        ck_assert_int_eq(e->usage_completion, 12 + 5 * i);
        snprintf(alone[i], sizeof alone[i], "%s|%s", e->reasoning, e->content);
        alone_tokens[i] = e->usage_completion;
        free(e);
        free(r.body);
    }
    char script[32768] = "", out[N][1024];
    for (int i = 0; i < N; i++) {
        char cmd[4096];
        curl_cmd(&s, "/v1/chat/completions", client_body(i, body, sizeof body), NULL, cmd,
                 sizeof cmd, out[i], sizeof out[i]);
        strcat(script, cmd);
        strcat(script, " >/dev/null & ");
    }
    strcat(script, "wait");
    ck_assert_int_eq(system(script), 0);
    for (int i = 0; i < N; i++) {
        char *text = tu_read(out[i], NULL);
        static char got[1 << 17];
        sse *e = malloc(sizeof *e);
        parse_sse(text, e);
        ck_assert_msg(e->done, "client %d: no [DONE]", i);
        snprintf(got, sizeof got, "%s|%s", e->reasoning, e->content);
        ck_assert_msg(!strcmp(got, alone[i]), "client %d: '%s' != '%s' alone", i, got, alone[i]);
        ck_assert_int_eq(e->usage_completion, alone_tokens[i]);
        free(e);
        free(text);
    }
    /* how much the streams overlapped depends on timing: reported, not asserted */
    double steps = metric(&s, "qmix_batch_steps_total"), rows = metric(&s, "qmix_batch_rows_total");
    printf("info: 8 streams: %.0f tokens in %.0f steps (%.2f per step)\n", rows, steps,
           rows / steps);
    ck_assert_int_eq((long long)metric(&s, "qmix_slots_active"), 0);
    ck_assert_int_eq((long long)metric(&s, "qmix_requests_total"), 2 * N);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* A prompt that extends what a slot holds re-processes only the new tokens, and the answer is
 * what a cold server gives. */
START_TEST(prefix_reuse)
{
    server s;
    start(&s, NULL);
    resp r = http(&s, "/v1/completions",
                  "{\"prompt\": \"The cat sat on the mat.\", \"max_tokens\": 1, \"temperature\": 0}",
                  NULL);
    json_t *v = parse(r.body);
    long long first_prompt = int_at(v, "usage.prompt_tokens");
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), 0);
    json_decref(v);
    free(r.body);
    const char *second = "{\"prompt\": \"The cat sat on the mat. Then it slept\", "
                         "\"max_tokens\": 16, \"temperature\": 0}";
    r = http(&s, "/v1/completions", second, NULL);
    v = parse(r.body);
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), first_prompt);
    char *warm = strdup(str_at(v, "choices.0.text"));
    json_decref(v);
    free(r.body);
    r = http(&s, "/health", NULL, NULL);
    v = parse(r.body);
    ck_assert_int_eq(int_at(v, "prefix_cache.hits"), 1);
    ck_assert_int_eq(int_at(v, "prefix_cache.misses"), 1);
    ck_assert_int_eq(int_at(v, "prefix_cache.reused_tokens"), first_prompt);
    json_decref(v);
    free(r.body);
    ck_assert_int_eq(stop(&s), 0);

    start(&s, NULL);
    r = http(&s, "/v1/completions", second, NULL);
    v = parse(r.body);
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), 0);
    ck_assert_str_eq(str_at(v, "choices.0.text"), warm);
    json_decref(v);
    free(r.body);
    free(warm);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

static long long health_int(server *s, const char *path)
{
    resp r = http(s, "/health", NULL, NULL);
    json_t *v = parse(r.body);
    long long n = int_at(v, path);
    json_decref(v);
    free(r.body);
    return n;
}

/* A client that hangs up mid-stream frees its slot; with the slot busy and no queue a request
 * gets 503 + Retry-After; SIGTERM during a generation ends it cleanly and exits 0. */
START_TEST(disconnect_busy_and_shutdown)
{
    server s;
    const char *extra[] = {"--ctx", "40000", "--queue", "0", NULL};
    start(&s, extra);
    /* ignore_eos: runs to max_tokens, far longer than the client stays */
    const char *longreq = "{\"prompt\": \"Once\", \"max_tokens\": 39000, \"stream\": true, "
                          "\"ignore_eos\": true, \"seed\": 1}";
    resp r = http(&s, "/v1/completions", longreq, "--max-time 1");
    free(r.body);
    double end = now() + 5;
    while (now() < end && health_int(&s, "slots_busy")) usleep(50000);
    ck_assert_msg(health_int(&s, "slots_busy") == 0, "the slot is still busy after the client left");
    long long generated = health_int(&s, "prefix_cache.generated_tokens");
    ck_assert_int_gt(generated, 0);
    ck_assert_int_lt(generated, 39000);

    char cmd[4096], out[1024];
    curl_cmd(&s, "/v1/completions",
             "{\"prompt\": \"Once\", \"max_tokens\": 39000, \"ignore_eos\": true}", NULL, cmd,
             sizeof cmd, out, sizeof out);
    FILE *p = popen(cmd, "r");
    end = now() + 5;
    while (now() < end && !health_int(&s, "slots_busy")) usleep(20000);
    char headers[1200];
    snprintf(headers, sizeof headers, "-D '%s/h503'", s.dir);
    expect_error(&s, "/v1/completions", "{\"prompt\": \"Hi\", \"max_tokens\": 1}", headers, 503,
                 "busy");
    char path[1100];
    snprintf(path, sizeof path, "%s/h503", s.dir);
    char *h = tu_read(path, NULL);
    ck_assert_msg(strcasestr(h, "Retry-After: 1") != NULL, "no Retry-After in:\n%s", h);
    free(h);
    /* shutdown while that request runs: it is answered with an error that says it was cut
     * short (not a normal stop), the server exits 0 */
    ck_assert_int_eq(terminate(&s), 0);
    int status = 0;
    ck_assert_int_eq(fscanf(p, "%d", &status), 1);
    ck_assert_int_eq(status, 503);
    pclose(p);
    char *body = tu_read(out, NULL);
    json_t *v = parse(body);
    ck_assert_str_eq(str_at(v, "error.code"), "cancelled");
    ck_assert_ptr_nonnull(strstr(str_at(v, "error.message"), "shutting down"));
    json_decref(v);
    free(body);
    tu_rmdir(s.dir);
}
END_TEST

/* The second turn of a chat resumes from the snapshot taken where the first turn's answer
 * began: the shared conversation is not processed again, and the answer is the cold one. */
static char *turn_body(const char *answer)
{
    json_t *msgs = json_pack("[{s:s, s:s}]", "role", "user", "content", "Hi");
    if (answer) {
        json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "assistant", "content", answer));
        json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "user", "content", "More"));
    }
    json_t *v = json_pack("{s:o, s:i, s:i, s:{s:b}}", "messages", msgs, "max_tokens", 6,
                          "temperature", 0, "chat_template_kwargs", "enable_thinking", 0);
    char *body = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    return body;
}

START_TEST(multi_turn_snapshot)
{
    server s;
    start(&s, NULL);
    char *body = turn_body(NULL);
    resp r = http(&s, "/v1/chat/completions", body, NULL);
    free(body);
    json_t *v = parse(r.body);
    char *answer = strdup(str_at(v, "choices.0.message.content"));
    long long p1 = int_at(v, "usage.prompt_tokens");
    json_decref(v);
    free(r.body);
    body = turn_body(answer);
    r = http(&s, "/v1/chat/completions", body, NULL);
    v = parse(r.body);
    long long cached = int_at(v, "usage.prompt_tokens_details.cached_tokens");
    /* the first turn up to its answer: everything but the generation prompt */
    ck_assert_int_gt(cached, 0);
    ck_assert_int_lt(cached, p1);
    char *warm = strdup(str_at(v, "choices.0.message.content"));
    json_decref(v);
    free(r.body);
    ck_assert_int_eq(health_int(&s, "prefix_cache.snapshot_hits"), 1);
    ck_assert_int_eq(health_int(&s, "prefix_cache.reused_tokens"), cached);
    ck_assert_int_eq(stop(&s), 0);

    start(&s, NULL);
    r = http(&s, "/v1/chat/completions", body, NULL);
    v = parse(r.body);
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), 0);
    ck_assert_str_eq(str_at(v, "choices.0.message.content"), warm);
    json_decref(v);
    free(r.body);
    free(body);
    free(warm);
    free(answer);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* The prefix cache is shared and bounded: a prompt that extends an earlier one resumes from that
 * prompt's snapshot though the slot has since run something else, and answers as a cold server
 * does; with room for one snapshot the older one is evicted and the same prompt is a miss. */
static void completion(server *s, const char *prompt, int max_tokens, long long *prompt_tokens,
                       long long *cached, char **text)
{
    char body[1024];
    snprintf(body, sizeof body, "{\"prompt\": \"%s\", \"max_tokens\": %d, \"temperature\": 0}",
             prompt, max_tokens);
    resp r = http(s, "/v1/completions", body, NULL);
    ck_assert_msg(r.status == 200, "status %d: %s", r.status, r.body);
    json_t *v = parse(r.body);
    if (prompt_tokens) *prompt_tokens = int_at(v, "usage.prompt_tokens");
    if (cached) *cached = int_at(v, "usage.prompt_tokens_details.cached_tokens");
    if (text) *text = strdup(str_at(v, "choices.0.text"));
    json_decref(v);
    free(r.body);
}

START_TEST(prefix_cache_lru)
{
    const char *p1 = "The cat sat on the mat and looked at the door.";
    const char *p2 = "A completely different story about ships.";
    const char *p3 = "The cat sat on the mat and looked at the door. Then it slept";
    server s;
    start(&s, NULL);
    long long n1, n3, cached;
    char *warm, *cold;
    completion(&s, p1, 3, &n1, &cached, NULL);
    ck_assert_int_eq(cached, 0);
    completion(&s, p2, 3, NULL, &cached, NULL);
    ck_assert_int_eq(cached, 0);
    completion(&s, p3, 8, &n3, &cached, &warm);
    ck_assert_int_eq(cached, n1); /* only the new tokens were processed */
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_snapshot_hits_total"), 1);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_hits_total"), 1);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_misses_total"), 2);
    ck_assert_int_eq((long long)metric(&s, "qmix_prompt_tokens_cached_total"), n1);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_entries"), 3);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_evictions_total"), 0);
    ck_assert_int_gt((long long)metric(&s, "qmix_prefix_cache_bytes"), 0);
    ck_assert_int_eq(stop(&s), 0);

    start(&s, NULL); /* cold: the same answer */
    completion(&s, p3, 8, NULL, &cached, &cold);
    ck_assert_int_eq(cached, 0);
    ck_assert_str_eq(warm, cold);
    ck_assert_int_eq(stop(&s), 0);

    /* a snapshot of tiny-a is ~58 KB of recurrent state + 2 KB per token of KV: about 100 KB
     * for these prompts, so 150K holds one */
    const char *small[] = {"--prefix-cache", "150K", NULL};
    start(&s, small);
    completion(&s, p1, 3, NULL, NULL, NULL);
    completion(&s, p2, 3, NULL, NULL, NULL);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_evictions_total"), 1);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_entries"), 1);
    ck_assert_int_le((long long)metric(&s, "qmix_prefix_cache_bytes"), 150 * 1024);
    completion(&s, p3, 8, NULL, &cached, NULL);
    ck_assert_int_eq(cached, 0);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_snapshot_hits_total"), 0);
    ck_assert_int_eq(stop(&s), 0);

    tu_expect("serve " MODEL " --prefix-cache 5X", 2, "not a size");
    tu_expect("serve " MODEL " --prefill-chunk 0", 2, "prefill-chunk");
    const char *off[] = {"--prefix-cache", "0", NULL};
    start(&s, off);
    completion(&s, p1, 3, NULL, NULL, NULL);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_entries"), 0);
    ck_assert_int_eq(stop(&s), 0);
    free(warm);
    free(cold);
}
END_TEST

/* With a quantized KV cache the prefix cache keeps snapshots in the cache's own form: a resumed
 * prompt answers as a cold server with the same cache does, and the snapshots' bytes shrink by
 * exactly the KV rows' saving (tiny-a: 512 K/V values per token, 2048 bytes in f32, 544 in q8_0,
 * 288 in q4_0; the recurrent state is float32 in every case). */
START_TEST(prefix_cache_quantized)
{
    const char *p1 = "The cat sat on the mat and looked at the door.";
    const char *p2 = "A completely different story about ships.";
    const char *p3 = "The cat sat on the mat and looked at the door. Then it slept";
    static const char *types[] = {"f32", "q8_0", "q4_0"};
    static const long long row_bytes[] = {2048, 544, 288};
    long long bytes[3];
    for (int t = 0; t < 3; t++) {
        const char *extra[] = {"--kv-type", types[t], NULL};
        server s;
        long long n1, cached;
        char *warm, *cold;
        start(&s, extra);
        completion(&s, p1, 3, &n1, &cached, NULL);
        completion(&s, p2, 3, NULL, &cached, NULL);
        completion(&s, p3, 8, NULL, &cached, &warm);
        ck_assert_int_eq(cached, n1);
        ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_snapshot_hits_total"), 1);
        ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_entries"), 3);
        bytes[t] = (long long)metric(&s, "qmix_prefix_cache_bytes");
        ck_assert_int_eq(stop(&s), 0);
        start(&s, extra);
        completion(&s, p3, 8, NULL, &cached, &cold);
        ck_assert_int_eq(cached, 0);
        ck_assert_msg(!strcmp(warm, cold), "%s: resumed '%s', cold '%s'", types[t], warm, cold);
        ck_assert_int_eq(stop(&s), 0);
        free(warm);
        free(cold);
    }
    /* the same entries (same token counts) in each: bytes differ by tokens x row saving */
    long long tokens = (bytes[0] - bytes[2]) / (row_bytes[0] - row_bytes[2]);
    ck_assert_int_gt(tokens, 0);
    ck_assert_int_eq(bytes[0] - bytes[2], tokens * (row_bytes[0] - row_bytes[2]));
    ck_assert_int_eq(bytes[0] - bytes[1], tokens * (row_bytes[0] - row_bytes[1]));
}
END_TEST

/* Two conversations with the same system prompt: the second resumes from the snapshot at the
 * end of the system prompt (its second <|im_start|>) and answers as a cold server does. */
static char *system_chat(const char *user)
{
    json_t *v = json_pack("{s:[{s:s, s:s}, {s:s, s:s}], s:i, s:i, s:{s:b}}", "messages", "role",
                          "system", "content", "You are a helpful assistant who answers briefly "
                          "and precisely, in plain words.", "role", "user", "content", user,
                          "max_tokens", 6, "temperature", 0, "chat_template_kwargs",
                          "enable_thinking", 0);
    char *body = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    return body;
}

START_TEST(shared_system_prompt)
{
    server s;
    start(&s, NULL);
    char *a = system_chat("What is a cat?"), *b = system_chat("Name a river.");
    resp r = http(&s, "/v1/chat/completions", a, NULL);
    json_t *v = parse(r.body);
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), 0);
    json_decref(v);
    free(r.body);
    r = http(&s, "/v1/chat/completions", b, NULL);
    v = parse(r.body);
    long long cached = int_at(v, "usage.prompt_tokens_details.cached_tokens");
    long long prompt = int_at(v, "usage.prompt_tokens");
    ck_assert_int_gt(cached, 10); /* the system turn */
    ck_assert_int_lt(cached, prompt - 5); /* not the user's */
    char *warm = strdup(str_at(v, "choices.0.message.content"));
    json_decref(v);
    free(r.body);
    ck_assert_int_eq((long long)metric(&s, "qmix_prefix_cache_snapshot_hits_total"), 1);
    ck_assert_int_eq(stop(&s), 0);

    start(&s, NULL);
    r = http(&s, "/v1/chat/completions", b, NULL);
    v = parse(r.body);
    ck_assert_int_eq(int_at(v, "usage.prompt_tokens_details.cached_tokens"), 0);
    ck_assert_str_eq(str_at(v, "choices.0.message.content"), warm);
    json_decref(v);
    free(r.body);
    ck_assert_int_eq(stop(&s), 0);
    free(warm);
    free(a);
    free(b);
}
END_TEST

/* GET /metrics: Prometheus text, every line a comment or "name value"; only GET. */
START_TEST(metrics_endpoint)
{
    server s;
    const char *extra[] = {"--api-key", "k", "--parallel", "3", NULL};
    start(&s, extra);
    resp r;
    char headers[1200];
    snprintf(headers, sizeof headers, "-D '%s/hm'", s.dir);
    r = http(&s, "/metrics", NULL, headers);
    char path[1100];
    snprintf(path, sizeof path, "%s/hm", s.dir);
    char *h = tu_read(path, NULL);
    ck_assert_msg(strcasestr(h, "Content-Type: text/plain") != NULL, "headers:\n%s", h);
    free(h);
    for (const char *line = r.body; *line;) {
        const char *eol = strchr(line, '\n');
        ck_assert_ptr_nonnull(eol);
        if (*line != '#') {
            char name[128];
            double v;
            ck_assert_msg(sscanf(line, "%127s %lf", name, &v) == 2, "bad line: %.*s",
                          (int)(eol - line), line);
            ck_assert_msg(!strncmp(name, "qmix_", 5), "name %s", name);
        }
        line = eol + 1;
    }
    free(r.body);
    ck_assert_int_eq((long long)metric(&s, "qmix_slots_total"), 3);
    ck_assert_int_eq((long long)metric(&s, "qmix_requests_total"), 0);
    r = http(&s, "/v1/completions", "{\"prompt\": \"Hi\", \"max_tokens\": 4, \"ignore_eos\": true}",
             "-H 'Authorization: Bearer k'");
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    ck_assert_int_eq((long long)metric(&s, "qmix_requests_total"), 1);
    ck_assert_int_eq((long long)metric(&s, "qmix_generation_tokens_total"), 4);
    ck_assert_int_ge((long long)metric(&s, "qmix_batch_steps_total"), 4);
    ck_assert(metric(&s, "qmix_generation_tokens_per_second") > 0);
    expect_error(&s, "/metrics", "{}", NULL, 405, "GET");
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* logprobs: chat's {"content": [{token, logprob, bytes, top_logprobs}]} and the completions'
 * parallel arrays, streamed and not; greedy picks the top alternative; bad values are 400s. */
START_TEST(logprobs)
{
    server s;
    start(&s, NULL);
    const char *chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 6, "
                       "\"temperature\": 0, \"logprobs\": true, \"top_logprobs\": 3, "
                       "\"ignore_eos\": true%s}";
    char body[1024];
    snprintf(body, sizeof body, chat, "");
    resp r = http(&s, "/v1/chat/completions", body, NULL);
    ck_assert_int_eq(r.status, 200);
    json_t *v = parse(r.body);
    json_t *content = json_object_get(json_object_get(json_array_get(json_object_get(v, "choices"), 0),
                                                      "logprobs"), "content");
    ck_assert_int_eq(json_array_size(content), 6);
    size_t i;
    json_t *e;
    json_array_foreach(content, i, e) {
        double lp = json_real_value(json_object_get(e, "logprob"));
        json_t *top = json_object_get(e, "top_logprobs");
        ck_assert_int_eq(json_array_size(top), 3);
        double t0 = json_real_value(json_object_get(json_array_get(top, 0), "logprob"));
        double t1 = json_real_value(json_object_get(json_array_get(top, 1), "logprob"));
        double t2 = json_real_value(json_object_get(json_array_get(top, 2), "logprob"));
        ck_assert(lp <= 0 && t0 >= t1 && t1 >= t2);
        /* greedy: the chosen token is the most likely one */
        ck_assert_str_eq(str_at(e, "token"), str_at(json_array_get(top, 0), "token"));
        ck_assert(fabs(lp - t0) < 1e-9);
        ck_assert(json_is_array(json_object_get(e, "bytes")));
    }
    char *whole = json_dumps(content, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(v);
    free(r.body);

    /* streamed: the chunks' entries put together are the same */
    snprintf(body, sizeof body, chat, ", \"stream\": true");
    r = http(&s, "/v1/chat/completions", body, NULL);
    json_t *streamed = json_array();
    for (char *line = strtok(r.body, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "data: {", 7)) continue;
        json_t *c = parse(line + 6);
        json_t *lp = json_object_get(json_array_get(json_object_get(c, "choices"), 0), "logprobs");
        json_array_extend(streamed, json_object_get(lp, "content"));
        json_decref(c);
    }
    char *joined = json_dumps(streamed, JSON_COMPACT | JSON_SORT_KEYS);
    ck_assert_str_eq(joined, whole);
    free(joined);
    free(whole);
    json_decref(streamed);
    free(r.body);

    r = http(&s, "/v1/completions", "{\"prompt\": \"Once upon\", \"max_tokens\": 5, \"temperature\": 0, "
             "\"logprobs\": 2, \"ignore_eos\": true}", NULL);
    v = parse(r.body);
    json_t *lps = json_object_get(json_array_get(json_object_get(v, "choices"), 0), "logprobs");
    ck_assert_int_eq(json_array_size(json_object_get(lps, "tokens")), 5);
    ck_assert_int_eq(json_array_size(json_object_get(lps, "token_logprobs")), 5);
    json_t *offs = json_object_get(lps, "text_offset");
    size_t text_len = strlen(str_at(v, "choices.0.text")), concat = 0;
    for (size_t k = 0; k < 5; k++) {
        json_t *tops = json_array_get(json_object_get(lps, "top_logprobs"), k);
        ck_assert_int_eq(json_object_size(tops), 2);
        double best = -1e30, chosen = json_real_value(json_array_get(json_object_get(lps, "token_logprobs"), k));
        const char *key;
        json_t *val;
        json_object_foreach(tops, key, val) if (json_real_value(val) > best) best = json_real_value(val);
        ck_assert(fabs(best - chosen) < 1e-9);
        ck_assert_int_eq(json_integer_value(json_array_get(offs, k)), (long long)concat);
        concat += strlen(json_string_value(json_array_get(json_object_get(lps, "tokens"), k)));
    }
    ck_assert_uint_ge(concat, text_len > 0 ? 1 : 0);
    json_decref(v);
    free(r.body);

    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}], \"top_logprobs\": 2}", NULL, 400, "logprobs");
    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}], \"logprobs\": true, \"top_logprobs\": 21}", NULL, 400, "top_logprobs");
    expect_error(&s, "/v1/completions", "{\"prompt\": \"Hi\", \"logprobs\": true}", NULL, 400,
                 "logprobs");
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* tool_choice: "none" takes the tools out of the prompt; a named function is forced by opening
 * its call after the generation prompt; forcing without tools or naming an unknown function is
 * a 400. */
static long long tool_prompt_tokens(server *s, const char *choice, char **answer)
{
    char body[2048];
    snprintf(body, sizeof body,
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Paris?\"}], "
             "\"max_tokens\": 8, \"temperature\": 0, \"chat_template_kwargs\": "
             "{\"enable_thinking\": false}, \"tools\": [{\"type\": \"function\", \"function\": "
             "{\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": "
             "{\"city\": {\"type\": \"string\"}}}}}], \"tool_choice\": %s}", choice);
    resp r = http(s, "/v1/chat/completions", body, NULL);
    ck_assert_msg(r.status == 200, "%s: status %d: %s", choice, r.status, r.body);
    json_t *v = parse(r.body);
    long long n = int_at(v, "usage.prompt_tokens");
    if (answer) {
        const char *name = str_at(v, "choices.0.message.tool_calls.0.function.name");
        const char *content = str_at(v, "choices.0.message.content");
        *answer = strdup(name ? name : content ? content : "");
    }
    json_decref(v);
    free(r.body);
    return n;
}

START_TEST(tool_choice)
{
    server s;
    start(&s, NULL);
    long long with_auto = tool_prompt_tokens(&s, "\"auto\"", NULL);
    long long with_none = tool_prompt_tokens(&s, "\"none\"", NULL);
    ck_assert_int_lt(with_none + 20, with_auto); /* the tool definitions are gone */
    char *answer;
    long long forced = tool_prompt_tokens(
        &s, "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}", &answer);
    ck_assert_int_gt(forced, with_auto); /* the call's opening follows the generation prompt */
    /* the tiny model does not finish the call well: either it parses, or its raw text is kept */
    ck_assert_msg(!strcmp(answer, "get_weather") ||
                  !strncmp(answer, "<tool_call>\n<function=get_weather>", 34),
                  "answer: %s", answer);
    free(answer);
    long long required = tool_prompt_tokens(&s, "\"required\"", NULL);
    ck_assert_int_gt(required, with_auto);
    ck_assert_int_lt(required, forced);
    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}], \"tool_choice\": \"required\"}", NULL, 400, "no 'tools'");
    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], "
                 "\"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"g\"}}}",
                 NULL, 400, "not one of");
    expect_error(&s, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": "
                 "\"Hi\"}], \"tool_choice\": \"sometimes\"}", NULL, 400, "tool_choice");
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* The official OpenAI client library (npm `openai`, tools/check-openai.sh) against the server:
 * streamed and non-streamed answers agree, thinking on/off, a tool round trip, completions, and
 * errors arrive as the client's typed errors with their statuses. Skipped (with an info line)
 * where node/npm or the package cannot be had. */
START_TEST(openai_client)
{
    server s;
    const char *extra[] = {"--api-key", "k1", "--ctx", "2048", NULL};
    start(&s, extra);
    char cmd[4096], out_path[1100], err_path[1100];
    snprintf(out_path, sizeof out_path, "%s/openai.json", s.dir);
    snprintf(err_path, sizeof err_path, "%s/openai.err", s.dir);
    snprintf(cmd, sizeof cmd, "tools/check-openai.sh http://127.0.0.1:%d/v1 k1 >'%s' 2>'%s'",
             s.port, out_path, err_path);
    int rc = system(cmd);
    int code = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    char *out = tu_read(out_path, NULL), *err = tu_read(err_path, NULL);
    if (code == 77) {
        printf("info: skipped the OpenAI client test: %s", err);
        free(out);
        free(err);
        ck_assert_int_eq(stop(&s), 0);
        return;
    }
    ck_assert_msg(code == 0, "tools/check-openai.sh failed (%d): %s", code, err);
    json_t *v = parse(out);
    ck_assert_str_eq(str_at(v, "models.0"), "tiny-a");
    ck_assert_str_eq(str_at(v, "chat.reasoning"), str_at(v, "stream.reasoning"));
    ck_assert_str_eq(str_at(v, "chat.content"), str_at(v, "stream.content"));
    ck_assert_int_gt(strlen(str_at(v, "chat.reasoning")), 0);
    ck_assert_str_eq(str_at(v, "chat.finish_reason"), "length");
    ck_assert_str_eq(str_at(v, "stream.finish_reason"), "length");
    ck_assert_int_eq(int_at(v, "chat.usage.completion_tokens"), 10);
    ck_assert_int_eq(int_at(v, "stream.usage.completion_tokens"), 10);
    ck_assert_int_eq(int_at(v, "stream.usage.prompt_tokens"), int_at(v, "chat.usage.prompt_tokens"));
    ck_assert_ptr_null(str_at(v, "no_think.reasoning"));
    ck_assert_int_gt(strlen(str_at(v, "no_think.content")), 0);
    ck_assert_ptr_nonnull(str_at(v, "tool_round_trip.finish_reason"));
    ck_assert_int_gt(int_at(v, "tool_round_trip.usage.prompt_tokens"), 20);
    ck_assert_int_eq(int_at(v, "completion.usage.completion_tokens"), 5);
    ck_assert_int_eq(int_at(v, "errors.bad_key"), 401);
    ck_assert_int_eq(int_at(v, "errors.unknown_model"), 404);
    ck_assert_int_eq(int_at(v, "errors.bad_type"), 400);
    ck_assert_int_eq(int_at(v, "errors.context_overflow"), 400);
    printf("info: OpenAI client (npm openai): chat, stream, tools, completions, errors agree\n");
    json_decref(v);
    free(out);
    free(err);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* A TCP connection to the server from source address src (NULL: any), or -1. */
static int connect_from(server *s, const char *src)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET};
    if (src) {
        inet_pton(AF_INET, src, &a.sin_addr);
        if (bind(fd, (struct sockaddr *)&a, sizeof a)) {
            close(fd);
            return -1;
        }
    }
    a.sin_port = htons((uint16_t)s->port);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Half a request's headers, then silence: what a slowloris client holds a connection with. */
static const char half_request[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nCont";

/* 1 if the server closed the connection within timeout_ms (it reads end-of-file or a reset). */
static int closed_within(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) <= 0) return 0;
    char c;
    return recv(fd, &c, 1, MSG_DONTWAIT) <= 0;
}

/* 300 idle connections that sent half a header do not stop /health and a chat request. */
START_TEST(half_open_lockout)
{
    server s;
    const char *extra[] = {"--ctx", "256", NULL};
    start(&s, extra);
    enum { N = 300 };
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_from(&s, NULL);
        ck_assert_msg(fds[i] >= 0, "connection %d: %s", i, strerror(errno));
        ck_assert_int_eq(send(fds[i], half_request, sizeof half_request - 1, MSG_NOSIGNAL),
                         (ssize_t)(sizeof half_request - 1));
    }
    usleep(200000); /* every one of them accepted and waiting */
    resp r = http(&s, "/health", NULL, "--max-time 5");
    ck_assert_msg(r.status == 200, "/health under 300 half-open connections: %d", r.status);
    free(r.body);
    char buf[1024];
    r = http(&s, "/v1/chat/completions", hello(0, 1, 4, buf, sizeof buf), "--max-time 10");
    ck_assert_msg(r.status == 200, "chat under 300 half-open connections: %d %s", r.status, r.body);
    free(r.body);
    int still_open = 0;
    for (int i = 0; i < N; i++) still_open += !closed_within(fds[i], 0);
    ck_assert_int_eq(still_open, N); /* answered beside them, not after closing them */
    for (int i = 0; i < N; i++) close(fds[i]);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* A silent incomplete request is closed after --idle-timeout; one address past
 * --max-conn-per-ip is refused while 127.0.0.1 still gets through. */
START_TEST(idle_timeout_and_per_address_limit)
{
    server s;
    const char *extra[] = {"--idle-timeout", "1", "--max-conn-per-ip", "4", NULL};
    start(&s, extra);
    int fds[5];
    for (int i = 0; i < 5; i++) {
        fds[i] = connect_from(&s, "127.0.0.2");
        ck_assert_int_ge(fds[i], 0);
        send(fds[i], half_request, sizeof half_request - 1, MSG_NOSIGNAL);
    }
    ck_assert_msg(closed_within(fds[4], 500), "a fifth connection from one address was kept");
    for (int i = 0; i < 4; i++)
        ck_assert_msg(!closed_within(fds[i], 0), "connection %d closed before its timeout", i);
    resp r = http(&s, "/health", NULL, "--max-time 5");
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    double t0 = now();
    for (int i = 0; i < 4; i++) ck_assert_msg(closed_within(fds[i], 5000), "not timed out");
    ck_assert_double_lt(now() - t0, 4.5);
    for (int i = 0; i < 5; i++) close(fds[i]);
    /* the address's count went back down: it may connect again */
    int fd = connect_from(&s, "127.0.0.2");
    ck_assert_int_ge(fd, 0);
    ck_assert_msg(!closed_within(fd, 300), "refused after its connections closed");
    close(fd);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* What a browser page can send: a text/plain or untyped POST (no preflight), a foreign Host
 * (DNS rebinding), a foreign Origin; and CORS when --cors allows one origin. */
START_TEST(browser_requests)
{
    server s;
    const char *extra[] = {"--cors", "http://app.example", NULL};
    start(&s, extra);
    char buf[1024];
    const char *body = hello(0, 1, 2, buf, sizeof buf);
    char req[1100], cmd[4096];
    snprintf(req, sizeof req, "%s/plain.json", s.dir);
    tu_write(req, body, strlen(body));
    static const char *const refused[][2] = {
        {"-H 'Content-Type: text/plain'", "415"},
        {"-H 'Content-Type: application/x-www-form-urlencoded'", "415"},
        {"-H 'Content-Type:'", "415"}, /* curl then sends none */
        {"-H 'Content-Type: application/json' -H 'Host: attacker.example:80'", "403"},
        {"-H 'Content-Type: application/json' -H 'Origin: http://other.example'", "403"},
        {"-H 'Content-Type: application/json; charset=utf-8'", "200"},
        {"-H 'Content-Type: Application/JSON' -H 'Origin: http://app.example'", "200"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        snprintf(cmd, sizeof cmd, "curl -s -o /dev/null -w '%%{http_code}' %s --data-binary '@%s' "
                 "'http://127.0.0.1:%d/v1/chat/completions'", refused[i][0], req, s.port);
        FILE *p = popen(cmd, "r");
        char code[16] = "";
        ck_assert_int_eq(fscanf(p, "%15s", code), 1);
        pclose(p);
        ck_assert_msg(!strcmp(code, refused[i][1]), "%s: %s, expected %s", refused[i][0], code,
                      refused[i][1]);
    }
    /* Host naming this machine is fine */
    resp r = http(&s, "/health", NULL, "-H 'Host: localhost'");
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    /* the preflight: 204 with the CORS headers for the allowed origin, 403 for another */
    char hdr[1100];
    snprintf(hdr, sizeof hdr, "-X OPTIONS -H 'Origin: http://app.example' -H "
             "'Access-Control-Request-Method: POST' -D '%s/pre'", s.dir);
    r = http(&s, "/v1/chat/completions", NULL, hdr);
    ck_assert_int_eq(r.status, 204);
    free(r.body);
    snprintf(hdr, sizeof hdr, "%s/pre", s.dir);
    char *h = tu_read(hdr, NULL);
    ck_assert_msg(strcasestr(h, "Access-Control-Allow-Origin: http://app.example"), "%s", h);
    ck_assert_msg(strcasestr(h, "Access-Control-Allow-Headers:"), "%s", h);
    free(h);
    expect_error(&s, "/v1/chat/completions", NULL,
                 "-X OPTIONS -H 'Origin: http://other.example'", 403, "cross-origin");
    ck_assert_int_eq(stop(&s), 0);

    /* without --cors every cross-origin request is refused, preflights included */
    start(&s, NULL);
    expect_error(&s, "/v1/chat/completions", NULL, "-X OPTIONS -H 'Origin: http://app.example'",
                 403, "--cors");
    expect_error(&s, "/v1/chat/completions", body, "-H 'Origin: http://app.example'", 403,
                 "cross-origin");
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

/* Keys: an empty one is refused at start (flag, file or environment); the scheme is
 * case-insensitive; a key file works. */
START_TEST(api_keys)
{
    tu_expect("serve " MODEL " --port 0 --api-key ''", 2, "empty");
    setenv("QMIX_API_KEY", "", 1);
    tu_expect("serve " MODEL " --port 0", 2, "QMIX_API_KEY");
    unsetenv("QMIX_API_KEY");
    char *dir = tu_tmpdir();
    char path[1100], args[1400];
    snprintf(path, sizeof path, "%s/empty-key", dir);
    tu_write(path, "\n", 1);
    snprintf(args, sizeof args, "serve " MODEL " --port 0 --api-key-file '%s'", path);
    tu_expect(args, 2, "empty");
    snprintf(args, sizeof args, "serve " MODEL " --port 0 --api-key-file '%s/none'", dir);
    tu_expect(args, 2, "No such file");

    snprintf(path, sizeof path, "%s/key", dir);
    tu_write(path, "s3cret-key\n", 11);
    server s;
    const char *extra[] = {"--api-key-file", path, NULL};
    start(&s, extra);
    resp r = http(&s, "/v1/models", NULL, "-H 'Authorization: bearer s3cret-key'");
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    r = http(&s, "/v1/models", NULL, "-H 'Authorization: BEARER   s3cret-key'");
    ck_assert_int_eq(r.status, 200);
    free(r.body);
    expect_error(&s, "/v1/models", NULL, "-H 'Authorization: Bearer s3cret-ke'", 401, "API key");
    expect_error(&s, "/v1/models", NULL, "-H 'Authorization: Bearer s3cret-key2'", 401,
                 "API key");
    expect_error(&s, "/v1/models", NULL, "-H 'Authorization: Basic s3cret-key'", 401, "API key");
    expect_error(&s, "/v1/models", NULL, "-H 'Authorization: Bearer '", 401, "API key");
    ck_assert_int_eq(stop(&s), 0);
    tu_rmdir(dir);
}
END_TEST

/* A stream cut short by shutdown ends with an error event that says so, not a finish_reason. */
START_TEST(stream_cut_by_shutdown)
{
    server s;
    const char *extra[] = {"--ctx", "40000", NULL};
    start(&s, extra);
    char cmd[4096], out[1024];
    curl_cmd(&s, "/v1/chat/completions",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 39000, "
             "\"ignore_eos\": true, \"stream\": true}", NULL, cmd, sizeof cmd, out, sizeof out);
    FILE *p = popen(cmd, "r");
    double end = now() + 5;
    while (now() < end && !health_int(&s, "slots_busy")) usleep(20000);
    usleep(200000); /* some chunks out */
    ck_assert_int_eq(terminate(&s), 0);
    int status = 0;
    ck_assert_int_eq(fscanf(p, "%d", &status), 1);
    pclose(p);
    ck_assert_int_eq(status, 200);
    char *body = tu_read(out, NULL);
    ck_assert_msg(strstr(body, "\"code\":\"cancelled\"") && strstr(body, "shutting down"), "%s",
                  body);
    ck_assert_msg(!strstr(body, "\"finish_reason\":\"stop\"") &&
                      !strstr(body, "\"finish_reason\":\"length\""), "%s", body);
    ck_assert_msg(strstr(body, "data: [DONE]"), "%s", body);
    free(body);
    tu_rmdir(s.dir);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("server");
    TCase *tc = tcase_create("http");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, endpoints_and_chat);
    tcase_add_test(tc, completions_and_stop_strings);
    tcase_add_test(tc, errors);
    tcase_add_test(tc, concurrent_streams);
    tcase_add_test(tc, eight_batched_streams);
    tcase_add_test(tc, prefix_reuse);
    tcase_add_test(tc, disconnect_busy_and_shutdown);
    tcase_add_test(tc, multi_turn_snapshot);
    tcase_add_test(tc, prefix_cache_lru);
    tcase_add_test(tc, prefix_cache_quantized);
    tcase_add_test(tc, shared_system_prompt);
    tcase_add_test(tc, metrics_endpoint);
    tcase_add_test(tc, logprobs);
    tcase_add_test(tc, tool_choice);
    tcase_add_test(tc, openai_client);
    tcase_add_test(tc, half_open_lockout);
    tcase_add_test(tc, idle_timeout_and_per_address_limit);
    tcase_add_test(tc, browser_requests);
    tcase_add_test(tc, api_keys);
    tcase_add_test(tc, stream_cut_by_shutdown);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

/* `qmix serve` with images on tiny-vl-a, driven by curl and the official OpenAI client: an
 * image_url data: URL answers as `qmix generate --image` does (greedy), a repeated request resumes
 * from the prefix cache with the same answer, a different image with the same text is not served
 * from the first image's cache, two images at once (batched) answer as alone, several images per
 * request, and refused requests (remote URL, malformed data: URL, too many images) get 400s. */
#include <signal.h>
#include <sys/prctl.h>
#include <time.h>

#include "serverutil.h"
#include "testutil.h"

#define MODEL "testdata/fixtures/tiny-vl-a"
#define TEXT "Describe this image in one sentence."

/* qmix serve on the tiny-vl-a fixture (tests/serverutil.h) */
static void start(server *s, const char *const *extra) { tu_serve(s, MODEL, extra); }

static char *b64_file(const char *path)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n;
    uint8_t *p = tu_read(path, &n);
    char *o = malloc(4 * (n / 3 + 1) + 1), *q = o;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        *q++ = a[v >> 18];
        *q++ = a[(v >> 12) & 63];
        *q++ = i + 1 < n ? a[(v >> 6) & 63] : '=';
        *q++ = i + 2 < n ? a[v & 63] : '=';
    }
    *q = 0;
    free(p);
    return o;
}

/* A chat request body: the image URLs (NULL-terminated) then TEXT; greedy, 8 tokens. */
static char *body_of(const char *const *urls)
{
    size_t cap = 1024;
    for (int i = 0; urls[i]; i++) cap += strlen(urls[i]) + 96;
    char *b = malloc(cap);
    size_t at = (size_t)snprintf(b, cap, "{\"model\": \"tiny-vl-a\", \"max_tokens\": 8, "
                                 "\"temperature\": 0, \"ignore_eos\": true, \"messages\": "
                                 "[{\"role\": \"user\", \"content\": [");
    for (int i = 0; urls[i]; i++)
        at += (size_t)snprintf(b + at, cap - at, "{\"type\": \"image_url\", \"image_url\": "
                               "{\"url\": \"%s\"}}, ", urls[i]);
    snprintf(b + at, cap - at, "{\"type\": \"text\", \"text\": \"" TEXT "\"}]}]}");
    return b;
}

/* Starts a curl POST of body in the background (or waits for it: wait = 1); returns its pid. */
static pid_t post(const server *s, const char *body, const char *name, int wait)
{
    char body_path[1200], cmd[4096];
    snprintf(body_path, sizeof body_path, "%s/%s.req", s->dir, name);
    tu_write(body_path, body, strlen(body));
    snprintf(cmd, sizeof cmd, "curl -s -o '%s/%s.out' -w '%%{http_code}' -H 'Content-Type: "
             "application/json' --data-binary @'%s' http://127.0.0.1:%d/v1/chat/completions "
             ">'%s/%s.code'", s->dir, name, body_path, s->port, s->dir, name);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (!pid) _exit(system(cmd) == 0 ? 0 : 1);
    if (wait) {
        int st;
        waitpid(pid, &st, 0);
        ck_assert_msg(WIFEXITED(st) && !WEXITSTATUS(st), "curl failed");
    }
    return pid;
}

/* The response of post(name): HTTP status and body. */
static json_t *result(const server *s, const char *name, int *status)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/%s.code", s->dir, name);
    char *code = tu_read(path, NULL);
    *status = atoi(code);
    free(code);
    snprintf(path, sizeof path, "%s/%s.out", s->dir, name);
    char *text = tu_read(path, NULL);
    json_error_t je;
    json_t *v = json_loads(text, 0, &je);
    ck_assert_msg(v != NULL, "not JSON: %s", text);
    free(text);
    return v;
}

/* reasoning_content + content of a chat answer, whitespace at both ends dropped. */
static char *answer_text(json_t *v)
{
    json_t *msg = json_object_get(json_object_get(json_array_get(json_object_get(v, "choices"), 0),
                                                  "message"), "content");
    json_t *rsn = json_object_get(json_object_get(json_array_get(json_object_get(v, "choices"), 0),
                                                  "message"), "reasoning_content");
    const char *a = json_string_value(rsn) ? json_string_value(rsn) : "";
    const char *b = json_string_value(msg) ? json_string_value(msg) : "";
    char *out = malloc(strlen(a) + strlen(b) + 1);
    strcpy(out, a);
    strcat(out, b);
    return out;
}

static void trim(char *s)
{
    size_t n = strlen(s), start = 0;
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\n')) s[--n] = 0;
    while (s[start] == ' ' || s[start] == '\n') start++;
    memmove(s, s + start, n - start + 1);
}

/* What `qmix generate --image ...` answers (greedy, 8 tokens, eos ignored). */
static char *cli_answer(const char *images)
{
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "generate " MODEL " %s -p '" TEXT "' -n 8 --temp 0 "
                                "--ignore-eos 2>/dev/null", images), 0);
    trim(out);
    return out;
}

static int cached_tokens(json_t *v)
{
    return (int)json_integer_value(json_object_get(
        json_object_get(json_object_get(v, "usage"), "prompt_tokens_details"), "cached_tokens"));
}

START_TEST(images_over_http)
{
    server s;
    const char *extra[] = {"--parallel", "2", "--ctx", "512", "--max-images", "2", NULL};
    start(&s, extra);
    char *a64 = b64_file(MODEL "/images/img_150x200.png"), *b64 = b64_file(MODEL "/images/img_64x96.png");
    size_t la = strlen(a64) + 64, lb = strlen(b64) + 64;
    char *url_a = malloc(la), *url_b = malloc(lb);
    snprintf(url_a, la, "data:image/png;base64,%s", a64);
    snprintf(url_b, lb, "data:image/png;base64,%s", b64);
    char *want_a = cli_answer("--image " MODEL "/images/img_150x200.png");
    char *want_b = cli_answer("--image " MODEL "/images/img_64x96.png");
    char *want_ab = cli_answer("--image " MODEL "/images/img_150x200.png --image " MODEL
                               "/images/img_64x96.png");
    int status;

    /* cold, then resumed from the prefix cache */
    const char *only_a[] = {url_a, NULL}, *only_b[] = {url_b, NULL}, *both[] = {url_a, url_b, NULL};
    char *body_a = body_of(only_a), *body_b = body_of(only_b), *body_ab = body_of(both);
    for (int round = 0; round < 2; round++) {
        post(&s, body_a, "a", 1);
        json_t *v = result(&s, "a", &status);
        ck_assert_int_eq(status, 200);
        char *got = answer_text(v);
        trim(got);
        ck_assert_str_eq(got, want_a);
        ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(v, "usage"),
                                                            "prompt_tokens")), 77);
        if (round) ck_assert_int_gt(cached_tokens(v), 6); /* resumed past the image */
        free(got);
        json_decref(v);
    }
    /* the same text with another image: nothing past the first image row is reused */
    post(&s, body_b, "b", 1);
    json_t *v = result(&s, "b", &status);
    ck_assert_int_eq(status, 200);
    char *got = answer_text(v);
    trim(got);
    ck_assert_str_eq(got, want_b);
    ck_assert_int_le(cached_tokens(v), 5);
    free(got);
    json_decref(v);

    /* both at once (one batch), and two images in one request */
    pid_t p1 = post(&s, body_b, "b2", 0), p2 = post(&s, body_ab, "ab", 0);
    int st;
    waitpid(p1, &st, 0);
    waitpid(p2, &st, 0);
    static const char *const names[2] = {"b2", "ab"};
    const char *wants[2] = {want_b, want_ab};
    for (int k = 0; k < 2; k++) {
        v = result(&s, names[k], &status);
        ck_assert_int_eq(status, 200);
        got = answer_text(v);
        trim(got);
        ck_assert_str_eq(got, wants[k]);
        free(got);
        json_decref(v);
    }

    /* refused */
    const char *three[] = {url_b, url_b, url_b, NULL}, *remote[] = {"https://example.com/a.png", NULL},
               *malformed[] = {"data:image/png;base64,%%%", NULL}, *text_only[] = {NULL};
    const char *const *bad[3] = {three, remote, malformed};
    static const char *const why[3] = {"too many images", "data: URL", "invalid base64"};
    for (int k = 0; k < 3; k++) {
        char *body = body_of(bad[k]);
        post(&s, body, "bad", 1);
        v = result(&s, "bad", &status);
        ck_assert_int_eq(status, 400);
        const char *msg = json_string_value(json_object_get(json_object_get(v, "error"), "message"));
        ck_assert_msg(msg && strstr(msg, why[k]), "no '%s' in %s", why[k], msg ? msg : "(null)");
        json_decref(v);
        free(body);
    }
    char *body = body_of(text_only); /* and a text-only request still works */
    post(&s, body, "t", 1);
    v = result(&s, "t", &status);
    ck_assert_int_eq(status, 200);
    json_decref(v);
    free(body);

    ck_assert_int_eq(stop(&s), 0);
    free(a64), free(b64), free(url_a), free(url_b), free(want_a), free(want_b), free(want_ab);
    free(body_a), free(body_b), free(body_ab);
}
END_TEST

/* The official OpenAI client (npm openai) sending an image as a data: URL. Skipped where node,
 * npm or the package cannot be had. */
START_TEST(openai_client_image)
{
    server s;
    const char *extra[] = {"--api-key", "k1", "--ctx", "512", NULL};
    start(&s, extra);
    char cmd[4096], out_path[1100], err_path[1100];
    snprintf(out_path, sizeof out_path, "%s/openai.json", s.dir);
    snprintf(err_path, sizeof err_path, "%s/openai.err", s.dir);
    snprintf(cmd, sizeof cmd, "QMIX_OPENAI_SCRIPT=tools/ref/openai_vision.mjs tools/check-openai.sh "
             "http://127.0.0.1:%d/v1 k1 " MODEL "/images/img_150x200.png >'%s' 2>'%s'", s.port,
             out_path, err_path);
    int rc = system(cmd);
    int code = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    char *out = tu_read(out_path, NULL), *err = tu_read(err_path, NULL);
    if (code == 77) {
        printf("info: skipped the OpenAI client image test: %s", err);
    } else {
        ck_assert_msg(code == 0, "openai_vision.mjs failed (%d): %s", code, err);
        json_t *v = tu_json(out);
        char *want = cli_answer("--image " MODEL "/images/img_150x200.png");
        const char *r = json_string_value(json_object_get(v, "reasoning"));
        const char *c = json_string_value(json_object_get(v, "content"));
        char *got = malloc(strlen(r ? r : "") + strlen(c ? c : "") + 1);
        strcpy(got, r ? r : "");
        strcat(got, c ? c : "");
        trim(got);
        ck_assert_str_eq(got, want);
        ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(v, "usage"),
                                                            "prompt_tokens")), 77);
        ck_assert_int_eq(json_integer_value(json_object_get(v, "remote")), 400);
        printf("info: OpenAI client (npm openai): image as a data: URL answered as the CLI does\n");
        free(want);
        free(got);
        json_decref(v);
    }
    free(out);
    free(err);
    ck_assert_int_eq(stop(&s), 0);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("vision_server");
    TCase *tc = tcase_create("serve");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, images_over_http);
    tcase_add_test(tc, openai_client_image);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

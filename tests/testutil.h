/* Shared by the Check test suites: each test_*.c defines its suite and ends with TU_MAIN(). Tests
 * run from the repository root (testdata/ relative paths); QMIX_BIN names the built CLI. */
#ifndef QMIX_TESTUTIL_H
#define QMIX_TESTUTIL_H

#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* QMIX_TEST=NAME runs only the tests whose name contains NAME (Check itself selects suites and
 * test cases, CK_RUN_SUITE / CK_RUN_CASE, but not single tests). */
static inline int tu_selected(const TTest *t)
{
    const char *want = getenv("QMIX_TEST");
    return !want || !*want || strstr(t->name, want) != NULL;
}
#undef tcase_add_test
#define tcase_add_test(tc, tf)                                                                     \
    do {                                                                                           \
        if (tu_selected(tf)) _tcase_add_test((tc), (tf), 0, 0, 0, 1);                              \
    } while (0)
#undef tcase_add_loop_test
#define tcase_add_loop_test(tc, tf, s, e)                                                          \
    do {                                                                                           \
        if (tu_selected(tf)) _tcase_add_test((tc), (tf), 0, 0, (s), (e));                          \
    } while (0)

/* The checkpoints the model-level suites run on: every fixture (a directory of testdata/fixtures
 * with a config.json), then the demo model. Fills dirs, returns how many (at most max). */
static inline int tu_model_dirs(char (*dirs)[320], int max)
{
    int n = 0;
    DIR *d = opendir("testdata/fixtures");
    struct dirent *e;
    while (d && (e = readdir(d)) && n < max - 1) {
        char path[600];
        struct stat st;
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "testdata/fixtures/%s/config.json", e->d_name);
        if (stat(path, &st)) continue;
        snprintf(dirs[n++], 320, "testdata/fixtures/%s", e->d_name);
    }
    if (d) closedir(d);
    snprintf(dirs[n++], 320, "testdata/demo");
    return n;
}

/* Reads a whole binary file; returns a malloc'd buffer (NUL-terminated) and its size. */
static inline void *tu_read(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_int_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = 0;
    fclose(f);
    if (size) *size = (size_t)n;
    return buf;
}

static inline void tu_write(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot create %s", path);
    ck_assert_int_eq(fwrite(data, 1, size, f), size);
    ck_assert_int_eq(fclose(f), 0);
}

/* A fresh directory under $TMPDIR (or /tmp); the caller removes it with tu_rmdir. */
static inline char *tu_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/qmix-test-XXXXXX", base && *base ? base : "/tmp");
    char *dir = mkdtemp(tmpl);
    ck_assert_ptr_nonnull(dir);
    return strdup(dir);
}

static inline void tu_rmdir(char *dir)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
    free(dir);
}

/* The CLI binary to run (QMIX_BIN, default build/qmix). */
static inline const char *tu_qmix_bin(void)
{
    const char *bin = getenv("QMIX_BIN");
    return bin && *bin ? bin : "build/qmix";
}

/* What a CLI run printed and how it ended. */
typedef struct tu_run_result {
    int status; /* exit code, or -1 if it did not exit normally */
    char *out, *err;
} tu_run_result;

/* Runs `$QMIX_BIN args` through the shell (args are trusted test strings), capturing output. */
static inline tu_run_result tu_run(const char *args)
{
    char *dir = tu_tmpdir();
    char cmd[8192], out_path[1024], err_path[1024];
    snprintf(out_path, sizeof out_path, "%s/stdout", dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", dir);
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s' 2>'%s'", tu_qmix_bin(), args, out_path, err_path);
    int rc = system(cmd);
    tu_run_result r = {.status = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1};
    r.out = tu_read(out_path, NULL);
    r.err = tu_read(err_path, NULL);
    tu_rmdir(dir);
    return r;
}

static inline void tu_run_free(tu_run_result *r)
{
    free(r->out);
    free(r->err);
}

/* Runs `$QMIX_BIN args` and checks its exit status and that needle (if non-NULL) appears on
 * stdout or stderr. */
static inline void tu_expect(const char *args, int status, const char *needle)
{
    tu_run_result r = tu_run(args);
    ck_assert_msg(r.status == status, "qmix %s: exit %d, expected %d\n%s%s", args, r.status,
                  status, r.out, r.err);
    if (needle)
        ck_assert_msg(strstr(r.out, needle) || strstr(r.err, needle), "qmix %s: no '%s' in\n%s%s",
                      args, needle, r.out, r.err);
    tu_run_free(&r);
}

/* Runs `$QMIX_BIN` with printf-style arguments; *out (if non-NULL) gets its stdout (malloc'd,
 * the caller frees it). Returns the exit status (-1 if it did not exit normally). */
static inline int tu_run_out(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline int tu_run_out(char **out, const char *fmt, ...)
{
    char args[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    tu_run_result r = tu_run(args);
    if (out) *out = r.out;
    else free(r.out);
    free(r.err);
    return r.status;
}

/* The "mean" of `qmix kld ... --json` run with printf-style arguments (which must include
 * --json); fails the test if the command fails or prints no mean. */
static inline double tu_kld_mean(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses JSON text, failing the test (with the text) if it is not JSON. */
static inline json_t *tu_json(const char *text)
{
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    ck_assert_msg(j != NULL, "bad JSON (%s): %.300s", je.text, text);
    return j;
}

static inline double tu_kld_mean(const char *fmt, ...)
{
    char args[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    char *out = NULL;
    ck_assert_msg(tu_run_out(&out, "%s", args) == 0, "qmix %s failed", args);
    json_t *j = tu_json(out);
    json_t *mean = json_object_get(j, "mean");
    ck_assert_msg(json_is_number(mean), "qmix %s: no mean in %.300s", args, out);
    double v = json_number_value(mean);
    json_decref(j);
    free(out);
    return v;
}

/* Token ids from a file of whitespace-separated integers (a fixture's golden/tokens.txt). */
static inline int32_t *tu_read_ids(const char *path, int *n)
{
    char *text = tu_read(path, NULL), *p = text, *end;
    size_t cap = 4096;
    int32_t *ids = malloc(cap * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    int k = 0;
    for (;;) {
        while (*p && (*p < '0' || *p > '9')) p++;
        if (!*p) break;
        if ((size_t)k == cap) {
            ids = realloc(ids, (cap *= 2) * sizeof *ids);
            ck_assert_ptr_nonnull(ids);
        }
        ids[k++] = (int32_t)strtol(p, &end, 10);
        p = end;
    }
    free(text);
    *n = k;
    return ids;
}

/* The numerical proofs on the trained demo model (quantize it several ways, measure KLD on its
 * held-out text) take minutes under the sanitizers and run no code the fixture tests do not: the
 * sanitizer pass (`make SAN=1 test` sets QMIX_TEST_LIGHT=1) skips them, the plain pass runs them. */
static inline int tu_light_skip(const char *what)
{
    const char *v = getenv("QMIX_TEST_LIGHT");
    if (!v || !*v || !strcmp(v, "0")) return 0;
    printf("info: %s: skipped in the sanitizer pass (runs in the plain one)\n", what);
    return 1;
}

/* A fixed-seed PRNG (splitmix64) for test data: same inputs on every run. */
static uint64_t tu_rng_state;

static inline void tu_rng_seed(uint64_t seed) { tu_rng_state = seed; }

static inline uint64_t tu_rng_u64(void)
{
    uint64_t z = (tu_rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline float tu_frand(void) /* uniform in [-1, 1) */
{
    return (float)((double)(tu_rng_u64() >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

static inline uint32_t tu_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float tu_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define TU_MAIN(make_suite)                                                                      \
    int main(void)                                                                               \
    {                                                                                            \
        SRunner *runner = srunner_create(make_suite());                                          \
        srunner_run_all(runner, CK_NORMAL);                                                      \
        int failed = srunner_ntests_failed(runner);                                              \
        srunner_free(runner);                                                                    \
        return failed ? EXIT_FAILURE : EXIT_SUCCESS;                                             \
    }

#endif

/* Golden logits: every fixture under testdata/fixtures/ (a directory with golden/tokens.txt)
 * against the logits an independent implementation computed (see the fixtures' README.md):
 * prefill, token-by-token decode and the greedy continuation, with 1 and 2 threads (bitwise the
 * same), prefill in uneven pieces, reset, and every ISA this CPU has through the CLI. */
#include <dirent.h>
#include <math.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "kernels/kernels.h"
#include "qmix.h"
#include "testutil.h"

/* Passing ck_assert_* calls each cost a write(2) to the parent; loops use this instead. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

#define FIXTURES_DIR "testdata/fixtures"
#define TOL 1e-3       /* max |Δlogit| against the goldens (golden/README.md) */
#define SPLIT_TOL 1e-4 /* prefill in pieces against one prefill */
#define MAX_FIXTURES 64

static char fixtures[MAX_FIXTURES][320];
static int n_fixtures;

static int cmp_str(const void *a, const void *b) { return strcmp(a, b); }

/* Every directory under testdata/fixtures/ holding golden/tokens.txt, sorted by name. */
static void discover_fixtures(void)
{
    DIR *d = opendir(FIXTURES_DIR);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && n_fixtures < MAX_FIXTURES) {
        if (e->d_name[0] == '.') continue;
        char path[600];
        struct stat st;
        snprintf(path, sizeof path, FIXTURES_DIR "/%s/golden/tokens.txt", e->d_name);
        if (stat(path, &st) || !S_ISREG(st.st_mode)) continue;
        snprintf(fixtures[n_fixtures++], sizeof fixtures[0], FIXTURES_DIR "/%s", e->d_name);
    }
    closedir(d);
    qsort(fixtures, (size_t)n_fixtures, sizeof fixtures[0], cmp_str);
}

static const char *fixture_name(const char *dir)
{
    const char *slash = strrchr(dir, '/');
    return slash ? slash + 1 : dir;
}

/* Whitespace-separated integers from a file. */
static int32_t *read_ids(const char *dir, const char *file, int *n)
{
    char path[600];
    snprintf(path, sizeof path, "%s/golden/%s", dir, file);
    char *text = tu_read(path, NULL), *p = text, *end;
    int cap = 64, count = 0;
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    ck_assert_ptr_nonnull(ids);
    for (;;) {
        while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t' || *p == ',') p++;
        if (!*p) break;
        long v = strtol(p, &end, 10);
        ck_assert_msg(end != p, "%s: not a token id at byte %ld", path, (long)(p - text));
        if (count == cap) ids = realloc(ids, sizeof *ids * (size_t)(cap *= 2));
        ck_assert_ptr_nonnull(ids);
        ids[count++] = (int32_t)v;
        p = end;
    }
    free(text);
    *n = count;
    return ids;
}

/* A golden logits file, which must hold exactly rows × vocab floats (little-endian hosts). */
static float *read_logits(const char *dir, const char *file, int rows, int vocab)
{
    char path[600];
    snprintf(path, sizeof path, "%s/golden/%s", dir, file);
    size_t size;
    float *f = tu_read(path, &size);
    ck_assert_msg(size == (size_t)rows * (size_t)vocab * sizeof(float),
                  "%s: %zu bytes, expected %d rows x %d vocab x 4 = %zu", path, size, rows, vocab,
                  (size_t)rows * (size_t)vocab * sizeof(float));
    return f;
}

static int argmax(const float *x, int n) /* lowest index on ties */
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* max |got - want| over rows × vocab, ≤ tol, and the argmax equal on every row; returns the max. */
static double compare_logits(const char *what, const float *got, const float *want, int rows,
                             int vocab, double tol)
{
    double worst = 0;
    int worst_row = 0, worst_col = 0;
    for (int r = 0; r < rows; r++) {
        const float *g = got + (size_t)r * vocab, *w = want + (size_t)r * vocab;
        for (int v = 0; v < vocab; v++) {
            double d = fabs((double)g[v] - (double)w[v]);
            CHECK(!isnan(d), "%s: row %d, token %d: logit %g vs golden %g", what, r, v, g[v], w[v]);
            if (d > worst) worst = d, worst_row = r, worst_col = v;
        }
        int ag = argmax(g, vocab), aw = argmax(w, vocab);
        CHECK(ag == aw,
              "%s: row %d: argmax %d (logit %.6f) but golden argmax %d (golden logit %.6f, ours "
              "%.6f)",
              what, r, ag, g[ag], aw, w[aw], g[aw]);
    }
    CHECK(worst <= tol, "%s: max |Δlogit| %.3g at row %d, token %d (%.6f vs golden %.6f) > %.0e",
          what, worst, worst_row, worst_col, got[(size_t)worst_row * vocab + worst_col],
          want[(size_t)worst_row * vocab + worst_col], tol);
    return worst;
}

typedef struct golden {
    const char *dir;
    int32_t *tokens, *greedy;
    int n_tokens, n_greedy, vocab;
    float *prefill, *decode, *greedy_logits;
} golden;

static void golden_load(golden *g, const char *dir, int vocab)
{
    g->dir = dir;
    g->vocab = vocab;
    g->tokens = read_ids(dir, "tokens.txt", &g->n_tokens);
    g->greedy = read_ids(dir, "greedy.txt", &g->n_greedy);
    ck_assert_msg(g->n_tokens > 0 && g->n_greedy > 0, "%s: %d tokens, %d greedy ids", dir,
                  g->n_tokens, g->n_greedy);
    g->prefill = read_logits(dir, "logits_prefill.f32", g->n_tokens, vocab);
    g->decode = read_logits(dir, "logits_decode.f32", g->n_tokens, vocab);
    g->greedy_logits = read_logits(dir, "logits_greedy.f32", g->n_greedy, vocab);
}

static void golden_free(golden *g)
{
    free(g->tokens);
    free(g->greedy);
    free(g->prefill);
    free(g->decode);
    free(g->greedy_logits);
}

static qmix_model *open_model(const char *dir)
{
    qmix_model *m = NULL;
    qmix_err err = {{0}};
    ck_assert_msg(qmix_model_open(dir, &m, &err) == 0, "qmix_model_open(%s): %s", dir, err.msg);
    return m;
}

static qmix_session *new_session(qmix_model *m, int max_ctx, int threads)
{
    qmix_session *s = NULL;
    qmix_err err = {{0}};
    qmix_session_opts opts = {.max_ctx = max_ctx, .n_threads = threads};
    ck_assert_msg(qmix_session_new(m, &opts, &s, &err) == 0, "qmix_session_new(%d threads): %s",
                  threads, err.msg);
    ck_assert_int_eq(qmix_session_threads(s), threads);
    return s;
}

static void prefill(qmix_session *s, const int32_t *tokens, int n, float *all_logits)
{
    qmix_err err = {{0}};
    ck_assert_msg(qmix_session_prefill(s, tokens, n, all_logits, &err) == 0,
                  "qmix_session_prefill(%d tokens at pos %d): %s", n, qmix_session_pos(s), err.msg);
}

static void decode(qmix_session *s, int32_t token)
{
    qmix_err err = {{0}};
    CHECK(qmix_session_decode(s, token, &err) == 0, "qmix_session_decode(%d at pos %d): %s", token,
          qmix_session_pos(s), err.msg);
}

/* One run of (a) prefill, (c) greedy continuation and (b) decode, with n_threads. */
typedef struct run_out {
    float *prefill, *greedy_logits, *decode;
    int32_t *greedy;
} run_out;

static void run_all(qmix_model *m, const golden *g, int threads, run_out *out)
{
    int n = g->n_tokens, V = g->vocab, steps = g->n_greedy;
    size_t row = (size_t)V * sizeof(float);
    qmix_session *s = new_session(m, n + steps, threads);
    out->prefill = malloc(row * (size_t)n);
    out->decode = malloc(row * (size_t)n);
    out->greedy_logits = malloc(row * (size_t)steps);
    out->greedy = malloc(sizeof(int32_t) * (size_t)steps);
    ck_assert(out->prefill && out->decode && out->greedy_logits && out->greedy);

    prefill(s, g->tokens, n, out->prefill);
    ck_assert_int_eq(qmix_session_pos(s), n);
    ck_assert_msg(!memcmp(qmix_session_logits(s), out->prefill + (size_t)(n - 1) * V, row),
                  "%s: qmix_session_logits after prefill is not the last row of all_logits",
                  g->dir);
    for (int k = 0; k < steps; k++) {
        const float *l = qmix_session_logits(s);
        memcpy(out->greedy_logits + (size_t)k * V, l, row);
        out->greedy[k] = argmax(l, V);
        if (k + 1 < steps) decode(s, out->greedy[k]);
    }
    ck_assert_int_eq(qmix_session_pos(s), n + steps - 1);

    qmix_session_reset(s);
    ck_assert_int_eq(qmix_session_pos(s), 0);
    for (int i = 0; i < n; i++) {
        decode(s, g->tokens[i]);
        memcpy(out->decode + (size_t)i * V, qmix_session_logits(s), row);
    }
    ck_assert_int_eq(qmix_session_pos(s), n);
    qmix_session_free(s);
}

static void run_free(run_out *r)
{
    free(r->prefill);
    free(r->decode);
    free(r->greedy_logits);
    free(r->greedy);
}

/* First differing float of two buffers, for the message. */
static size_t first_diff(const float *a, const float *b, size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (memcmp(a + i, b + i, sizeof(float))) return i;
    return count;
}

static void check_bitwise(const char *dir, const char *what, const float *a, const float *b,
                          int rows, int vocab)
{
    size_t count = (size_t)rows * vocab, i = first_diff(a, b, count);
    ck_assert_msg(i == count,
                  "%s: %s differ between 1 and 2 threads: first at row %zu, token %zu: %.9g vs "
                  "%.9g",
                  dir, what, i / vocab, i % vocab, a[i], b[i]);
}

START_TEST(fixtures_found)
{
    ck_assert_msg(n_fixtures >= 2,
                  "found %d fixture(s) with golden/tokens.txt under %s, expected "
                  ">= 2 (tests run from the repository root)",
                  n_fixtures, FIXTURES_DIR);
    for (int i = 0; i < n_fixtures; i++) printf("info: fixture: %s\n", fixtures[i]);
}
END_TEST

/* (a) prefill, (b) decode, (c) greedy against the goldens, (d) 1 vs 2 threads bitwise. */
START_TEST(golden_logits)
{
    const char *dir = fixtures[_i];
    qmix_model *m = open_model(dir);
    golden g;
    golden_load(&g, dir, qmix_model_config(m)->vocab_size);
    int V = g.vocab, n = g.n_tokens;
    run_out r[2];
    static const int threads[2] = {1, 2};
    for (int t = 0; t < 2; t++) {
        run_all(m, &g, threads[t], &r[t]);
        char what[512];
        snprintf(what, sizeof what, "%s, %d thread(s), prefill", dir, threads[t]);
        double dp = compare_logits(what, r[t].prefill, g.prefill, n, V, TOL);
        snprintf(what, sizeof what, "%s, %d thread(s), decode", dir, threads[t]);
        double dd = compare_logits(what, r[t].decode, g.decode, n, V, TOL);
        for (int k = 0; k < g.n_greedy; k++)
            CHECK(r[t].greedy[k] == g.greedy[k],
                  "%s, %d thread(s): greedy step %d picked %d, greedy.txt says %d", dir, threads[t],
                  k, r[t].greedy[k], g.greedy[k]);
        snprintf(what, sizeof what, "%s, %d thread(s), greedy steps", dir, threads[t]);
        double dg = compare_logits(what, r[t].greedy_logits, g.greedy_logits, g.n_greedy, V, TOL);
        printf("info: golden %s, %d thread(s): max |dlogit| prefill %.3g, decode %.3g, greedy %.3g "
               "(tolerance %.0e); %d greedy tokens exact\n",
               fixture_name(dir), threads[t], dp, dd, dg, TOL, g.n_greedy);
    }
    check_bitwise(dir, "prefill logits", r[0].prefill, r[1].prefill, n, V);
    check_bitwise(dir, "decode logits", r[0].decode, r[1].decode, n, V);
    check_bitwise(dir, "greedy-step logits", r[0].greedy_logits, r[1].greedy_logits, g.n_greedy, V);
    run_free(&r[0]);
    run_free(&r[1]);
    golden_free(&g);
    qmix_model_close(m);
}
END_TEST

/* (e) prefill in three uneven pieces against one prefill, then reset and both again bitwise. */
START_TEST(split_prefill)
{
    const char *dir = fixtures[_i];
    qmix_model *m = open_model(dir);
    golden g;
    golden_load(&g, dir, qmix_model_config(m)->vocab_size);
    int V = g.vocab, n = g.n_tokens;
    ck_assert_msg(n >= 24, "%s: %d tokens, too few to split 5 + 17 + rest", dir, n);
    int pieces[3] = {5, 17, n - 22};
    size_t bytes = (size_t)n * V * sizeof(float);
    float *one = malloc(bytes), *split = malloc(bytes), *again = malloc(bytes),
          *one_again = malloc(bytes);
    ck_assert(one && split && again && one_again);
    qmix_session *s = new_session(m, n + 1, 2);

    prefill(s, g.tokens, n, one);
    for (int rep = 0; rep < 2; rep++) {
        float *out = rep ? again : split;
        qmix_session_reset(s);
        ck_assert_int_eq(qmix_session_pos(s), 0);
        int at = 0;
        for (int p = 0; p < 3; p++) {
            prefill(s, g.tokens + at, pieces[p], out + (size_t)at * V);
            at += pieces[p];
            ck_assert_int_eq(qmix_session_pos(s), at);
            ck_assert_msg(!memcmp(qmix_session_logits(s), out + (size_t)(at - 1) * V,
                                  (size_t)V * sizeof(float)),
                          "%s: logits after piece %d are not the last row of its all_logits", dir,
                          p);
        }
    }
    char what[512];
    snprintf(what, sizeof what, "%s, prefill in pieces %d+%d+%d vs one prefill", dir, pieces[0],
             pieces[1], pieces[2]);
    double ds = compare_logits(what, split, one, n, V, SPLIT_TOL);
    snprintf(what, sizeof what, "%s, prefill in pieces vs golden", dir);
    compare_logits(what, split, g.prefill, n, V, TOL);
    size_t i = first_diff(split, again, (size_t)n * V);
    ck_assert_msg(i == (size_t)n * V,
                  "%s: split prefill after qmix_session_reset differs from the first run at row "
                  "%zu, token %zu: %.9g vs %.9g",
                  dir, i / V, i % V, again[i], split[i]);

    /* the state the pieces left behind continues like the golden */
    decode(s, g.greedy[0]);
    snprintf(what, sizeof what, "%s, decode after split prefill vs greedy step 1", dir);
    compare_logits(what, qmix_session_logits(s), g.greedy_logits + V, 1, V, TOL);

    qmix_session_reset(s);
    prefill(s, g.tokens, n, one_again);
    i = first_diff(one, one_again, (size_t)n * V);
    ck_assert_msg(i == (size_t)n * V,
                  "%s: prefill after qmix_session_reset differs from the first at row %zu, "
                  "token %zu: %.9g vs %.9g",
                  dir, i / V, i % V, one_again[i], one[i]);
    printf(
        "info: golden %s: prefill in pieces %d+%d+%d vs one prefill: max |dlogit| %.3g (tolerance "
        "%.0e); reset reproduces bitwise\n",
        fixture_name(dir), pieces[0], pieces[1], pieces[2], ds, SPLIT_TOL);
    qmix_session_free(s);
    free(one);
    free(split);
    free(again);
    free(one_again);
    golden_free(&g);
    qmix_model_close(m);
}
END_TEST

/* (f) the CLI under QMIX_ISA=scalar|avx2|avx512, each one this CPU has (the engine's own
 * detection decides, so the CLI would not silently fall back to a lesser ISA). */
static void run_cmd(const char *cmd, const char *errfile)
{
    int rc = system(cmd);
    if (rc != 0) {
        char *msg = tu_read(errfile, NULL);
        ck_abort_msg("'%s' failed (status %d): %s", cmd, rc, msg);
    }
}

START_TEST(cli_per_isa)
{
    const char *dir = fixtures[_i];
    qmix_model *m = open_model(dir);
    golden g;
    golden_load(&g, dir, qmix_model_config(m)->vocab_size);
    qmix_model_close(m);
    const char *bin = tu_qmix_bin();
    ck_assert_msg(access(bin, X_OK) == 0, "the CLI %s is not there (set QMIX_BIN)", bin);
    char *tmp = tu_tmpdir();
    char out[600], errf[600], cmd[2048];
    snprintf(out, sizeof out, "%s/logits.f32", tmp);
    snprintf(errf, sizeof errf, "%s/stderr.txt", tmp);
    int tested = 0;
    for (int k = 0; k < QK_ISA_COUNT; k++) {
        const char *isa = qk_isa_name((qk_isa)k);
        if (!qk_isa_supported((qk_isa)k)) {
            printf("note: this CPU lacks %s; the CLI is not run with QMIX_ISA=%s\n", isa, isa);
            continue;
        }
        ck_assert_int_eq(setenv("QMIX_ISA", isa, 1), 0);
        for (int mode = 0; mode < 2; mode++) {
            const char *mname = mode ? "decode" : "prefill";
            snprintf(cmd, sizeof cmd,
                     "'%s' logits '%s' --tokens @'%s/golden/tokens.txt' --out '%s' --mode %s "
                     "--threads 2 2>'%s'",
                     bin, dir, dir, out, mname, errf);
            unlink(out);
            run_cmd(cmd, errf);
            size_t size;
            float *got = tu_read(out, &size);
            ck_assert_msg(size == (size_t)g.n_tokens * g.vocab * sizeof(float),
                          "%s: QMIX_ISA=%s %s wrote %zu bytes, expected %d x %d floats", dir, isa,
                          mname, size, g.n_tokens, g.vocab);
            char what[512];
            snprintf(what, sizeof what, "%s, CLI QMIX_ISA=%s --mode %s", dir, isa, mname);
            double d =
                compare_logits(what, got, mode ? g.decode : g.prefill, g.n_tokens, g.vocab, TOL);
            printf("info: golden %s, CLI QMIX_ISA=%s --mode %s: max |dlogit| %.3g\n",
                   fixture_name(dir), isa, mname, d);
            free(got);
        }
        tested++;
    }
    unsetenv("QMIX_ISA");
    ck_assert_int_ge(tested, 1);
    tu_rmdir(tmp);
    golden_free(&g);
}
END_TEST

static Suite *make_suite(void)
{
    discover_fixtures();
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("fixtures");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, fixtures_found);
    tcase_add_loop_test(tc, golden_logits, 0, n_fixtures);
    tcase_add_loop_test(tc, split_prefill, 0, n_fixtures);
    tcase_add_loop_test(tc, cli_per_isa, 0, n_fixtures);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

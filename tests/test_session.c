/* The public session API's behaviour (errors, positions, reset), the thread pool under it, and
 * the sampler. Model-based tests use testdata/fixtures/tiny-a. */
#include <math.h>

#include "qmix.h"
#include "runtime/sampler.h"
#include "runtime/threadpool.h"
#include "testutil.h"

/* Passing ck_assert_* calls each cost a write(2) to the parent; loops use this instead. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

#define FIXTURE "testdata/fixtures/tiny-a"

/* ---- thread pool -------------------------------------------------------------------------- */

typedef struct count_ctx {
    int *hits; /* [n_tasks], atomic */
    int n_threads;
    int bad_thread; /* atomic: a thread id out of range was seen */
    int total;      /* atomic */
} count_ctx;

static void count_task(void *arg, int task, int thread)
{
    count_ctx *c = arg;
    if (c->hits) __atomic_fetch_add(&c->hits[task], 1, __ATOMIC_RELAXED);
    if (thread < 0 || thread >= c->n_threads) __atomic_store_n(&c->bad_thread, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&c->total, 1, __ATOMIC_RELAXED);
}

START_TEST(pool_runs_every_task_once)
{
    static const int threads[] = {1, 2, 3, 8};
    static const int tasks[] = {0, 1, 2, 1000, 7, 0, 1000};
    for (size_t ti = 0; ti < sizeof threads / sizeof threads[0]; ti++) {
        qmix_pool *p = qmix_pool_new(threads[ti]);
        ck_assert_ptr_nonnull(p);
        ck_assert_int_eq(qmix_pool_threads(p), threads[ti]);
        for (size_t ni = 0; ni < sizeof tasks / sizeof tasks[0]; ni++) {
            int n = tasks[ni];
            int *hits = calloc((size_t)(n ? n : 1), sizeof *hits);
            ck_assert_ptr_nonnull(hits);
            count_ctx c = {.hits = hits, .n_threads = threads[ti]};
            qmix_pool_run(p, count_task, &c, n);
            /* the run has returned: every task finished, nothing still in flight */
            for (int t = 0; t < n; t++)
                CHECK(__atomic_load_n(&hits[t], __ATOMIC_ACQUIRE) == 1,
                      "%d threads, %d tasks: task %d ran %d times", threads[ti], n, t, hits[t]);
            CHECK(__atomic_load_n(&c.total, __ATOMIC_ACQUIRE) == n,
                  "%d threads, %d tasks: %d task calls", threads[ti], n, c.total);
            CHECK(!c.bad_thread, "%d threads: a task saw a thread id out of [0, %d)", threads[ti],
                  threads[ti]);
            free(hits);
        }
        qmix_pool_free(p);
    }
}
END_TEST

/* The pool's workers and its caller busy-wait between jobs; with more threads than free cores
 * every job waits for descheduled spinners, so the 10k-job run uses no more threads than cores. */
static int cores_online(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void many_jobs(int threads, int jobs)
{
    qmix_pool *p = qmix_pool_new(threads);
    ck_assert_ptr_nonnull(p);
    count_ctx c = {.n_threads = threads};
    long expected = 0;
    for (int j = 0; j < jobs; j++) {
        int n = j % 7; /* 0..6 tasks, 1 included (run inline) */
        qmix_pool_run(p, count_task, &c, n);
        expected += n;
        CHECK(__atomic_load_n(&c.total, __ATOMIC_ACQUIRE) == expected,
              "%d threads, job %d: %d task calls in all, expected %ld", threads, j, c.total,
              expected);
    }
    CHECK(!c.bad_thread, "%d threads: a task saw a thread id out of range", threads);
    qmix_pool_free(p);
}

START_TEST(pool_many_small_jobs)
{
    /* 10k jobs of varying size back to back: no hang (the test's timeout), no lost task */
    int cores = cores_online();
    many_jobs(cores >= 2 ? 2 : 1, cores >= 2 ? 10000 : 300);
    if (cores >= 3) many_jobs(3, 10000);
    /* oversubscribed (8 threads, maybe more than cores): slow per job, but it finishes */
    many_jobs(8, 10);
    /* a pool freed right after creation, and one whose workers have gone to sleep */
    qmix_pool_free(qmix_pool_new(4));
    qmix_pool *p = qmix_pool_new(2);
    count_ctx c = {.n_threads = 2};
    qmix_pool_run(p, count_task, &c, 5);
    usleep(50000);
    qmix_pool_run(p, count_task, &c, 5);
    ck_assert_int_eq(c.total, 10);
    qmix_pool_free(p);
}
END_TEST

START_TEST(pool_default_threads)
{
    int cores = cores_online();
    qmix_pool *p = qmix_pool_new(0);
    ck_assert_ptr_nonnull(p);
    ck_assert_msg(qmix_pool_threads(p) == cores, "qmix_pool_new(0): %d threads, %d cores online",
                  qmix_pool_threads(p), cores);
    count_ctx c = {.n_threads = qmix_pool_threads(p)};
    qmix_pool_run(p, count_task, &c, 100);
    ck_assert_int_eq(c.total, 100);
    qmix_pool_free(p);
}
END_TEST

/* ---- sessions ----------------------------------------------------------------------------- */

static qmix_model *model;
static int vocab;
static const int32_t prompt[] = {835, 84, 82, 257, 198, 51, 265, 301, 72, 335, 267, 12};
#define PROMPT_LEN ((int)(sizeof prompt / sizeof prompt[0]))

static void model_setup(void)
{
    qmix_err err = {{0}};
    ck_assert_msg(qmix_model_open(FIXTURE, &model, &err) == 0, "qmix_model_open(%s): %s", FIXTURE,
                  err.msg);
    vocab = qmix_model_config(model)->vocab_size;
}

static void model_teardown(void)
{
    qmix_model_close(model);
    model = NULL;
}

static qmix_session *new_session(int max_ctx, int threads)
{
    qmix_session *s = NULL;
    qmix_err err = {{0}};
    qmix_session_opts opts = {.max_ctx = max_ctx, .n_threads = threads};
    ck_assert_msg(qmix_session_new(model, &opts, &s, &err) == 0,
                  "qmix_session_new(max_ctx %d, %d threads): %s", max_ctx, threads, err.msg);
    return s;
}

static float *copy_logits(const qmix_session *s)
{
    float *l = malloc(sizeof(float) * (size_t)vocab);
    ck_assert_ptr_nonnull(l);
    memcpy(l, qmix_session_logits(s), sizeof(float) * (size_t)vocab);
    return l;
}

static void ok_decode(qmix_session *s, int32_t token)
{
    qmix_err err = {{0}};
    ck_assert_msg(qmix_session_decode(s, token, &err) == 0, "decode(%d) at pos %d: %s", token,
                  qmix_session_pos(s), err.msg);
}

static void ok_prefill(qmix_session *s, const int32_t *tokens, int n, float *all)
{
    qmix_err err = {{0}};
    ck_assert_msg(qmix_session_prefill(s, tokens, n, all, &err) == 0, "prefill(%d) at pos %d: %s",
                  n, qmix_session_pos(s), err.msg);
}

static void same_logits(const char *what, const float *a, const float *b)
{
    for (int v = 0; v < vocab; v++)
        CHECK(!memcmp(&a[v], &b[v], sizeof(float)), "%s: logit %d differs: %.9g vs %.9g", what, v,
              a[v], b[v]);
}

START_TEST(bad_token_ids)
{
    qmix_session *s = new_session(16, 1);
    float *fresh;
    ok_decode(s, prompt[0]);
    fresh = copy_logits(s);
    qmix_session_reset(s);

    int32_t bad[] = {vocab, vocab + 7, -1, -5, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char id[32];
        snprintf(id, sizeof id, "%d", (int)bad[i]);
        qmix_err err = {{0}};
        ck_assert_msg(qmix_session_decode(s, bad[i], &err) == -1,
                      "decode(%d) with vocab %d should fail", bad[i], vocab);
        ck_assert_msg(strstr(err.msg, id) != NULL,
                      "decode(%d): the message does not name the id: "
                      "\"%s\"",
                      bad[i], err.msg);
        ck_assert_int_eq(qmix_session_pos(s), 0);

        /* in a prefill, after good tokens: nothing is consumed */
        int32_t seq[4] = {prompt[0], prompt[1], bad[i], prompt[2]};
        memset(&err, 0, sizeof err);
        ck_assert_msg(qmix_session_prefill(s, seq, 4, NULL, &err) == -1,
                      "prefill with id %d should fail", bad[i]);
        ck_assert_msg(strstr(err.msg, id) != NULL,
                      "prefill with id %d: the message does not "
                      "name the id: \"%s\"",
                      bad[i], err.msg);
        ck_assert_int_eq(qmix_session_pos(s), 0);
    }
    /* the failed calls left no trace: the next decode is that of a fresh session */
    ok_decode(s, prompt[0]);
    same_logits("decode after rejected ids vs a fresh decode", qmix_session_logits(s), fresh);
    /* the last valid id is accepted */
    ok_decode(s, vocab - 1);
    ck_assert_int_eq(qmix_session_pos(s), 2);
    free(fresh);
    qmix_session_free(s);
}
END_TEST

START_TEST(context_limit)
{
    qmix_session *s = new_session(8, 2);
    qmix_err err = {{0}};
    int32_t nine[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    ck_assert_msg(qmix_session_prefill(s, nine, 9, NULL, &err) == -1,
                  "prefill of 9 tokens into max_ctx 8 should fail");
    ck_assert_msg(strstr(err.msg, "max_ctx") != NULL, "message does not mention max_ctx: \"%s\"",
                  err.msg);
    ck_assert_int_eq(qmix_session_pos(s), 0);

    ok_prefill(s, nine, 6, NULL);
    ck_assert_int_eq(qmix_session_pos(s), 6);
    ok_decode(s, 7);
    ok_prefill(s, nine + 7, 1, NULL); /* exactly full */
    ck_assert_int_eq(qmix_session_pos(s), 8);

    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_session_decode(s, 9, &err) == -1, "decode past max_ctx 8 should fail");
    ck_assert_msg(strstr(err.msg, "max_ctx") != NULL, "message does not mention max_ctx: \"%s\"",
                  err.msg);
    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_session_prefill(s, nine, 2, NULL, &err) == -1,
                  "prefill past max_ctx 8 should fail");
    ck_assert_msg(strstr(err.msg, "max_ctx") != NULL, "message does not mention max_ctx: \"%s\"",
                  err.msg);
    ck_assert_int_eq(qmix_session_pos(s), 8);

    qmix_session_reset(s); /* room again */
    ok_prefill(s, nine, 8, NULL);
    ck_assert_int_eq(qmix_session_pos(s), 8);
    qmix_session_free(s);
}
END_TEST

START_TEST(empty_prefill)
{
    qmix_session *s = new_session(8, 1);
    int32_t one = 5;
    qmix_err err = {{0}};
    ck_assert_msg(qmix_session_prefill(s, &one, 0, NULL, &err) == -1,
                  "prefill of 0 tokens should fail");
    ck_assert_msg(err.msg[0] != 0, "prefill of 0 tokens failed without a message");
    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_session_prefill(s, &one, -3, NULL, &err) == -1,
                  "prefill of -3 tokens should fail");
    ck_assert_msg(err.msg[0] != 0, "prefill of -3 tokens failed without a message");
    ck_assert_int_eq(qmix_session_pos(s), 0);
    qmix_session_free(s);
}
END_TEST

START_TEST(positions_and_reset)
{
    qmix_session *s = new_session(32, 2);
    ck_assert_int_eq(qmix_session_pos(s), 0);
    ck_assert_int_eq(qmix_session_threads(s), 2);

    ok_decode(s, prompt[0]);
    ck_assert_int_eq(qmix_session_pos(s), 1);
    float *first[5];
    first[0] = copy_logits(s);
    for (int i = 1; i < 5; i++) {
        ok_decode(s, prompt[i]);
        ck_assert_int_eq(qmix_session_pos(s), i + 1);
        first[i] = copy_logits(s);
    }
    ok_prefill(s, prompt + 5, 3, NULL);
    ck_assert_int_eq(qmix_session_pos(s), 8);

    qmix_session_reset(s);
    ck_assert_int_eq(qmix_session_pos(s), 0);
    for (int i = 0; i < 5; i++) {
        ok_decode(s, prompt[i]);
        char what[64];
        snprintf(what, sizeof what, "decode %d after reset vs before", i);
        same_logits(what, qmix_session_logits(s), first[i]);
    }
    /* a prefill after reset gives the same logits as the decodes (within float rounding) */
    qmix_session_reset(s);
    float *all = malloc(sizeof(float) * (size_t)vocab * 5);
    ok_prefill(s, prompt, 5, all);
    ck_assert_int_eq(qmix_session_pos(s), 5);
    for (int i = 0; i < 5; i++)
        for (int v = 0; v < vocab; v++)
            CHECK(fabsf(all[(size_t)i * vocab + v] - first[i][v]) <= 1e-4f,
                  "prefill row %d vs decode, logit %d: %.7g vs %.7g", i, v,
                  all[(size_t)i * vocab + v], first[i][v]);
    for (int i = 0; i < 5; i++) free(first[i]);
    free(all);
    qmix_session_free(s);
}
END_TEST

START_TEST(prefill_without_all_logits)
{
    /* all_logits NULL: qmix_session_logits still holds the last row, bitwise the same */
    qmix_session *s = new_session(32, 2);
    float *all = malloc(sizeof(float) * (size_t)vocab * PROMPT_LEN);
    ok_prefill(s, prompt, PROMPT_LEN, all);
    qmix_session_reset(s);
    ok_prefill(s, prompt, PROMPT_LEN, NULL);
    same_logits("prefill with all_logits NULL vs the last row of all_logits",
                qmix_session_logits(s), all + (size_t)(PROMPT_LEN - 1) * vocab);
    free(all);
    qmix_session_free(s);
}
END_TEST

START_TEST(threads_agree_small_context)
{
    /* max_ctx smaller than the per-thread scratch a layer needs (e.g. a value head's width):
     * per-thread buffers must not overlap, so 1 and 2 threads still agree bitwise. */
    static const int ctxs[] = {2, 4, 12};
    for (size_t c = 0; c < sizeof ctxs / sizeof ctxs[0]; c++) {
        int n = ctxs[c];
        float *res[2][2];
        for (int t = 0; t < 2; t++) {
            qmix_session *s = new_session(n, t + 1);
            res[t][0] = malloc(sizeof(float) * (size_t)vocab * (size_t)n);
            res[t][1] = malloc(sizeof(float) * (size_t)vocab * (size_t)n);
            ok_prefill(s, prompt, n, res[t][0]);
            qmix_session_reset(s);
            for (int i = 0; i < n; i++) {
                ok_decode(s, prompt[i]);
                memcpy(res[t][1] + (size_t)i * vocab, qmix_session_logits(s),
                       sizeof(float) * (size_t)vocab);
            }
            qmix_session_free(s);
        }
        for (int m = 0; m < 2; m++) {
            for (size_t i = 0; i < (size_t)vocab * n; i++)
                CHECK(!memcmp(&res[0][m][i], &res[1][m][i], sizeof(float)),
                      "max_ctx %d, %s: 1 and 2 threads differ at row %zu, logit %zu: %.9g vs %.9g",
                      n, m ? "decode" : "prefill", i / vocab, i % vocab, res[0][m][i],
                      res[1][m][i]);
            free(res[0][m]);
            free(res[1][m]);
        }
    }
}
END_TEST

START_TEST(session_defaults)
{
    qmix_session *s = NULL;
    qmix_err err = {{0}};
    qmix_session_opts opts = {0};
    ck_assert_msg(qmix_session_new(model, &opts, &s, &err) == 0, "qmix_session_new(defaults): %s",
                  err.msg);
    int cores = cores_online();
    ck_assert_msg(qmix_session_threads(s) == cores, "n_threads 0: %d threads, %d cores",
                  qmix_session_threads(s), cores);
    ok_decode(s, prompt[0]);
    ck_assert_int_eq(qmix_session_pos(s), 1);
    qmix_session_free(s);
}
END_TEST

START_TEST(model_open_errors)
{
    qmix_model *m = (qmix_model *)1;
    qmix_err err = {{0}};
    const char *path = "testdata/fixtures/no-such-model";
    ck_assert_msg(qmix_model_open(path, &m, &err) == -1, "opening %s should fail", path);
    ck_assert_msg(strstr(err.msg, "no-such-model") != NULL,
                  "message does not name the path: \"%s\"", err.msg);
}
END_TEST

/* ---- sampler ------------------------------------------------------------------------------ */

static qmix_sampler *make_sampler(float temp, uint64_t seed, int n_vocab)
{
    qmix_sampling p = qmix_sampling_greedy();
    p.temperature = temp;
    p.seed = seed;
    qmix_sampler *s = qmix_sampler_new(&p, n_vocab);
    ck_assert_ptr_nonnull(s);
    return s;
}

START_TEST(sampler_greedy)
{
    float ties[] = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f};
    ck_assert_int_eq(qmix_argmax(ties, 5), 1);
    float flat[] = {0.5f, 0.5f, 0.5f};
    ck_assert_int_eq(qmix_argmax(flat, 3), 0);
    float last[] = {-INFINITY, -2.0f, -1.0f};
    ck_assert_int_eq(qmix_argmax(last, 3), 2);
    ck_assert_int_eq(qmix_argmax(last, 1), 0);
    for (uint64_t seed = 0; seed < 50; seed++) {
        qmix_sampler *s = make_sampler(0.0f, seed, 5);
        for (int i = 0; i < 20; i++)
            CHECK(qmix_sampler_sample(s, ties) == 1, "temperature 0, seed %llu: not the lowest argmax",
                  (unsigned long long)seed);
        qmix_sampler_free(s);
    }
}
END_TEST

static void draw(uint64_t seed, float temp, const float *logits, int n, int32_t *out, int count)
{
    qmix_sampler *s = make_sampler(temp, seed, n);
    for (int i = 0; i < count; i++) {
        out[i] = qmix_sampler_sample(s, logits);
        CHECK(out[i] >= 0 && out[i] < n, "sample %d out of [0, %d): %d", i, n, out[i]);
    }
    qmix_sampler_free(s);
}

START_TEST(sampler_seeds)
{
    float logits[8] = {0.1f, 0.3f, -0.2f, 0.0f, 0.25f, -0.1f, 0.05f, 0.2f};
    int32_t a[200], b[200];
    draw(42, 1.0f, logits, 8, a, 200);
    draw(42, 1.0f, logits, 8, b, 200);
    ck_assert_msg(!memcmp(a, b, sizeof a), "same seed, different sequences");
    static const uint64_t pairs[][2] = {{42, 43}, {0, 1}, {1, 2}, {7, 1u << 20}};
    for (size_t p = 0; p < sizeof pairs / sizeof pairs[0]; p++) {
        draw(pairs[p][0], 1.0f, logits, 8, a, 200);
        draw(pairs[p][1], 1.0f, logits, 8, b, 200);
        int same = 0;
        for (int i = 0; i < 200; i++) same += a[i] == b[i];
        /* independent streams agree on about 1/8 of draws */
        ck_assert_msg(same < 80, "seeds %llu and %llu agree on %d of 200 draws",
                      (unsigned long long)pairs[p][0], (unsigned long long)pairs[p][1], same);
    }
}
END_TEST

/* Frequencies over 20000 draws against softmax(logits / T): Pearson's χ² with 3 degrees of
 * freedom. The seed is fixed, so this cannot flake; 30 is far beyond the 99.99th percentile
 * (21.1) yet far below what a wrong distribution gives. */
static void check_frequencies(float temp, uint64_t seed)
{
    const float logits[4] = {0.0f, 1.0f, 2.0f, -1.0f};
    enum { DRAWS = 20000 };
    int32_t *out = malloc(sizeof(int32_t) * DRAWS);
    draw(seed, temp, logits, 4, out, DRAWS);
    int counts[4] = {0};
    for (int i = 0; i < DRAWS; i++) counts[out[i]]++;
    double z = 0, p[4], chi2 = 0;
    for (int i = 0; i < 4; i++) z += exp(logits[i] / temp);
    for (int i = 0; i < 4; i++) {
        p[i] = exp(logits[i] / temp) / z;
        double e = p[i] * DRAWS;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
    }
    printf("info: sampler T=%g: counts %d %d %d %d, expected %.0f %.0f %.0f %.0f, chi2 %.2f\n",
           temp, counts[0], counts[1], counts[2], counts[3], p[0] * DRAWS, p[1] * DRAWS,
           p[2] * DRAWS, p[3] * DRAWS, chi2);
    ck_assert_msg(chi2 < 30,
                  "T=%g: counts {%d, %d, %d, %d} vs expected {%.0f, %.0f, %.0f, %.0f}: "
                  "chi2 %.1f",
                  temp, counts[0], counts[1], counts[2], counts[3], p[0] * DRAWS, p[1] * DRAWS,
                  p[2] * DRAWS, p[3] * DRAWS, chi2);
    free(out);
}

START_TEST(sampler_frequencies)
{
    check_frequencies(1.0f, 12345);
    check_frequencies(0.5f, 777);
    check_frequencies(2.0f, 2024);
    /* a tiny temperature on a wide spread: argmax, no overflow or NaN */
    float spread[3] = {0.0f, 100.0f, 50.0f};
    int32_t out[100];
    draw(5, 1e-3f, spread, 3, out, 100);
    for (int i = 0; i < 100; i++) CHECK(out[i] == 1, "T=1e-3: draw %d picked %d", i, out[i]);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("session");
    TCase *pool = tcase_create("threadpool");
    tcase_set_timeout(pool, 60);
    tcase_add_test(pool, pool_runs_every_task_once);
    tcase_add_test(pool, pool_many_small_jobs);
    tcase_add_test(pool, pool_default_threads);
    suite_add_tcase(s, pool);

    TCase *sess = tcase_create("session");
    tcase_set_timeout(sess, 60);
    tcase_add_checked_fixture(sess, model_setup, model_teardown);
    tcase_add_test(sess, bad_token_ids);
    tcase_add_test(sess, context_limit);
    tcase_add_test(sess, empty_prefill);
    tcase_add_test(sess, positions_and_reset);
    tcase_add_test(sess, prefill_without_all_logits);
    tcase_add_test(sess, threads_agree_small_context);
    tcase_add_test(sess, session_defaults);
    tcase_add_test(sess, model_open_errors);
    suite_add_tcase(s, sess);

    TCase *smp = tcase_create("sampler");
    tcase_add_test(smp, sampler_greedy);
    tcase_add_test(smp, sampler_seeds);
    tcase_add_test(smp, sampler_frequencies);
    suite_add_tcase(s, smp);
    return s;
}

TU_MAIN(make_suite)

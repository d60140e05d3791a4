/* Measurement: summary statistics, KLD helpers, perplexity and KLD runs (library and CLI). */
#include <jansson.h>
#include <math.h>

#include "eval/kld.h"
#include "eval/ppl.h"
#include "eval/stats.h"
#include "eval/windows.h"
#include "model/model.h"
#include "testutil.h"

#define TINY_A "testdata/fixtures/tiny-a"
#define TINY_B "testdata/fixtures/tiny-b"

/* ---- statistics -------------------------------------------------------------------------- */

START_TEST(summary_known_lists)
{
    double ten[10];
    for (int i = 0; i < 10; i++) ten[9 - i] = i + 1; /* unsorted on purpose */
    qmix_summary s;
    qmix_summarize(ten, 10, 0.1, &s);
    ck_assert_int_eq(s.n, 10);
    ck_assert_double_eq_tol(s.mean, 5.5, 1e-12);
    ck_assert_double_eq_tol(s.median, 5.5, 1e-12);
    ck_assert_double_eq_tol(s.trimmed_mean, 5.5, 1e-12); /* 2..9 */
    ck_assert_double_eq(s.min, 1);
    ck_assert_double_eq(s.max, 10);
    ck_assert_double_eq(s.p90, 9);  /* nearest rank: ceil(0.9·10) = 9th */
    ck_assert_double_eq(s.p99, 10);
    ck_assert_double_eq(s.p999, 10);

    double skew[5] = {100, 3, 1, 4, 2};
    qmix_summarize(skew, 5, 0.2, &s);
    ck_assert_double_eq_tol(s.mean, 22, 1e-12);
    ck_assert_double_eq(s.median, 3);
    ck_assert_double_eq_tol(s.trimmed_mean, 3, 1e-12); /* drops 1 and 100 */
    qmix_summarize(skew, 5, 0, &s);
    ck_assert_double_eq_tol(s.trimmed_mean, 22, 1e-12);

    double two[2] = {1, 7};
    qmix_summarize(two, 2, 0.49, &s); /* trimming never empties the list */
    ck_assert_double_eq_tol(s.trimmed_mean, 4, 1e-12);
    qmix_summarize(two, 0, 0.1, &s);
    ck_assert_int_eq(s.n, 0);
    ck_assert_double_eq(s.mean, 0);
}
END_TEST

/* ---- KLD helpers ------------------------------------------------------------------------- */

START_TEST(kld_hand_computed)
{
    float p[2] = {0, 0}, q[2] = {(float)log(3.0), 0};
    /* P = (1/2, 1/2), Q = (3/4, 1/4): KL = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3) */
    ck_assert_double_eq_tol(qmix_kld_full(p, q, 2), 0.5 * log(4.0 / 3.0), 1e-7);
    ck_assert_double_eq_tol(qmix_kld_full(p, p, 2), 0, 1e-12);
    ck_assert_double_eq_tol(qmix_logsumexp(p, 2), log(2.0), 1e-12);
    float big[3] = {1000, 1000, 1000}; /* stable: no overflow */
    ck_assert_double_eq_tol(qmix_logsumexp(big, 3), 1000 + log(3.0), 1e-9);
}
END_TEST

START_TEST(topk_order_and_bounds)
{
    enum { V = 300 };
    float base[V], quant[V];
    tu_rng_seed(7);
    for (int i = 0; i < V; i++) {
        base[i] = 3 * tu_frand();
        quant[i] = base[i] + 0.7f * tu_frand();
    }
    base[5] = base[9] = 10; /* a tie: the lower id first */
    int32_t ids[V];
    float logp[V];
    qmix_topk_logprobs(base, V, V, ids, logp);
    ck_assert_int_eq(ids[0], 5);
    ck_assert_int_eq(ids[1], 9);
    double mass = 0;
    for (int i = 0; i < V; i++) {
        if (i) ck_assert(logp[i] <= logp[i - 1]);
        mass += exp(logp[i]);
    }
    ck_assert_double_eq_tol(mass, 1, 1e-5);

    double exact = qmix_kld_full(base, quant, V);
    ck_assert(exact > 0.01);
    /* k = vocab is exact; smaller k lump the tail: never above exact, growing with k */
    ck_assert_double_eq_tol(qmix_kld_topk(ids, logp, V, quant, V), exact, 1e-5 * exact);
    double prev = 0;
    for (int k = 1; k <= V; k *= 2) {
        qmix_topk_logprobs(base, V, k, ids, logp);
        double kl = qmix_kld_topk(ids, logp, k, quant, V);
        ck_assert_msg(kl <= exact + 1e-6, "k=%d: %g > exact %g", k, kl, exact);
        ck_assert_msg(kl >= prev - 1e-6, "k=%d: %g < %g at half k", k, kl, prev);
        prev = kl;
    }
}
END_TEST

/* ---- runs over a fixture ----------------------------------------------------------------- */

/* A deterministic token stream within the fixture's vocabulary. */
static int32_t *stream(int64_t n, int vocab, uint64_t seed)
{
    int32_t *t = malloc((size_t)n * sizeof *t);
    tu_rng_seed(seed);
    for (int64_t i = 0; i < n; i++) t[i] = (int32_t)(tu_rng_u64() % (uint64_t)vocab);
    return t;
}

static qmix_session *open_session(const char *path, int ctx, qmix_model **m)
{
    qmix_err err;
    ck_assert_msg(qmix_model_open(path, m, &err) == 0, "%s", err.msg);
    qmix_session *s;
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = 2};
    ck_assert_msg(qmix_session_new(*m, &opts, &s, &err) == 0, "%s", err.msg);
    return s;
}

/* exp(mean token loss) computed here from whole-window prefills, against qmix_ppl. */
START_TEST(ppl_is_exp_mean_loss)
{
    enum { CTX = 40, WINDOWS = 3 };
    qmix_model *m;
    qmix_session *s = open_session(TINY_B, CTX, &m);
    int V = qmix_model_config(m)->vocab_size;
    int32_t *tok = stream(CTX * WINDOWS + 17, V, 11);
    float *logits = malloc((size_t)CTX * V * sizeof *logits);
    qmix_err err;
    double nll = 0;
    for (int w = 0; w < WINDOWS; w++) {
        qmix_session_reset(s);
        ck_assert(qmix_session_prefill(s, tok + w * CTX, CTX, logits, &err) == 0);
        for (int i = 0; i + 1 < CTX; i++) {
            const float *row = logits + (int64_t)i * V;
            double mx = row[0], sum = 0;
            for (int j = 1; j < V; j++) mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j < V; j++) sum += exp(row[j] - mx);
            nll += mx + log(sum) - row[tok[w * CTX + i + 1]];
        }
    }
    double want = exp(nll / (WINDOWS * (CTX - 1)));

    ck_assert_int_eq(qmix_eval_n_windows(CTX * WINDOWS + 17, CTX, 0), WINDOWS);
    ck_assert_int_eq(qmix_eval_n_windows(CTX * WINDOWS + 17, CTX, 2), 2);
    qmix_ppl_result r;
    ck_assert(qmix_ppl(s, tok, CTX, WINDOWS, 0, NULL, NULL, NULL, &r, &err) == 0);
    ck_assert_int_eq(r.windows, WINDOWS);
    ck_assert_int_eq(r.tokens_scored, WINDOWS * (CTX - 1));
    ck_assert_double_eq_tol(exp(r.nll_sum / r.tokens_scored), want, want * 1e-6);
    double mean_w = 0;
    for (int w = 0; w < WINDOWS; w++) mean_w += r.window_nll[w] / WINDOWS;
    ck_assert_double_eq_tol(mean_w, r.nll_sum / r.tokens_scored, 1e-9);
    qmix_ppl_result_free(&r);

    /* the CLI reports the same number */
    char *dir = tu_tmpdir(), path[1024], args[2048];
    snprintf(path, sizeof path, "%s/tokens.txt", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < CTX * WINDOWS + 17; i++) fprintf(f, "%d%c", tok[i], i % 20 == 19 ? '\n' : ' ');
    fclose(f);
    snprintf(args, sizeof args, "ppl " TINY_B " --tokens '%s' --ctx %d --json --threads 1", path,
             CTX);
    tu_run_result out = tu_run(args);
    ck_assert_msg(out.status == 0, "%s", out.err);
    json_error_t je;
    json_t *o = json_loads(out.out, 0, &je);
    ck_assert_msg(o != NULL, "not JSON: %s", out.out);
    ck_assert_double_eq_tol(json_real_value(json_object_get(o, "mean")), want, want * 1e-6);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "windows")), WINDOWS);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "tokens")), WINDOWS * (CTX - 1));
    ck_assert(json_is_real(json_object_get(o, "median")));
    ck_assert(json_is_real(json_object_get(o, "trimmed_mean")));
    ck_assert_int_eq(json_array_size(json_object_get(o, "window_ppl")), WINDOWS);
    json_decref(o);
    tu_run_free(&out);
    tu_rmdir(dir);
    free(logits);
    free(tok);
    qmix_session_free(s);
    qmix_model_close(m);
}
END_TEST

static double mean_kld(qmix_session *quant, qmix_session *base, qmix_kld_base *file,
                       const int32_t *tok, int ctx, int windows, qmix_kld_result *keep)
{
    qmix_kld_result r;
    qmix_err err;
    ck_assert_msg(qmix_kld_compare(quant, base, file, tok, ctx, windows, NULL, NULL, NULL, &r,
                                   &err) == 0, "%s", err.msg);
    double sum = 0;
    for (int64_t i = 0; i < r.n; i++) sum += r.kld[i];
    double mean = sum / (double)r.n;
    if (keep) *keep = r;
    else qmix_kld_result_free(&r);
    return mean;
}

START_TEST(kld_self_zero_and_grows_with_perturbation)
{
    enum { CTX = 32, WINDOWS = 2 };
    qmix_model *mb, *mq;
    qmix_session *base = open_session(TINY_A, CTX, &mb), *quant = open_session(TINY_A, CTX, &mq);
    int V = qmix_model_config(mb)->vocab_size, D = qmix_model_config(mb)->hidden_size;
    int32_t *tok = stream(CTX * WINDOWS, V, 3);
    qmix_kld_result r;
    ck_assert_double_eq_tol(mean_kld(quant, base, NULL, tok, CTX, WINDOWS, &r), 0, 1e-9);
    ck_assert_int_eq(r.top1_same, r.n);
    ck_assert_int_eq(r.n, WINDOWS * (CTX - 1));
    ck_assert_double_eq_tol(r.dp_sq_sum, 0, 1e-12);
    qmix_kld_result_free(&r);

    /* perturb the final norm's weights of the second copy by growing noise */
    float *orig = malloc((size_t)D * sizeof *orig);
    memcpy(orig, mq->final_norm, (size_t)D * sizeof *orig);
    double prev = 0;
    const double eps[] = {0.01, 0.05, 0.2, 0.8};
    for (int e = 0; e < 4; e++) {
        tu_rng_seed(99);
        for (int i = 0; i < D; i++) mq->final_norm[i] = orig[i] * (float)(1 + eps[e] * tu_frand());
        double kl = mean_kld(quant, base, NULL, tok, CTX, WINDOWS, NULL);
        ck_assert_msg(kl > prev, "eps %g: KLD %g not above %g", eps[e], kl, prev);
        prev = kl;
    }
    free(orig);
    free(tok);
    qmix_session_free(base);
    qmix_session_free(quant);
    qmix_model_close(mb);
    qmix_model_close(mq);
}
END_TEST

static void stop_after_two(void *user, int done, int total)
{
    if (done == 2) *(volatile sig_atomic_t *)user = 1;
}

START_TEST(saved_base_matches_direct)
{
    enum { CTX = 24, WINDOWS = 3 };
    qmix_model *mb, *mq;
    qmix_session *base = open_session(TINY_A, CTX, &mb), *quant = open_session(TINY_A, CTX, &mq);
    int V = qmix_model_config(mb)->vocab_size, D = qmix_model_config(mb)->hidden_size;
    int32_t *tok = stream(CTX * WINDOWS, V, 5);
    tu_rng_seed(1);
    for (int i = 0; i < D; i++) mq->final_norm[i] *= (float)(1 + 0.3 * tu_frand());
    qmix_kld_result direct;
    double exact = mean_kld(quant, base, NULL, tok, CTX, WINDOWS, &direct);
    ck_assert(exact > 1e-4);

    char *dir = tu_tmpdir(), path[1024];
    snprintf(path, sizeof path, "%s/base.klb", dir);
    qmix_err err;
    int done;
    /* top_k = vocab: exact up to float32 storage of the log-probabilities */
    ck_assert_msg(qmix_kld_save_base(base, tok, CTX, WINDOWS, V, path, NULL, NULL, NULL, &done,
                                     &err) == 0, "%s", err.msg);
    ck_assert_int_eq(done, WINDOWS);
    qmix_kld_base *file;
    ck_assert_msg(qmix_kld_base_open(path, &file, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(qmix_kld_base_get_info(file)->windows, WINDOWS);
    ck_assert_int_eq(memcmp(qmix_kld_base_get_info(file)->tokens, tok, sizeof(int32_t) * CTX * WINDOWS), 0);
    qmix_kld_result saved;
    double from_file = mean_kld(quant, NULL, file, NULL, 0, 0, &saved);
    ck_assert_double_eq_tol(from_file, exact, 1e-5 + 1e-4 * exact);
    ck_assert_int_eq(saved.top1_same, direct.top1_same);
    ck_assert_double_eq_tol(saved.base_nll_sum, direct.base_nll_sum, 1e-3);
    ck_assert_double_eq_tol(saved.dp_sum, direct.dp_sum, 1e-5);
    qmix_kld_result_free(&saved);
    qmix_kld_base_close(file);

    /* a small k: a lower bound of the exact value */
    ck_assert(qmix_kld_save_base(base, tok, CTX, WINDOWS, 16, path, NULL, NULL, NULL, &done,
                                 &err) == 0);
    ck_assert(qmix_kld_base_open(path, &file, &err) == 0);
    double lumped = mean_kld(quant, NULL, file, NULL, 0, 0, NULL);
    ck_assert_msg(lumped <= exact + 1e-6 && lumped > 0, "top-16 %g vs exact %g", lumped, exact);
    qmix_kld_base_close(file);

    /* stopped after two windows: a valid file holding those two */
    volatile sig_atomic_t stop = 0;
    ck_assert_int_eq(qmix_kld_save_base(base, tok, CTX, WINDOWS, 8, path, stop_after_two,
                                        (void *)&stop, &stop, &done, &err), 1);
    ck_assert_int_eq(done, 2);
    ck_assert_msg(qmix_kld_base_open(path, &file, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(qmix_kld_base_get_info(file)->windows, 2);
    qmix_kld_result part;
    mean_kld(quant, NULL, file, NULL, 0, 0, &part);
    ck_assert_int_eq(part.windows, 2);
    ck_assert_int_eq(part.n, 2 * (CTX - 1));
    qmix_kld_result_free(&part);
    qmix_kld_base_close(file);

    qmix_kld_result_free(&direct);
    tu_rmdir(dir);
    free(tok);
    qmix_session_free(base);
    qmix_session_free(quant);
    qmix_model_close(mb);
    qmix_model_close(mq);
}
END_TEST

START_TEST(hostile_base_files)
{
    char *dir = tu_tmpdir(), path[1024];
    snprintf(path, sizeof path, "%s/bad.klb", dir);
    qmix_kld_base *b;
    qmix_err err;
    ck_assert(qmix_kld_base_open(path, &b, &err) != 0); /* missing */
    ck_assert_ptr_nonnull(strstr(err.msg, "bad.klb"));
    tu_write(path, "hello", 5);
    ck_assert(qmix_kld_base_open(path, &b, &err) != 0);
    ck_assert_ptr_nonnull(strstr(err.msg, "not a qmix base-logits file"));

    /* a good header, vocab 4, ctx 3, 1 window, top_k 2: 2 rows of 20 bytes + 3 tokens */
    unsigned char f[24 + 2 * 20 + 12] = "QMIXKLB1";
    uint32_t hdr[4] = {4, 3, 1, 2};
    memcpy(f + 8, hdr, 16);
    float lp[2] = {-0.5f, -1.5f};
    int32_t ids[2] = {1, 2}, toks[3] = {0, 1, 3};
    float next = -0.5f;
    for (int r = 0; r < 2; r++) {
        memcpy(f + 24 + r * 20, ids, 8);
        memcpy(f + 24 + r * 20 + 8, lp, 8);
        memcpy(f + 24 + r * 20 + 16, &next, 4);
    }
    memcpy(f + 64, toks, 12);
    tu_write(path, f, sizeof f);
    ck_assert_msg(qmix_kld_base_open(path, &b, &err) == 0, "%s", err.msg);
    qmix_kld_base_close(b);

    tu_write(path, f, sizeof f - 1); /* truncated */
    ck_assert(qmix_kld_base_open(path, &b, &err) != 0);
    ck_assert_ptr_nonnull(strstr(err.msg, "truncated"));

    unsigned char g[sizeof f];
    memcpy(g, f, sizeof f);
    int32_t bad_tok = 4;
    memcpy(g + 64 + 8, &bad_tok, 4); /* a token outside the vocabulary */
    tu_write(path, g, sizeof g);
    ck_assert(qmix_kld_base_open(path, &b, &err) != 0);
    ck_assert_ptr_nonnull(strstr(err.msg, "outside the vocabulary"));

    memcpy(g, f, sizeof f);
    uint32_t huge = 0xffffffffu;
    memcpy(g + 16, &huge, 4); /* windows */
    tu_write(path, g, sizeof g);
    ck_assert(qmix_kld_base_open(path, &b, &err) != 0);
    ck_assert_ptr_nonnull(strstr(err.msg, "implausible"));

    /* a vocabulary that does not match the model */
    tu_write(path, f, sizeof f);
    ck_assert(qmix_kld_base_open(path, &b, &err) == 0);
    qmix_model *m;
    qmix_session *s = open_session(TINY_A, 8, &m);
    qmix_kld_result r;
    ck_assert(qmix_kld_compare(s, NULL, b, NULL, 0, 0, NULL, NULL, NULL, &r, &err) != 0);
    ck_assert_ptr_nonnull(strstr(err.msg, "vocabulary"));
    qmix_kld_base_close(b);
    qmix_session_free(s);
    qmix_model_close(m);
    tu_rmdir(dir);
}
END_TEST


START_TEST(cli_usage_and_errors)
{
    tu_expect("ppl --help", 0, "--ctx");
    tu_expect("kld --help", 0, "--save-base");
    tu_expect("ppl " TINY_A, 2, "--text");
    tu_expect("ppl " TINY_A " --text x --tokens y", 2, "exactly one");
    tu_expect("ppl " TINY_A " --text testdata/nope.txt", 1, "nope.txt");
    tu_expect("ppl " TINY_A " --text " TINY_A "/config.json --ctx 100000", 1, "fewer than one window");
    tu_expect("ppl " TINY_A " --text x --ctx 1", 2, "--ctx");
    tu_expect("ppl " TINY_A " --text x --trim 0.7", 2, "--trim");
    tu_expect("kld " TINY_A " --text x", 2, "BASE and QUANT");
    tu_expect("kld " TINY_A " " TINY_A " --save-base f --text x", 2, "exactly one model");
    tu_expect("kld --base-logits f " TINY_A " --text x", 2, "own tokens");
    tu_expect("kld --base-logits testdata/nope.klb " TINY_A, 1, "nope.klb");
    tu_expect("kld " TINY_A " " TINY_B " --text testdata/assets/wiki.test.raw --ctx 16 --windows 1",
           1, "vocabulary");
}
END_TEST

/* The whole flow on text: exact KLD, save, reuse, with --json keys. */
START_TEST(cli_kld_flow)
{
    char *dir = tu_tmpdir(), args[2048];
    snprintf(args, sizeof args,
             "kld " TINY_A " --save-base '%s/b.klb' --text testdata/assets/wiki.test.raw --ctx 32 "
             "--windows 2 --top-k 1024", dir);
    tu_expect(args, 0, "wrote");
    snprintf(args, sizeof args, "kld --base-logits '%s/b.klb' " TINY_A " --json", dir);
    tu_run_result r = tu_run(args);
    ck_assert_msg(r.status == 0, "%s", r.err);
    json_error_t je;
    json_t *o = json_loads(r.out, 0, &je);
    ck_assert_msg(o != NULL, "not JSON: %s", r.out);
    const char *keys[] = {"mean", "median", "p90", "p99", "p999", "max", "top1", "dp_mean",
                          "dp_rms", "ppl_base", "ppl_quant"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        ck_assert_msg(json_is_number(json_object_get(o, keys[i])), "key %s", keys[i]);
    ck_assert_double_eq_tol(json_number_value(json_object_get(o, "mean")), 0, 1e-5);
    ck_assert_double_eq(json_number_value(json_object_get(o, "top1")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "tokens")), 2 * 31);
    json_decref(o);
    tu_run_free(&r);
    tu_rmdir(dir);
}
END_TEST

static Suite *eval_suite(void)
{
    Suite *s = suite_create("eval");
    TCase *tc = tcase_create("eval");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, summary_known_lists);
    tcase_add_test(tc, kld_hand_computed);
    tcase_add_test(tc, topk_order_and_bounds);
    tcase_add_test(tc, ppl_is_exp_mean_loss);
    tcase_add_test(tc, kld_self_zero_and_grows_with_perturbation);
    tcase_add_test(tc, saved_base_matches_direct);
    tcase_add_test(tc, hostile_base_files);
    tcase_add_test(tc, cli_usage_and_errors);
    tcase_add_test(tc, cli_kld_flow);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(eval_suite)

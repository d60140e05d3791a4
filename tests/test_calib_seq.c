/* qmix calibrate --sequential (spec/quant-formats.md §3.1): layer L's statistics are collected
 * with layers 0..L-1 running quantized as the recipe quantizes them. On the tiny-b fixture: layer
 * 0's statistics equal the plain run's bit for bit and later layers' differ; a recipe that keeps
 * everything reproduces the plain file (but for the header's sequential flag); a recipe that
 * quantizes only layer 3 leaves layers 0-3 as the plain run has them and changes 4-7; with layer
 * 0 quantized, later statistics match those of the checkpoint qmix quantize writes; old files
 * still read and unknown flags are refused; CLI errors. On the demo model: GPTQ from sequential
 * vs plain statistics at 2 bits, measured by KLD (numbers printed; see demo_kld for what is
 * asserted and why). */
#include <math.h>
#include <sys/stat.h>

#include "model/model.h"
#include "quant/calib.h"
#include "testutil.h"

#define TINY "testdata/fixtures/tiny-b"
#define TOKENS TINY "/golden/tokens.txt"

static char fx_dir[512], fx_plain[600], fx_seq[600], fx_rtn[600], fx_keep[600], fx_l3[600],
    fx_l0[600], fx_l0_real[600];

/* Same threads, windows and tokens for every file: the accumulation order is then identical, so
 * statistics of identical activations are identical bit for bit. */
#define CAL "calibrate " TINY " --tokens " TOKENS " --ctx 16 --threads 2"

static void fixture_up(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(fx_dir, sizeof fx_dir, "%s/qmix-calseq-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(fx_dir));
    snprintf(fx_plain, sizeof fx_plain, "%s/plain.qcal", fx_dir);
    snprintf(fx_seq, sizeof fx_seq, "%s/seq.qcal", fx_dir);
    snprintf(fx_rtn, sizeof fx_rtn, "%s/seq-rtn.qcal", fx_dir);
    snprintf(fx_keep, sizeof fx_keep, "%s/seq-keep.qcal", fx_dir);
    snprintf(fx_l3, sizeof fx_l3, "%s/seq-l3.qcal", fx_dir);
    char args[4096], recipe[600];
    snprintf(args, sizeof args, CAL " -o %s", fx_plain);
    tu_expect(args, 0, "routed experts");
    snprintf(args, sizeof args, CAL " -o %s --sequential --recipe uniform-2 --method gptq",
             fx_seq);
    tu_expect(args, 0, "layer 7/8 quantized");
    snprintf(args, sizeof args, CAL " -o %s --sequential --recipe uniform-2", fx_rtn);
    tu_expect(args, 0, "sequential");

    snprintf(recipe, sizeof recipe, "%s/keep.recipe", fx_dir);
    tu_write(recipe, "default keep\n", 13);
    snprintf(args, sizeof args, CAL " -o %s --sequential --recipe %s --method gptq", fx_keep,
             recipe);
    tu_expect(args, 0, "0 matrices");

    snprintf(recipe, sizeof recipe, "%s/l3.recipe", fx_dir);
    const char *l3 = "default keep\nexperts_gate_up,experts_down layers=3 bits=2\n";
    tu_write(recipe, l3, strlen(l3));
    snprintf(args, sizeof args, CAL " -o %s --sequential --recipe %s --method gptq", fx_l3,
             recipe);
    tu_expect(args, 0, "layer 4/8 quantized");

    /* layer 0 quantized by GPTQ: the sequential statistics, the checkpoint qmix quantize writes
       from them, and the plain statistics of that checkpoint */
    snprintf(recipe, sizeof recipe, "%s/l0.recipe", fx_dir);
    const char *l0 = "default keep\ndefault layers=0 bits=4\n";
    tu_write(recipe, l0, strlen(l0));
    snprintf(fx_l0, sizeof fx_l0, "%s/seq-l0.qcal", fx_dir);
    snprintf(fx_l0_real, sizeof fx_l0_real, "%s/real-l0.qcal", fx_dir);
    snprintf(args, sizeof args, CAL " -o %s --sequential --recipe %s --method gptq", fx_l0,
             recipe);
    tu_expect(args, 0, "layer 1/8 quantized: 42 matrices (gptq 42");
    snprintf(args, sizeof args, "quantize " TINY " %s/q-l0 --recipe %s --method gptq --stats %s "
             "--quiet --threads 2", fx_dir, recipe, fx_l0);
    tu_expect(args, 0, NULL);
    snprintf(args, sizeof args, "calibrate %s/q-l0 --tokens " TOKENS " --ctx 16 --threads 2 -o %s",
             fx_dir, fx_l0_real);
    tu_expect(args, 0, "routed experts");
}

static void fixture_down(void)
{
    char *d = strdup(fx_dir);
    tu_rmdir(d);
}

static qmix_calib *open_ok(const char *path)
{
    qmix_calib *c;
    qmix_err err;
    ck_assert_msg(qmix_calib_open(path, &c, &err) == 0, "%s", err.msg);
    return c;
}

/* Entries equal bit for bit (rows, sums of squares, Hessian triangle). */
static int entry_same(const qmix_calib_entry *a, const qmix_calib_entry *b)
{
    ck_assert(a && b);
    ck_assert_int_eq(a->k, b->k);
    if (a->n != b->n || memcmp(a->sumsq, b->sumsq, (size_t)a->k * 8)) return 0;
    if ((a->xtx != NULL) != (b->xtx != NULL)) return 0;
    return !a->xtx || !memcmp(a->xtx, b->xtx, (size_t)(a->k * (a->k + 1) / 2) * 8);
}

/* Entries of layer L that equal the other file's, out of *total. */
static int layer_same(const qmix_calib *a, const qmix_calib *b, int L, int *total)
{
    int same = 0;
    *total = 0;
    for (int i = 0; i < qmix_calib_count(a); i++) {
        const qmix_calib_entry *e = qmix_calib_at(a, i);
        if (e->layer != L) continue;
        ++*total;
        same += entry_same(e, qmix_calib_get(b, e->layer, e->kind, e->expert));
    }
    return same;
}

START_TEST(layer0_same_later_differ)
{
    qmix_calib *p = open_ok(fx_plain), *s = open_ok(fx_seq), *r = open_ok(fx_rtn);
    ck_assert_int_eq(qmix_calib_sequential(p), 0);
    ck_assert_int_eq(qmix_calib_sequential(s), 1);
    ck_assert_int_eq(qmix_calib_count(p), qmix_calib_count(s));
    ck_assert_int_eq((int)qmix_calib_tokens(p), (int)qmix_calib_tokens(s));
    int n_layers = qmix_calib_layers(p), total;
    ck_assert_int_eq(n_layers, 8);
    /* nothing before layer 0 is quantized: its statistics are the plain run's */
    ck_assert_int_eq(layer_same(s, p, 0, &total), total);
    ck_assert_int_eq(layer_same(r, p, 0, &total), total);
    ck_assert_int_gt(total, 0);
    for (int L = 1; L < n_layers; L++) {
        /* every distinct input sees the quantized earlier layers: the dense ones all differ
           (experts may see no rows at all, and then agree) */
        ck_assert_msg(!entry_same(qmix_calib_get(s, L, QMIX_CIN_ATTN, -1),
                                  qmix_calib_get(p, L, QMIX_CIN_ATTN, -1)), "layer %d", L);
        ck_assert(!entry_same(qmix_calib_get(s, L, QMIX_CIN_FFN, -1),
                              qmix_calib_get(p, L, QMIX_CIN_FFN, -1)));
        /* and GPTQ-quantized earlier layers are not RTN-quantized ones */
        ck_assert(!entry_same(qmix_calib_get(s, L, QMIX_CIN_ATTN, -1),
                              qmix_calib_get(r, L, QMIX_CIN_ATTN, -1)));
    }
    ck_assert(!entry_same(qmix_calib_get(s, -1, QMIX_CIN_HEAD, -1),
                          qmix_calib_get(p, -1, QMIX_CIN_HEAD, -1)));
    /* the routed rows still add up to k per token in every layer, rerouted or not */
    qmix_model *m;
    qmix_err err;
    ck_assert(qmix_model_open(TINY, &m, &err) == 0);
    const qmix_config *cfg = qmix_model_config(m);
    for (int L = 0; L < n_layers; L++) {
        uint64_t routed = 0;
        for (int e = 0; e < cfg->n_experts; e++) routed += qmix_calib_get(s, L, QMIX_CIN_EXPERT, e)->n;
        ck_assert_int_eq((int)routed, (int)qmix_calib_tokens(s) * cfg->n_experts_used);
    }
    qmix_model_close(m);
    qmix_calib_close(p);
    qmix_calib_close(s);
    qmix_calib_close(r);
}
END_TEST

START_TEST(keep_recipe_is_plain)
{
    /* nothing quantized: the passes see the plain model; the files differ in the flag only */
    size_t a_len, b_len;
    uint8_t *a = tu_read(fx_plain, &a_len), *b = tu_read(fx_keep, &b_len);
    ck_assert_uint_eq(a_len, b_len);
    uint32_t fa, fb;
    memcpy(&fa, a + 12, 4);
    memcpy(&fb, b + 12, 4);
    ck_assert_uint_eq(fa, 1); /* Hessians */
    ck_assert_uint_eq(fb, 3); /* Hessians, sequential */
    b[12] = a[12];
    ck_assert(!memcmp(a, b, a_len));
    free(a);
    free(b);
}
END_TEST

START_TEST(only_later_layers_change)
{
    /* layer 3 alone quantized: the statistics of layers 0-3 cannot see it, those of 4-7 must */
    qmix_calib *p = open_ok(fx_plain), *s = open_ok(fx_l3);
    for (int L = 0; L < 8; L++) {
        int total, same = layer_same(s, p, L, &total);
        if (L <= 3) ck_assert_msg(same == total, "layer %d: %d of %d equal", L, same, total);
        else ck_assert_msg(!entry_same(qmix_calib_get(s, L, QMIX_CIN_ATTN, -1),
                                       qmix_calib_get(p, L, QMIX_CIN_ATTN, -1)), "layer %d", L);
    }
    qmix_calib_close(p);
    qmix_calib_close(s);
}
END_TEST

/* ‖a − b‖ / ‖b‖ over the sums of squares of one entry */
static double rel_diff(const qmix_calib_entry *a, const qmix_calib_entry *b)
{
    ck_assert(a && b && a->k == b->k);
    double d2 = 0, n2 = 0;
    for (int64_t j = 0; j < a->k; j++) {
        d2 += (a->sumsq[j] - b->sumsq[j]) * (a->sumsq[j] - b->sumsq[j]);
        n2 += b->sumsq[j] * b->sumsq[j];
    }
    return sqrt(d2 / n2);
}

START_TEST(matches_quantized_model)
{
    /* What the sequential passes run is what qmix quantize writes: the statistics of layers
     * 1-2 collected with layer 0 fake-quantized are those of the real quantized checkpoint up
     * to its own rounding (the MLX checkpoint stores the norms as bf16(1 + w); that alone moves
     * layer 0's input statistics by 0.3 %), and far from the unquantized model's. Measured
     * (attn_in and ffn_in, layers 1-2): sequential 0.0038-0.0045, plain 0.028-0.041. */
    qmix_calib *p = open_ok(fx_plain), *s = open_ok(fx_l0), *q = open_ok(fx_l0_real);
    for (int L = 1; L <= 2; L++)
        for (int kind = QMIX_CIN_ATTN; kind <= QMIX_CIN_FFN; kind += QMIX_CIN_FFN - QMIX_CIN_ATTN) {
            double sq = rel_diff(qmix_calib_get(s, L, kind, -1), qmix_calib_get(q, L, kind, -1));
            double pq = rel_diff(qmix_calib_get(p, L, kind, -1), qmix_calib_get(q, L, kind, -1));
            printf("info: layer %d %s vs the quantized checkpoint: sequential %.4f, plain %.4f\n",
                   L, qmix_calib_kind_name(kind), sq, pq);
            ck_assert_msg(sq < 0.25 * pq && sq < 0.02, "layer %d %s: %g vs %g", L,
                          qmix_calib_kind_name(kind), sq, pq);
        }
    qmix_calib_close(p);
    qmix_calib_close(s);
    qmix_calib_close(q);
}
END_TEST

START_TEST(flags_old_and_unknown)
{
    size_t len;
    uint8_t *raw = tu_read(fx_plain, &len);
    /* an aligned copy: the reader uses the float64 arrays in place */
    uint8_t *buf = malloc(len);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, raw, len);
    qmix_calib *c;
    qmix_err err;
    /* a file from before the flag (bit 1 clear) reads as not sequential */
    ck_assert_msg(qmix_calib_open_memory(buf, len, "old", &c, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(qmix_calib_sequential(c), 0);
    qmix_calib_close(c);
    buf[12] = 3;
    ck_assert(qmix_calib_open_memory(buf, len, "seq", &c, &err) == 0);
    ck_assert_int_eq(qmix_calib_sequential(c), 1);
    ck_assert_int_eq(qmix_calib_has_hessian(c), 1);
    qmix_calib_close(c);
    buf[12] = 7; /* a bit this qmix does not know */
    ck_assert(qmix_calib_open_memory(buf, len, "future", &c, &err) != 0);
    ck_assert_msg(strstr(err.msg, "future") && strstr(err.msg, "unknown flags"), "%s", err.msg);
    ck_assert_ptr_null(c);
    /* a header claiming more records than the bytes can hold: refused before allocating */
    buf[12] = 1;
    uint32_t huge = 1u << 30;
    memcpy(buf + 24, &huge, 4);
    ck_assert(qmix_calib_open_memory(buf, 4096, "claims", &c, &err) != 0);
    ck_assert_msg(strstr(err.msg, "cannot fit") || strstr(err.msg, "more than"), "%s", err.msg);
    free(buf);
    free(raw);
}
END_TEST

START_TEST(cli_errors)
{
    char args[2048];
    snprintf(args, sizeof args, CAL " -o %s/x --sequential", fx_dir);
    tu_expect(args, 2, "--sequential needs --recipe");
    snprintf(args, sizeof args, CAL " -o %s/x --recipe uniform-2", fx_dir);
    tu_expect(args, 2, "only apply with --sequential");
    snprintf(args, sizeof args, CAL " -o %s/x --sequential --recipe uniform-2 --method awq",
             fx_dir);
    tu_expect(args, 2, "--method must be rtn, gptq or imatrix");
    snprintf(args, sizeof args, CAL " -o %s/x --sequential --recipe uniform-2 --method gptq "
             "--no-hessian", fx_dir);
    tu_expect(args, 2, "needs the Hessians");
    snprintf(args, sizeof args, CAL " -o %s/x --sequential --recipe no-such-recipe", fx_dir);
    tu_expect(args, 1, "no-such-recipe");
    snprintf(args, sizeof args, CAL " -o %s/x --sequential --recipe uniform-2 --group-size 48",
             fx_dir);
    tu_expect(args, 2, "--group-size");
    /* nothing written by a failed run */
    char path[700];
    struct stat sb;
    snprintf(path, sizeof path, "%s/x", fx_dir);
    ck_assert(stat(path, &sb) != 0);
}
END_TEST

/* Mean KLD of a quantized demo model on the first 8 windows of its held-out text. */
static double demo_kld(const char *quant)
{
    return tu_kld_mean("kld testdata/demo %s --text testdata/demo/heldout.txt --ctx 512 "
                       "--windows 8 --json --threads 2", quant);
}

START_TEST(demo_kld_sequential)
{
    if (tu_light_skip("sequential vs plain statistics on the demo model")) return;
    struct stat sb;
    if (stat("testdata/demo/model.safetensors", &sb)) {
        printf("info: testdata/demo absent, skipped\n");
        return;
    }
    char args[4096], stats[2][700], out[3][700];
    static const char *const name[2] = {"plain", "sequential"};
    for (int i = 0; i < 2; i++) {
        snprintf(stats[i], sizeof stats[i], "%s/demo-%s.qcal", fx_dir, name[i]);
        snprintf(args, sizeof args, "calibrate testdata/demo --text testdata/assets/wiki.test.raw "
                 "--ctx 512 --samples 8 -o %s --threads 2%s", stats[i],
                 i ? " --sequential --recipe uniform-2 --method gptq" : "");
        tu_expect(args, 0, "routed experts");
    }
    double k[3];
    for (int i = 0; i < 3; i++) {
        snprintf(out[i], sizeof out[i], "%s/demo-q%d", fx_dir, i);
        snprintf(args, sizeof args, "quantize testdata/demo %s --recipe uniform-2 --method %s "
                 "--stats %s --quiet --threads 2", out[i], i < 2 ? "gptq" : "rtn",
                 stats[i < 2 ? i : 0]);
        tu_expect(args, 0, NULL);
        k[i] = demo_kld(out[i]);
    }
    printf("info: demo uniform-2 mean KLD (8 x 512 held-out tokens): gptq + plain stats %.4f, "
           "gptq + sequential stats %.4f, rtn %.4f\n", k[0], k[1], k[2]);
    /* Measured (8 calibration windows of wiki.test.raw): plain 0.2695, sequential 0.2739, rtn
     * 0.4001; with 32 windows: plain 0.2576, sequential 0.2560; at uniform-3, 8 windows: 0.0671
     * both, 32 windows: plain 0.0613, sequential 0.0623. On this 8-layer model the
     * sequential statistics are neither robustly better nor worse (±2 %), so only this holds:
     * GPTQ from either is far better than RTN, and they stay close. */
    ck_assert(isfinite(k[0]) && isfinite(k[1]));
    ck_assert_msg(k[0] < 0.9 * k[2] && k[1] < 0.9 * k[2], "%g %g vs rtn %g", k[0], k[1], k[2]);
    ck_assert_msg(fabs(k[1] - k[0]) < 0.1 * k[0], "sequential %g vs plain %g", k[1], k[0]);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("calib_seq");
    TCase *t = tcase_create("tiny-b");
    tcase_add_unchecked_fixture(t, fixture_up, fixture_down);
    tcase_add_test(t, layer0_same_later_differ);
    tcase_add_test(t, keep_recipe_is_plain);
    tcase_add_test(t, only_later_layers_change);
    tcase_add_test(t, matches_quantized_model);
    tcase_add_test(t, flags_old_and_unknown);
    tcase_add_test(t, cli_errors);
    tcase_add_test(t, demo_kld_sequential);
    tcase_set_timeout(t, 600);
    suite_add_tcase(s, t);
    return s;
}

TU_MAIN(suite)

/* Each sampling step against distributions computed by hand (in double) from its definition. */
#include <math.h>

#include "runtime/sampler.h"
#include "testutil.h"

enum { V = 6 };
static const float logits[V] = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 3.0f};

static void softmax_ref(const double *l, int n, double t, double *p)
{
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < n; i++) mx = fmax(mx, l[i]);
    for (int i = 0; i < n; i++) z += p[i] = exp((l[i] - mx) / t);
    for (int i = 0; i < n; i++) p[i] /= z;
}

/* probs from the sampler vs want (0 = filtered out) */
static void expect(const qmix_sampling *sp, const int32_t *prompt, int n_prompt,
                   const int32_t *accepted, int n_accepted, const double *want, const char *what)
{
    qmix_sampler *s = qmix_sampler_new(sp, V);
    ck_assert_ptr_nonnull(s);
    qmix_sampler_add_prompt(s, prompt, n_prompt);
    for (int i = 0; i < n_accepted; i++) qmix_sampler_accept(s, accepted[i]);
    float got[V];
    qmix_sampler_distribution(s, logits, got);
    for (int i = 0; i < V; i++)
        ck_assert_msg(fabs(got[i] - want[i]) < 1e-6, "%s: p[%d] = %.7f, expected %.7f", what, i,
                      got[i], want[i]);
    /* and the draws only ever hit tokens with non-zero probability */
    for (int d = 0; d < 200; d++) {
        int32_t t = qmix_sampler_sample(s, logits);
        ck_assert_msg(t >= 0 && t < V && want[t] > 0, "%s: drew filtered token %d", what, t);
    }
    qmix_sampler_free(s);
}

static void as_double(const float *f, double *d)
{
    for (int i = 0; i < V; i++) d[i] = f[i];
}

START_TEST(greedy_and_temperature)
{
    qmix_sampling sp = qmix_sampling_greedy();
    double want[V] = {0, 0, 0, 0, 0, 1};
    expect(&sp, NULL, 0, NULL, 0, want, "greedy");
    double l[V];
    as_double(logits, l);
    for (double t = 0.25; t <= 4; t *= 2) {
        sp.temperature = (float)t;
        softmax_ref(l, V, t, want);
        expect(&sp, NULL, 0, NULL, 0, want, "temperature");
    }
}
END_TEST

START_TEST(top_k)
{
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    sp.top_k = 3; /* keeps ids 5, 0, 1 */
    double kept[3] = {3.0, 2.0, 1.0}, p3[3], want[V] = {0};
    softmax_ref(kept, 3, 1, p3);
    want[5] = p3[0], want[0] = p3[1], want[1] = p3[2];
    expect(&sp, NULL, 0, NULL, 0, want, "top-k 3");
    sp.top_k = V; /* no-op */
    double l[V];
    as_double(logits, l);
    softmax_ref(l, V, 1, want);
    expect(&sp, NULL, 0, NULL, 0, want, "top-k = vocab");
}
END_TEST

START_TEST(top_k_ties_keep_lower_ids)
{
    static const float flat[V] = {1, 1, 1, 1, 1, 1};
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    sp.top_k = 2;
    qmix_sampler *s = qmix_sampler_new(&sp, V);
    float got[V];
    qmix_sampler_distribution(s, flat, got);
    ck_assert_msg(got[0] == 0.5f && got[1] == 0.5f && got[2] == 0,
                  "ties must keep ids 0 and 1: %g %g %g", got[0], got[1], got[2]);
    qmix_sampler_free(s);
}
END_TEST

START_TEST(top_p_and_min_p)
{
    double l[V], p[V];
    as_double(logits, l);
    softmax_ref(l, V, 1, p); /* order: 5 (.61), 0 (.22), 1 (.08), 2, 3, 4 */
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    /* nucleus 0.8: 5 alone holds .61 < .8, 5+0 hold .84 >= .8 */
    sp.top_p = 0.8f;
    double want[V] = {0};
    want[5] = p[5] / (p[5] + p[0]), want[0] = p[0] / (p[5] + p[0]);
    expect(&sp, NULL, 0, NULL, 0, want, "top-p 0.8");
    sp.top_p = 0.5f; /* the top token alone */
    double only[V] = {0, 0, 0, 0, 0, 1};
    expect(&sp, NULL, 0, NULL, 0, only, "top-p 0.5");
    /* min-p 0.1 keeps tokens with p >= 0.1·p(5): 5, 0, 1 (p1/p5 = e^-2 = .135), not 2 (.082) */
    sp.top_p = 1;
    sp.min_p = 0.1f;
    double z = p[5] + p[0] + p[1], wm[V] = {p[0] / z, p[1] / z, 0, 0, 0, p[5] / z};
    expect(&sp, NULL, 0, NULL, 0, wm, "min-p 0.1");
}
END_TEST

START_TEST(penalties)
{
    double l[V], want[V];
    as_double(logits, l);
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    /* repetition 2 on prompt token 0 (positive: halved) and output token 4 (negative: doubled) */
    sp.repetition_penalty = 2;
    int32_t prompt[] = {0, 0}, out[] = {4};
    double r[V];
    memcpy(r, l, sizeof r);
    r[0] = 2.0 / 2, r[4] = -1.0 * 2;
    softmax_ref(r, V, 1, want);
    expect(&sp, prompt, 2, out, 1, want, "repetition");
    /* presence and frequency count generated tokens only: token 1 twice, token 5 once */
    sp.repetition_penalty = 1;
    sp.presence_penalty = 0.5f;
    sp.frequency_penalty = 0.25f;
    int32_t gen[] = {1, 5, 1};
    memcpy(r, l, sizeof r);
    r[1] -= 0.5 + 2 * 0.25, r[5] -= 0.5 + 1 * 0.25;
    softmax_ref(r, V, 1, want);
    expect(&sp, prompt, 2, gen, 3, want, "presence + frequency");
    /* greedy sees penalties too: a big presence penalty moves the argmax off token 5 */
    sp = qmix_sampling_greedy();
    sp.presence_penalty = 5;
    int32_t five[] = {5};
    double g[V] = {1, 0, 0, 0, 0, 0};
    expect(&sp, NULL, 0, five, 1, g, "greedy with presence penalty");
}
END_TEST

START_TEST(reset_and_profiles)
{
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    sp.seed = 99;
    sp.presence_penalty = 3;
    qmix_sampler *s = qmix_sampler_new(&sp, V);
    int32_t first[50], again[50];
    for (int i = 0; i < 50; i++) qmix_sampler_accept(s, first[i] = qmix_sampler_sample(s, logits));
    qmix_sampler_reset(s);
    for (int i = 0; i < 50; i++) qmix_sampler_accept(s, again[i] = qmix_sampler_sample(s, logits));
    ck_assert_msg(!memcmp(first, again, sizeof first), "reset does not restart the same stream");
    qmix_sampler_free(s);

    int thinking = -1, max_tokens = 0;
    ck_assert_int_eq(qmix_sampling_profile("instruct-general", &sp, &thinking, &max_tokens), 0);
    ck_assert(sp.temperature == 0.7f && sp.top_p == 0.8f && sp.top_k == 20 &&
              sp.presence_penalty == 1.5f && thinking == 0 && max_tokens == 16384);
    ck_assert_int_eq(qmix_sampling_profile("thinking-coding", &sp, &thinking, NULL), 0);
    ck_assert(sp.temperature == 0.6f && sp.top_p == 0.95f && sp.presence_penalty == 0 &&
              thinking == 1);
    ck_assert_int_eq(qmix_sampling_profile("nope", &sp, NULL, NULL), -1);
}
END_TEST

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y;
}

START_TEST(large_vocab_top_p)
{
    /* 248k-token vocabulary: the nucleus pre-filter must not change the answer */
    enum { BIG = 248320 };
    float *l = malloc(sizeof(float) * BIG), *got = malloc(sizeof(float) * BIG);
    uint64_t r = 1;
    for (int i = 0; i < BIG; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        l[i] = (float)((r >> 40) / (double)(1 << 24)) * 12.0f - 6.0f;
    }
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 0.7f;
    sp.top_p = 0.95f;
    qmix_sampler *s = qmix_sampler_new(&sp, BIG);
    qmix_sampler_distribution(s, l, got);
    /* reference: full sort in double */
    double *p = malloc(sizeof(double) * BIG);
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < BIG; i++) mx = fmax(mx, l[i]);
    for (int i = 0; i < BIG; i++) z += p[i] = exp((l[i] - mx) / 0.7);
    for (int i = 0; i < BIG; i++) p[i] /= z;
    double *sorted = malloc(sizeof(double) * BIG);
    memcpy(sorted, p, sizeof(double) * BIG);
    qsort(sorted, BIG, sizeof(double), cmp_desc);
    double cum = 0, cut = 0;
    int keep = 0;
    while (keep < BIG && cum < 0.95) cum += sorted[keep++];
    cut = sorted[keep - 1];
    int n_got = 0;
    double mass = 0;
    for (int i = 0; i < BIG; i++)
        if (got[i] > 0) n_got++, mass += got[i];
    ck_assert_msg(n_got == keep, "nucleus has %d tokens, reference %d", n_got, keep);
    ck_assert_msg(fabs(mass - 1) < 1e-4, "nucleus mass %.6f", mass);
    for (int i = 0; i < BIG; i++)
        if (p[i] > cut * (1 + 1e-6)) ck_assert_msg(got[i] > 0, "token %d (p %.3g) dropped", i, p[i]);
    free(l), free(got), free(p), free(sorted);
    qmix_sampler_free(s);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("sampler");
    TCase *tc = tcase_create("distributions");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, greedy_and_temperature);
    tcase_add_test(tc, top_k);
    tcase_add_test(tc, top_k_ties_keep_lower_ids);
    tcase_add_test(tc, top_p_and_min_p);
    tcase_add_test(tc, penalties);
    tcase_add_test(tc, reset_and_profiles);
    tcase_add_test(tc, large_vocab_top_p);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

/* The bundled vision demo (testdata/demo-vl: the demo model with a small trained tower, see its
 * MODEL_CARD.md) against its trainer's goldens, through the command line as a user runs it: the
 * rendered prompt's ids, its logits, and the greedy caption, for three images (one resized). */
#include <math.h>

#include "testutil.h"

#define VL "testdata/demo-vl"

static const char *const shots[3] = {"shapes_64x96", "shapes_128x128", "shapes_100x150"};

START_TEST(goldens_through_the_cli)
{
    char *dir = tu_tmpdir(), conv[700], out[700], ids[700], args[4096], path[700];
    for (int i = 0; i < 3; i++) {
        /* one user message: the image, then the text; thinking on (the trainer's prompt) */
        snprintf(conv, sizeof conv, "%s/conv.json", dir);
        char json[1024];
        int len = snprintf(json, sizeof json,
                           "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", "
                           "\"image_url\": {\"url\": \"file://" VL "/images/%s.png\"}}, "
                           "{\"type\": \"text\", \"text\": \"Describe this image.\"}]}]",
                           shots[i]);
        tu_write(conv, json, (size_t)len);
        snprintf(out, sizeof out, "%s/logits.f32", dir);
        snprintf(ids, sizeof ids, "%s/ids.txt", dir);
        snprintf(args, sizeof args, "logits " VL " --messages '%s' --out '%s' --tokens-out '%s'",
                 conv, out, ids);
        tu_expect(args, 0, NULL);
        int n_got, n_want;
        int32_t *got = tu_read_ids(ids, &n_got);
        snprintf(path, sizeof path, VL "/golden/%s/tokens.txt", shots[i]);
        int32_t *want = tu_read_ids(path, &n_want);
        ck_assert_int_eq(n_got, n_want);
        for (int k = 0; k < n_want; k++)
            ck_assert_msg(got[k] == want[k], "%s: prompt id %d: %d vs %d", shots[i], k, got[k],
                          want[k]);
        /* logits of every prompt row against the trainer's float64 reference */
        size_t sz_got, sz_want;
        float *lg = tu_read(out, &sz_got);
        snprintf(path, sizeof path, VL "/golden/%s/logits_prefill.f32", shots[i]);
        float *lw = tu_read(path, &sz_want);
        ck_assert_uint_eq(sz_got, sz_want);
        double worst = 0;
        for (size_t k = 0; k < sz_want / sizeof(float); k++) {
            double d = fabs((double)lg[k] - lw[k]);
            if (!(d <= worst)) worst = d;
        }
        printf("info: demo-vl %s: %d prompt ids exact, logits max |diff| %.2g\n", shots[i], n_want,
               worst);
        ck_assert_msg(worst <= 1e-3, "%s: logits differ by %g", shots[i], worst);
        /* the greedy caption, token for token */
        char *gen = NULL;
        snprintf(path, sizeof path, VL "/golden/%s/greedy.txt", shots[i]);
        int n_greedy;
        int32_t *greedy = tu_read_ids(path, &n_greedy);
        ck_assert_int_eq(tu_run_out(&gen, "generate " VL " --messages '%s' --print-ids --ignore-eos -n %d "
                                    "--temp 0", conv, n_greedy), 0);
        char *p = gen;
        for (int k = 0; k < n_greedy; k++) {
            char *end;
            long v = strtol(p, &end, 10);
            ck_assert_msg(end != p, "%s: %d of %d ids generated:\n%s", shots[i], k, n_greedy, gen);
            ck_assert_msg(v == greedy[k], "%s: generated id %d: %ld vs %d", shots[i], k, v, greedy[k]);
            p = end;
        }
        free(gen);
        free(greedy);
        free(lg);
        free(lw);
        free(got);
        free(want);
    }
    tu_rmdir(dir);
}
END_TEST

/* What a user sees: a caption in words (the 128x128 image is a yellow triangle on black) */
START_TEST(a_caption_in_words)
{
    char *out = NULL;
    ck_assert_int_eq(tu_run_out(&out, "generate " VL " --image " VL "/images/shapes_128x128.png "
                                "-p 'Describe this image.' -n 40 --temp 0"), 0);
    ck_assert_msg(strstr(out, "A yellow triangle on a black background."), "%s", out);
    free(out);
}
END_TEST

static Suite *demo_vl_suite(void)
{
    Suite *s = suite_create("demo_vl");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, goldens_through_the_cli);
    tcase_add_test(tc, a_caption_in_words);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(demo_vl_suite)

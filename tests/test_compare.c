/* qmix compare: structural comparison across formats, head order included. */
#include <math.h>

#include "eval/compare.h"
#include "model/model.h"
#include "testutil.h"

#define TINY_B "testdata/fixtures/tiny-b"

static double role_min(const qmix_cmp_result *r, qmix_role role, int *count)
{
    double m = 2;
    *count = 0;
    for (int i = 0; i < r->n_tensors; i++)
        if (r->tensors[i].role == role) {
            (*count)++;
            if (r->tensors[i].min_cosine < m) m = r->tensors[i].min_cosine;
        }
    return m;
}

static qmix_model *open_model(const char *path)
{
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(path, &m, &err) == 0, "%s", err.msg);
    return m;
}

static void compare(qmix_model *a, qmix_model *b, qmix_cmp_result *r)
{
    qmix_err err;
    ck_assert_msg(qmix_compare_models(a, b, NULL, NULL, NULL, r, &err) == 0, "%s", err.msg);
    ck_assert_int_gt(r->n_tensors, 100);
}

static const qmix_role gdn_v_roles[] = {QMIX_ROLE_GDN_QKV, QMIX_ROLE_GDN_Z, QMIX_ROLE_GDN_A,
                                        QMIX_ROLE_GDN_B, QMIX_ROLE_GDN_OUT, QMIX_ROLE_GDN_PARAMS};

START_TEST(self_quantized_and_gguf)
{
    char *dir = tu_tmpdir(), q4[1024], gguf[1024];
    snprintf(q4, sizeof q4, "%s/q4", dir);
    snprintf(gguf, sizeof gguf, "%s/m.gguf", dir);
    ck_assert_int_eq(tu_run_out(NULL, "quantize " TINY_B " '%s' --recipe uniform-4 --quiet", q4), 0);
    ck_assert_int_eq(tu_run_out(NULL, "convert " TINY_B " '%s' --to gguf --type f32", gguf), 0);
    qmix_model *base = open_model(TINY_B), *same = open_model(TINY_B);
    qmix_cmp_result r;
    compare(base, same, &r);
    for (int i = 0; i < r.n_tensors; i++) {
        ck_assert_msg(r.tensors[i].min_cosine == 1 && r.tensors[i].stat.err2 == 0, "%s",
                      r.tensors[i].name);
    }
    qmix_cmp_result_free(&r);

    /* 4-bit: every quantized role >= 0.995, GDN parameters untouched */
    qmix_model *q = open_model(q4);
    compare(base, q, &r);
    int n;
    const qmix_role quantized[] = {QMIX_ROLE_EMBED, QMIX_ROLE_LM_HEAD, QMIX_ROLE_ATTN_Q,
                                   QMIX_ROLE_GDN_QKV, QMIX_ROLE_GDN_OUT, QMIX_ROLE_SHARED_EXPERT,
                                   QMIX_ROLE_EXPERTS_GATE_UP};
    for (size_t k = 0; k < sizeof quantized / sizeof *quantized; k++) {
        double c = role_min(&r, quantized[k], &n);
        ck_assert_msg(n > 0 && c >= 0.995 && c < 0.9999, "%s: %g", qmix_role_name(quantized[k]), c);
    }
    ck_assert(role_min(&r, QMIX_ROLE_GDN_PARAMS, &n) == 1 && n > 0);
    qmix_cmp_result_free(&r);

    /* the GGUF (value heads tiled) compares exactly, head by head */
    qmix_model *g = open_model(gguf);
    ck_assert(g->gdn_v_tiled);
    compare(base, g, &r);
    for (int i = 0; i < r.n_tensors; i++)
        ck_assert_msg(r.tensors[i].stat.err2 == 0, "%s: rel err %g", r.tensors[i].name,
                      qmix_cmp_rel_err(&r.tensors[i].stat));
    qmix_cmp_result_free(&r);

    /* read in the wrong (Hugging Face) head order: every value-head group falls visibly below
     * the threshold, nothing else moves (tiny-b has 4 value heads per key head) */
    g->gdn_v_tiled = 0;
    compare(base, g, &r);
    for (size_t k = 0; k < sizeof gdn_v_roles / sizeof *gdn_v_roles; k++) {
        double c = role_min(&r, gdn_v_roles[k], &n);
        ck_assert_msg(c < 0.9, "%s: cosine %g with the heads out of order",
                      qmix_role_name(gdn_v_roles[k]), c);
    }
    ck_assert(role_min(&r, QMIX_ROLE_ATTN_Q, &n) == 1);
    ck_assert(role_min(&r, QMIX_ROLE_EXPERTS_DOWN, &n) == 1);
    qmix_cmp_result_free(&r);

    qmix_model_close(g);
    qmix_model_close(q);
    qmix_model_close(same);
    qmix_model_close(base);
    tu_rmdir(dir);
}
END_TEST

START_TEST(cli)
{
    char *dir = tu_tmpdir(), args[2048];
    ck_assert_int_eq(tu_run_out(NULL, "quantize " TINY_B " '%s/q' --recipe uniform-4 --quiet", dir), 0);
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "compare " TINY_B " '%s/q' --json --per-tensor", dir), 0);
    json_t *o = tu_json(out);
    free(out);
    ck_assert(json_is_true(json_object_get(o, "pass")));
    json_t *roles = json_object_get(o, "roles"), *tensors = json_object_get(o, "tensors");
    ck_assert(json_array_size(roles) >= 15);
    ck_assert(json_array_size(tensors) > 100);
    json_t *first = json_array_get(roles, 0);
    const char *keys[] = {"cosine", "min_cosine", "rel_err", "max_abs"};
    for (int k = 0; k < 4; k++) ck_assert(json_is_number(json_object_get(first, keys[k])));
    json_decref(o);
    snprintf(args, sizeof args, "compare " TINY_B " '%s/q' --min-cosine 0.9999", dir);
    tu_expect(args, 1, "below their threshold");
    tu_expect("compare " TINY_B " testdata/fixtures/tiny-a", 1, "differ");
    tu_expect("compare " TINY_B, 2, "usage");
    tu_expect("compare " TINY_B " " TINY_B " --min-cosine 2", 2, "--min-cosine");
    tu_expect("compare --help", 0, "head");
    tu_rmdir(dir);
}
END_TEST

static Suite *compare_suite(void)
{
    Suite *s = suite_create("compare");
    TCase *tc = tcase_create("compare");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, self_quantized_and_gguf);
    tcase_add_test(tc, cli);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(compare_suite)

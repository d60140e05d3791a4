/* qmix bench's context list (--ctx 1024,4096 --gen N): one row per thread count and context, the
 * seed-card table, the JSON keys per row, and the usage errors. Runs the CLI (QMIX_BIN). */
#include <jansson.h>
#include <stdarg.h>
#include <sys/wait.h>

#include "testutil.h"

#define FIXTURE "testdata/fixtures/tiny-a"

/* Runs `qmix ARGS`; returns the exit status, stdout in *out (malloc'd) if out is given. */
static void expect_number(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_number(v), "key %s missing or not a number", key);
    ck_assert_msg(json_number_value(v) > 0, "key %s is %g", key, json_number_value(v));
}

START_TEST(ctx_list_json)
{
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "bench " FIXTURE " --ctx 64,200 --gen 4 --threads 1,2 "
                                        "--no-membw --json"),
                     0);
    json_t *j = tu_json(out);
    free(out);
    const json_t *runs = json_object_get(j, "runs");
    ck_assert_int_eq(json_array_size(runs), 4); /* 2 thread counts x 2 contexts */
    const int want_ctx[4] = {64, 200, 64, 200}, want_threads[4] = {1, 1, 2, 2};
    for (size_t i = 0; i < 4; i++) {
        const json_t *r = json_array_get(runs, i);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "ctx")), want_ctx[i]);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "threads")), want_threads[i]);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "session_ctx")), want_ctx[i] + 4);
        expect_number(r, "prefill_tps");
        expect_number(r, "decode_tps");
        expect_number(r, "peak_rss_bytes");
    }
    ck_assert_int_eq(json_integer_value(json_object_get(j, "decode_steps")), 4);
    ck_assert_int_eq(json_array_size(json_object_get(j, "contexts")), 2);
    json_decref(j);

    /* --gen defaults to 128 with --ctx */
    ck_assert_int_eq(tu_run_out(&out, "bench " FIXTURE " --ctx 16 --threads 1 --no-membw "
                                        "--json"),
                     0);
    j = tu_json(out);
    free(out);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "decode_steps")), 128);
    ck_assert_int_eq(json_array_size(json_object_get(j, "runs")), 1);
    json_decref(j);
}
END_TEST

START_TEST(prompt_alias)
{
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "bench " FIXTURE " --prompt 32 --threads 1 --no-membw "
                                        "--json"),
                     0);
    json_t *j = tu_json(out);
    free(out);
    const json_t *runs = json_object_get(j, "runs");
    ck_assert_int_eq(json_array_size(runs), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(runs, 0), "ctx")), 32);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "decode_steps")), 64); /* as before */
    json_decref(j);
}
END_TEST

START_TEST(table)
{
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "bench " FIXTURE " --ctx 1024,100 --gen 2 --threads 1 "
                                        "--no-membw"),
                     0);
    ck_assert_ptr_nonnull(strstr(out, "| Context Window | Prefill (tok/s) | Generation (tok/s) |"));
    ck_assert_ptr_nonnull(strstr(out, "| 1 | 1k tokens |"));
    ck_assert_ptr_nonnull(strstr(out, "| 1 | 100 tokens |"));
    ck_assert_ptr_nonnull(strstr(out, "Peak RSS"));
    free(out);
}
END_TEST

START_TEST(bad_lists)
{
    static const char *bad[] = {"''", "0", "1,,2", "a", "16,", ",16", "-5", "5x", "'16;32'", "' 16'",
                                "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,"
                                "25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,"
                                "46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65",
                                "99999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(tu_run_out(NULL, "bench " FIXTURE " --ctx %s --no-membw", bad[i]) == 2,
                      "--ctx %s accepted", bad[i]);
    ck_assert_int_eq(tu_run_out(NULL, "bench " FIXTURE " --ctx"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "bench " FIXTURE " --ctx 16 --prompt 16"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "bench " FIXTURE " --threads 1,,2"), 2);
}
END_TEST

static Suite *bench_suite(void)
{
    Suite *s = suite_create("bench");
    TCase *cli = tcase_create("cli");
    tcase_set_timeout(cli, 120);
    tcase_add_test(cli, ctx_list_json);
    tcase_add_test(cli, prompt_alias);
    tcase_add_test(cli, table);
    tcase_add_test(cli, bad_lists);
    suite_add_tcase(s, cli);
    return s;
}

TU_MAIN(bench_suite)

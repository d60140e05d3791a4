/* The README's walk-through, run as written on the demo model: the lines between its
 * walkthrough-begin / walkthrough-end markers go to bash unchanged, except the six variable
 * lines, which get the demo's values (the model, a budget it must be squeezed into, small text
 * files so the run takes seconds). `qmix` is a shell function that runs the built CLI; for `serve`
 * it starts the server on a free port, asks it one chat question and stops it. */
#include "testutil.h"

/* The README's walk-through block: the lines of its ```sh fence (malloc'd). */
static char *walkthrough_lines(void)
{
    char *readme = tu_read("README.md", NULL);
    char *begin = strstr(readme, "<!-- walkthrough-begin -->");
    ck_assert_msg(begin, "README.md has no walkthrough-begin marker");
    char *end = strstr(begin, "<!-- walkthrough-end -->");
    ck_assert_msg(end, "README.md has no walkthrough-end marker");
    char *fence = strstr(begin, "```sh\n");
    ck_assert_msg(fence && fence < end, "no ```sh block in the walk-through");
    fence += 6;
    char *close = strstr(fence, "```");
    ck_assert_msg(close && close < end, "unterminated ```sh block in the walk-through");
    char *out = strndup(fence, (size_t)(close - fence));
    free(readme);
    return out;
}

START_TEST(readme_walkthrough_runs_on_the_demo_model)
{
    if (tu_light_skip("the README walk-through")) return;
    char *dir = tu_tmpdir(), cwd[2048], path[2600];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof cwd));
    /* small calibration and held-out texts: a few windows each */
    char *wiki = tu_read("testdata/assets/wiki.test.raw", NULL);
    char *held = tu_read("testdata/demo/heldout.txt", NULL);
    snprintf(path, sizeof path, "%s/calib.txt", dir);
    tu_write(path, wiki, 6000);
    snprintf(path, sizeof path, "%s/heldout.txt", dir);
    tu_write(path, held, 12000);
    free(wiki);
    free(held);

    const char *bin = tu_qmix_bin();
    char qmix[2600];
    snprintf(qmix, sizeof qmix, "%s%s%s", bin[0] == '/' ? "" : cwd, bin[0] == '/' ? "" : "/", bin);
    /* the variables, by name: the demo's values */
    struct { const char *name; char value[2600]; } vars[] = {
        {"M", ""}, {"MEM", "32M"}, {"RESERVE", "0"}, {"CTX", "65536"}, {"TEXT", "calib.txt"},
        {"HELDOUT", "heldout.txt"}};
    snprintf(vars[0].value, sizeof vars[0].value, "%s/testdata/demo", cwd);

    char *lines = walkthrough_lines();
    snprintf(path, sizeof path, "%s/walk.sh", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "set -euo pipefail\n"
            "qmix() {\n"
            "  if [ \"$1\" != serve ]; then '%s' \"$@\"; return; fi\n"
            "  shift; local args=() port=0\n"
            "  while [ $# -gt 0 ]; do\n"
            "    if [ \"$1\" = --port ]; then shift 2; else args+=(\"$1\"); shift; fi\n"
            "  done\n"
            "  '%s' serve \"${args[@]}\" --port 0 2>serve.log & local pid=$!\n"
            "  for _ in $(seq 100); do\n"
            "    port=$(sed -n 's/.*http:[^:]*:\\([0-9][0-9]*\\).*/\\1/p' serve.log | head -n 1)\n"
            "    [ -n \"$port\" ] && break; sleep 0.1\n"
            "  done\n"
            "  [ -n \"$port\" ] || { kill $pid; cat serve.log; return 1; }\n"
            "  curl -sf http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            "    -d '{\"messages\":[{\"role\":\"user\",\"content\":\"What is a package?\"}],\"max_tokens\":8}' \\\n"
            "    >answer.json || { kill $pid; return 1; }\n"
            "  kill $pid; wait $pid || true\n"
            "}\n",
            qmix, qmix);
    int replaced = 0;
    for (char *line = strtok(lines, "\n"); line; line = strtok(NULL, "\n")) {
        int done = 0;
        for (size_t k = 0; k < sizeof vars / sizeof vars[0]; k++) {
            size_t n = strlen(vars[k].name);
            if (!strncmp(line, vars[k].name, n) && line[n] == '=') {
                fprintf(f, "%s='%s'\n", vars[k].name, vars[k].value);
                replaced++;
                done = 1;
            }
        }
        if (!done) fprintf(f, "%s\n", line);
    }
    fclose(f);
    free(lines);
    ck_assert_msg(replaced == 6, "the walk-through sets %d of the 6 variables", replaced);

    char cmd[6000];
    snprintf(cmd, sizeof cmd, "cd '%s' && bash walk.sh >walk.out 2>walk.err", dir);
    int rc = system(cmd);
    snprintf(path, sizeof path, "%s/walk.out", dir);
    char *out = tu_read(path, NULL);
    snprintf(path, sizeof path, "%s/walk.err", dir);
    char *err = tu_read(path, NULL);
    ck_assert_msg(rc == 0, "the walk-through failed (%d):\n%s\n%s", rc, out, err);
    /* each step did its job: a plan, an allocation within the budget, measured, a KLD, a
     * perplexity, an answer from the server */
    ck_assert_msg(strstr(out, "Memory Budget"), "plan: %s", out);
    ck_assert_msg(strstr(out, "predicted KLD"), "quantize: %s", out);
    snprintf(path, sizeof path, "%s/q16/config.json", dir);
    ck_assert_msg(access(path, R_OK) == 0, "no q16/config.json");
    snprintf(path, sizeof path, "%s/q16/qmix-recipe.txt", dir);
    ck_assert_msg(access(path, R_OK) == 0, "no q16/qmix-recipe.txt");
    ck_assert_msg(strstr(out, "| KLD mean"), "kld: %s", out);
    ck_assert_msg(strstr(out, "| Mean | Median"), "ppl: %s", out);
    snprintf(path, sizeof path, "%s/answer.json", dir);
    char *answer = tu_read(path, NULL);
    json_t *j = tu_json(answer);
    json_t *choices = json_object_get(j, "choices");
    ck_assert_msg(json_array_size(choices) == 1, "%s", answer);
    json_decref(j);
    free(answer);
    free(out);
    free(err);
    tu_rmdir(dir);
}
END_TEST

static Suite *walkthrough_suite(void)
{
    Suite *s = suite_create("walkthrough");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, readme_walkthrough_runs_on_the_demo_model);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(walkthrough_suite)

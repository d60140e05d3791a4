#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "eval/ppl.h"
#include "eval/stats.h"
#include "eval/windows.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix ppl MODEL (--text FILE | --tokens FILE) [options]\n\n"
            "Perplexity over a text: it is tokenized with the model's own tokenizer.json and cut\n"
            "into non-overlapping windows of --ctx tokens, each evaluated as a fresh sequence.\n"
            "Scoring (--score):\n"
            "  all          every token but the first of each window (default; the WikiText-2-raw\n"
            "               protocol model cards report)\n"
            "  second-half  only the second half of each window, every token predicted from at\n"
            "               least ctx/2 tokens: how llama.cpp's llama-perplexity scores, so the\n"
            "               two tools give the same number on the same model, text and --ctx\n\n"
            "Reports: mean = exp(mean token loss over all windows) (the usual perplexity); median\n"
            "and trimmed mean of the per-window perplexities (trimmed: --trim of the windows\n"
            "dropped at each end, as published tables do for header/trailer windows).\n\n"
            "  --text FILE         text to evaluate (e.g. wiki.test.raw)\n"
            "  --tokens FILE       token ids (whitespace-separated) instead of --text\n"
            "  --ctx N             window length in tokens (default 2048)\n"
            "  --windows N         evaluate only the first N windows (default: all)\n"
            "  --trim F            fraction dropped at each end for the trimmed mean (0.1)\n"
            "  --score all|second-half  which tokens of a window count (see above; default all)\n"
            "  --threads N         worker threads (default: all cores)\n"
            "%s"
            "  --json              print one JSON object on stdout: mean, median, trimmed_mean,\n"
            "                      windows, tokens, ctx, nll, window_ppl[], complete, seconds\n\n"
            "Ctrl-C stops after the current chunk and reports the complete windows.\n",
            cli_kv_help);
}

static void on_progress(void *user, int done, int total)
{
    cli_progress("ppl", done, total, *(const double *)user);
}

int qmix_cmd_ppl(int argc, char **argv)
{
    const char *model_path = NULL, *v;
    cli_eval_args ea = {.ctx = 2048};
    double trim = QMIX_TRIM_DEFAULT;
    int second_half = 0;
    qmix_kv_type kv_type = QMIX_KV_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int taken = cli_eval_option("ppl", argc, argv, &i, &ea);
        if (!taken) taken = cli_kv_option("ppl", argc, argv, &i, &kv_type);
        if (taken < 0) return 2;
        if (taken) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--trim")) {
            if (!(v = cli_value("ppl", argc, argv, &i)) || cli_double("ppl", a, v, &trim)) return 2;
            if (!(trim >= 0 && trim < 0.5)) {
                fprintf(stderr, "qmix ppl: --trim must be in [0, 0.5)\n");
                return 2;
            }
        } else if (!strcmp(a, "--score")) {
            if (!(v = cli_value("ppl", argc, argv, &i))) return 2;
            if (!strcmp(v, "second-half")) second_half = 1;
            else if (!strcmp(v, "all")) second_half = 0;
            else {
                fprintf(stderr, "qmix ppl: --score must be all or second-half, not '%s'\n", v);
                return 2;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix ppl: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix ppl: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || !ea.text == !ea.tokens) {
        if (model_path) fprintf(stderr, "qmix ppl: give exactly one of --text and --tokens\n");
        else cli_missing("ppl", "MODEL");
        return 2;
    }
    long ctx = ea.ctx;
    int json = ea.json;

    int32_t *tokens = NULL;
    int64_t n_tokens = 0;
    if (cli_eval_tokens("ppl", model_path, ea.text, ea.tokens, &tokens, &n_tokens)) return 1;
    int n_windows = qmix_eval_n_windows(n_tokens, (int)ctx, (int)ea.windows);
    if (n_windows < 1) {
        fprintf(stderr, "qmix ppl: the text has %lld tokens, fewer than one window of --ctx %ld\n",
                (long long)n_tokens, ctx);
        free(tokens);
        return 1;
    }

    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_ppl_result r = {0};
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)ea.threads,
                              .kv_type = kv_type};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;

    cli_catch_sigint();
    double t0 = cli_now();
    int run = qmix_ppl(sess, tokens, (int)ctx, n_windows, second_half ? (int)ctx / 2 : 0, on_progress, &t0, &cli_stop, &r, &err);
    cli_progress_end();
    if (run < 0) goto fail;
    double seconds = cli_now() - t0;
    if (r.windows == 0) {
        fprintf(stderr, "qmix ppl: stopped before the first window completed\n");
        goto fail_quiet;
    }

    double *window_ppl = malloc((size_t)r.windows * sizeof *window_ppl);
    if (!window_ppl) goto fail_quiet;
    for (int w = 0; w < r.windows; w++) window_ppl[w] = exp(r.window_nll[w]);
    double mean_nll = r.nll_sum / (double)r.tokens_scored, ppl = exp(mean_nll);
    qmix_summary sum;
    json_t *list = json_array();
    for (int w = 0; w < r.windows; w++) json_array_append_new(list, json_real(window_ppl[w]));
    qmix_summarize(window_ppl, r.windows, trim, &sum);

    if (json) {
        json_t *o = json_pack("{s:s, s:s, s:f, s:f, s:f, s:f, s:i, s:I, s:i, s:b, s:f, s:f, s:o}",
                              "model", model_path, "score", second_half ? "second-half" : "all",
                              "mean", ppl, "median", sum.median,
                              "trimmed_mean", sum.trimmed_mean, "nll", mean_nll, "windows",
                              r.windows, "tokens", (json_int_t)r.tokens_scored, "ctx", (int)ctx,
                              "complete", run == 0, "trim", trim, "seconds", seconds,
                              "window_ppl", list);
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
        printf("%s\n", s);
        free(s);
        json_decref(o);
    } else {
        json_decref(list);
        printf("model        %s\n", model_path);
        printf("windows      %d x %ld tokens%s, %lld tokens scored (of %lld in the text)\n",
               r.windows, ctx, run ? " (stopped early)" : "", (long long)r.tokens_scored,
               (long long)n_tokens);
        printf("scoring      %s\n", second_half ? "second half of each window (as llama-perplexity)"
                                                 : "every token but the first of each window");
        printf("time         %.1f s, %.0f tok/s\n", seconds,
               (double)r.windows * ctx / (seconds > 0 ? seconds : 1));
        printf("\n| Mean | Median | Trimmed Mean |\n|---|---|---|\n| %.4f | %.4f | %.4f |\n", ppl,
               sum.median, sum.trimmed_mean);
        printf("\nmean = exp(mean token loss %.5f nats); median and trimmed mean (%.0f%% dropped at "
               "each end) of the %d window perplexities (min %.4f, max %.4f)\n",
               mean_nll, 100 * trim, r.windows, sum.min, sum.max);
    }
    free(window_ppl);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix ppl: %s\n", err.msg);
fail_quiet:
done:
    qmix_ppl_result_free(&r);
    qmix_session_free(sess);
    qmix_model_close(model);
    free(tokens);
    return rc;
}

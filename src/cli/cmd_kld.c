#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/plot.h"
#include "cli/commands.h"
#include "eval/kld.h"
#include "eval/stats.h"
#include "eval/windows.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix kld BASE QUANT (--text FILE | --tokens FILE) [options]\n"
            "       qmix kld BASE --save-base FILE (--text FILE | --tokens FILE) [options]\n"
            "       qmix kld --base-logits FILE QUANT [options]\n"
            "       qmix kld BASE QUANT --images DIR --prompt TEXT [options]  (see --images --help)\n\n"
            "KL divergence KL(P_base || P_quant) of QUANT's next-token distribution from BASE's on\n"
            "the same tokens (non-overlapping windows of --ctx tokens, every token but the first of\n"
            "a window scored): mean, median, p90, p99, p99.9 and max over tokens, top-1 agreement\n"
            "(both models' most likely token equal), and the change in probability of the token\n"
            "that actually followed (Δp = p_quant − p_base: mean and RMS).\n\n"
            "With BASE and QUANT both given the KLD is exact (full logits). --save-base runs BASE\n"
            "once and stores, per token, its top-k log-probabilities and the actual token's (~8·k\n"
            "bytes instead of 4·vocab); --base-logits compares any number of quants against that\n"
            "file, with the rest of the vocabulary outside the top k lumped into one bucket: a\n"
            "lower bound of the exact KLD, within 1e-3 of it when the top k hold the mass.\n\n"
            "  --text FILE         text, tokenized with BASE's tokenizer.json\n"
            "  --tokens FILE       token ids (whitespace-separated) instead of --text\n"
            "  --ctx N             window length in tokens (default 512)\n"
            "  --windows N         only the first N windows (default: all)\n"
            "  --save-base FILE    write BASE's compact distribution to FILE (no QUANT)\n"
            "  --base-logits FILE  read the base from FILE (tokens and ctx come from it)\n"
            "  --top-k K           entries kept per token by --save-base (default %d)\n"
            "  --plot FILE.svg     also draw the per-token KLD distribution (log scale, median\n"
            "                      and p99 marked) as an SVG picture\n"
            "  --threads N         worker threads (default: all cores)\n"
            "%s"
            "                      (for QUANT only: BASE keeps float32, so BASE BASE --kv-bits 4\n"
            "                      measures what the 4-bit cache costs)\n"
            "  --json              one JSON object on stdout: mean, median, p90, p99, p999, max,\n"
            "                      top1, dp_mean, dp_rms, ppl_base, ppl_quant, tokens, windows,\n"
            "                      ctx, top_k (0: exact), complete\n\n"
            "Ctrl-C stops after the current chunk and reports the complete windows.\n",
            QMIX_KLD_TOPK_DEFAULT, cli_kv_help);
}

static void on_progress(void *user, int done, int total)
{
    cli_progress("kld", done, total, *(const double *)user);
}

static int open_model(const char *path, int ctx, int threads, qmix_kv_type kv, qmix_model **model,
                      qmix_session **sess, qmix_err *err)
{
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = threads, .kv_type = kv};
    if (qmix_model_open(path, model, err)) return -1;
    return qmix_session_new(*model, &opts, sess, err);
}

static void report(const char *base, const char *quant, const qmix_kld_result *r, int complete,
                   double seconds, int json)
{
    double *values = malloc((size_t)(r->n ? r->n : 1) * sizeof *values);
    if (!values) return;
    memcpy(values, r->kld, (size_t)r->n * sizeof *values);
    qmix_summary s;
    qmix_summarize(values, r->n, 0, &s);
    free(values);
    double n = (double)r->n, top1 = r->top1_same / n, dp_mean = r->dp_sum / n,
           dp_rms = sqrt(r->dp_sq_sum / n), ppl_b = exp(r->base_nll_sum / n),
           ppl_q = exp(r->quant_nll_sum / n);
    if (json) {
        json_t *o = json_pack(
            "{s:s, s:s, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:i, s:i, "
            "s:i, s:b, s:f, s:b}",
            "base", base, "quant", quant, "mean", s.mean, "median", s.median, "p90", s.p90, "p99",
            s.p99, "p999", s.p999, "max", s.max, "top1", top1, "dp_mean", dp_mean, "dp_rms",
            dp_rms, "ppl_base", ppl_b, "ppl_quant", ppl_q, "tokens", (json_int_t)r->n, "windows",
            r->windows, "ctx", r->ctx, "top_k", r->top_k, "complete", complete, "seconds",
            seconds, "lower_bound", r->top_k > 0);
        char *text = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
        printf("%s\n", text);
        free(text);
        json_decref(o);
        return;
    }
    printf("base         %s%s\n", base,
           r->top_k ? "" : "  (exact: full logits)");
    if (r->top_k) printf("             (saved top-%d distribution)\n", r->top_k);
    printf("quant        %s\n", quant);
    printf("tokens       %lld scored in %d windows x %d%s, %.1f s\n", (long long)r->n, r->windows,
           r->ctx, complete ? "" : " (stopped early)", seconds);
    printf("\n| KLD mean | median | p90 | p99 | p99.9 | max | top-1 | Δp mean | Δp RMS | "
           "PPL base | PPL quant |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    const char *ge = r->top_k ? "≥ " : "";
    printf("| %s%.6f | %s%.6f | %s%.6f | %s%.6f | %s%.6f | %s%.6f | %.2f %% | %+.5f | %.5f | %.4f "
           "| %.4f |\n", ge, s.mean, ge, s.median, ge, s.p90, ge, s.p99, ge, s.p999, ge, s.max,
           100 * top1, dp_mean, dp_rms, ppl_b, ppl_q);
    if (r->top_k)
        printf("\n≥: a lower bound. The saved base keeps its top %d tokens per position and lumps "
               "the rest of\nthe vocabulary into one bucket, which can only hide divergence; the "
               "exact KLD (qmix kld BASE QUANT)\nis at least this.\n", r->top_k);
}

int qmix_cmd_kld(int argc, char **argv)
{
    const char *paths[2] = {NULL, NULL}, *save = NULL, *base_file = NULL, *plot = NULL, *v;
    cli_eval_args ea = {.ctx = 512};
    long top_k = QMIX_KLD_TOPK_DEFAULT;
    int n_paths = 0;
    for (int i = 1; i < argc; i++) /* the image form has its own options */
        if (!strcmp(argv[i], "--images")) return qmix_cmd_kld_images(argc, argv);
    qmix_kv_type kv_type = QMIX_KV_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int taken = cli_eval_option("kld", argc, argv, &i, &ea);
        if (!taken) taken = cli_kv_option("kld", argc, argv, &i, &kv_type);
        if (taken < 0) return 2;
        if (taken) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--save-base")) {
            if (!(save = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--base-logits")) {
            if (!(base_file = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--plot")) {
            if (!(plot = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--top-k")) {
            if (!(v = cli_value("kld", argc, argv, &i)) ||
                cli_int("kld", a, v, 1, 65536, &top_k))
                return 2;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix kld: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (n_paths < 2) {
            paths[n_paths++] = a;
        } else {
            fprintf(stderr, "qmix kld: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    const char *text = ea.text, *token_file = ea.tokens;
    long ctx = ea.ctx, max_windows = ea.windows, threads = ea.threads;
    int json = ea.json;
    /* three forms: BASE QUANT; BASE --save-base; --base-logits QUANT */
    const char *why = NULL;
    if (save && base_file) why = "--save-base and --base-logits exclude each other";
    else if (save && n_paths != 1) why = "--save-base takes exactly one model (BASE)";
    else if (base_file && n_paths != 1) why = "--base-logits takes exactly one model (QUANT)";
    else if (!save && !base_file && n_paths != 2) why = "give BASE and QUANT";
    else if (base_file && (text || token_file))
        why = "--base-logits brings its own tokens: drop --text/--tokens";
    else if (!base_file && !text == !token_file) why = "give exactly one of --text and --tokens";
    if (why) {
        if (argc <= 1) return cli_missing("kld", "BASE and QUANT");
        fprintf(stderr, "qmix kld: %s (see --help)\n", why);
        return 2;
    }

    int32_t *tokens = NULL;
    int64_t n_tokens = 0;
    int n_windows = 0;
    qmix_kld_base *saved = NULL;
    qmix_err err;
    if (base_file) {
        if (qmix_kld_base_open(base_file, &saved, &err)) {
            fprintf(stderr, "qmix kld: %s\n", err.msg);
            return 1;
        }
        const qmix_kld_base_info *in = qmix_kld_base_get_info(saved);
        ctx = in->ctx;
        n_windows = max_windows > 0 && max_windows < in->windows ? (int)max_windows : in->windows;
        if (n_windows < 1) {
            fprintf(stderr, "qmix kld: %s holds no complete window\n", base_file);
            qmix_kld_base_close(saved);
            return 1;
        }
    } else {
        if (cli_eval_tokens("kld", paths[0], text, token_file, &tokens, &n_tokens)) return 1;
        n_windows = qmix_eval_n_windows(n_tokens, (int)ctx, (int)max_windows);
        if (n_windows < 1) {
            fprintf(stderr, "qmix kld: the text has %lld tokens, fewer than one window of --ctx "
                    "%ld\n", (long long)n_tokens, ctx);
            free(tokens);
            return 1;
        }
    }

    qmix_model *m_base = NULL, *m_quant = NULL;
    qmix_session *s_base = NULL, *s_quant = NULL;
    qmix_kld_result r = {0};
    int rc = 1, run;
    cli_catch_sigint();
    double t0 = cli_now();
    if (save) {
        if (open_model(paths[0], (int)ctx, (int)threads, QMIX_KV_DEFAULT, &m_base, &s_base, &err)) goto fail;
        int done = 0;
        run = qmix_kld_save_base(s_base, tokens, (int)ctx, n_windows, (int)top_k, save,
                                 on_progress, &t0, &cli_stop, &done, &err);
        cli_progress_end();
        if (run < 0) goto fail;
        fprintf(stderr, "qmix kld: wrote %s: %d windows x %ld tokens, top-%ld, %.1f s%s\n", save,
                done, ctx, top_k, cli_now() - t0, run ? " (stopped early)" : "");
        if (json)
            printf("{\"base_logits\": \"%s\", \"windows\": %d, \"ctx\": %ld, \"top_k\": %ld, "
                   "\"complete\": %s}\n", save, done, ctx, top_k, run ? "false" : "true");
        rc = 0;
        goto done;
    }
    const char *quant_path = base_file ? paths[0] : paths[1];
    if (!base_file &&
        open_model(paths[0], (int)ctx, (int)threads, QMIX_KV_DEFAULT, &m_base, &s_base, &err))
        goto fail;
    if (open_model(quant_path, (int)ctx, (int)threads, kv_type, &m_quant, &s_quant, &err)) goto fail;
    run = qmix_kld_compare(s_quant, s_base, saved, tokens, (int)ctx, n_windows, on_progress, &t0,
                           &cli_stop, &r, &err);
    cli_progress_end();
    if (run < 0) goto fail;
    if (r.n == 0) {
        fprintf(stderr, "qmix kld: stopped before the first window completed\n");
        goto done;
    }
    report(base_file ? base_file : paths[0], quant_path, &r, run == 0, cli_now() - t0, json);
    if (plot) {
        double *sorted = malloc((size_t)r.n * sizeof *sorted);
        if (!sorted) {
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto fail;
        }
        memcpy(sorted, r.kld, (size_t)r.n * sizeof *sorted);
        qmix_summary sum;
        qmix_summarize(sorted, r.n, 0, &sum);
        free(sorted);
        char title[600];
        snprintf(title, sizeof title, "KLD of %s from %s%s", quant_path,
                 base_file ? base_file : paths[0], r.top_k ? " (lower bound: saved top-k base)" : "");
        if (cli_plot_kld_histogram(plot, title, r.kld, r.n, sum.median, sum.p99, &err)) goto fail;
        fprintf(stderr, "qmix kld: drew %s\n", plot);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix kld: %s\n", err.msg);
done:
    qmix_kld_result_free(&r);
    qmix_session_free(s_quant);
    qmix_session_free(s_base);
    qmix_model_close(m_quant);
    qmix_model_close(m_base);
    qmix_kld_base_close(saved);
    free(tokens);
    return rc;
}

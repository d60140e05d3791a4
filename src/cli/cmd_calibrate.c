/* qmix calibrate: the statistics calibrated quantization needs (src/quant/calib.h), collected by
 * running the model over calibration windows; optionally an llama.cpp importance matrix. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "eval/windows.h"
#include "quant/calib.h"
#include "quant/imatrix.h"
#include "runtime/session.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix calibrate MODEL (--text FILE | --tokens FILE) -o STATS [options]\n\n"
            "Runs MODEL over calibration windows of --ctx tokens and records, per distinct linear\n"
            "input (q/k/v share one, gate/up share one; per routed expert only the tokens routed\n"
            "to it), the rows seen, per-channel sums of squares (the importance matrix) and the\n"
            "GPTQ Hessian X^T X, accumulated in float64. STATS feeds qmix quantize --calib.\n\n"
            "  --text FILE         calibration text (tokenized with the model's tokenizer.json)\n"
            "  --tokens FILE       token ids (whitespace-separated) instead of --text\n"
            "  --ctx N             tokens per window (512)\n"
            "  --samples N         use the first N windows (default: all); --windows is the same\n"
            "  --skip N            start after the first N windows (statistics from text that\n"
            "                      an evaluation of the first N windows does not see)\n"
            "  -o, --out STATS     the statistics file (format in src/quant/calib.h)\n"
            "  --imatrix-out F     also write an llama.cpp importance matrix: legacy .dat, or the\n"
            "                      GGUF form when F ends in .gguf\n"
            "  --no-hessian        importance only (k floats per input instead of k^2/2)\n"
            "  --max-memory SIZE   statistics held at once (8G): more layers than fit are collected\n"
            "                      in several passes over the text, one band of layers per pass\n"
            "  --threads N         worker threads (default: all cores)\n");
}

static int parse_size(const char *v, uint64_t *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024.0, end++;
    else if (*end == 'M' || *end == 'm') mul = 1048576.0, end++;
    else if (*end == 'G' || *end == 'g') mul = 1073741824.0, end++;
    else if (*end == 'T' || *end == 't') mul = 1099511627776.0, end++;
    if (*end == 'i' || *end == 'B') end++;
    if (errno || end == v || *end || !(x > 0)) return -1;
    *out = (uint64_t)(x * mul);
    return 0;
}

static int no_logits(void *user, int window, int row0, int n_rows, const float *logits,
                     const int32_t *win, qmix_err *err)
{
    return 0;
}

typedef struct prog { double t0; int pass, passes; int64_t done0, total; } prog;
static void on_progress(void *user, int done, int total)
{
    prog *p = user;
    char label[32];
    snprintf(label, sizeof label, "calibrate %d/%d", p->pass + 1, p->passes);
    cli_progress(label, p->done0 + done, p->total, p->t0);
}

int qmix_cmd_calibrate(int argc, char **argv)
{
    const char *model_path = NULL, *out_path = NULL, *imatrix_out = NULL, *v;
    cli_eval_args ea = {.ctx = 512};
    int hessian = 1;
    long skip = 0;
    uint64_t max_mem = (uint64_t)8 << 30;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--samples")) argv[i] = (char *)"--windows";
        int taken = cli_eval_option("calibrate", argc, argv, &i, &ea);
        if (taken < 0) return 2;
        if (taken) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--out")) {
            if (!(out_path = cli_value("calibrate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--imatrix-out")) {
            if (!(imatrix_out = cli_value("calibrate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--skip")) {
            if (!(v = cli_value("calibrate", argc, argv, &i)) ||
                cli_int("calibrate", a, v, 0, 1 << 24, &skip))
                return 2;
        } else if (!strcmp(a, "--no-hessian")) {
            hessian = 0;
        } else if (!strcmp(a, "--max-memory")) {
            if (!(v = cli_value("calibrate", argc, argv, &i))) return 2;
            if (parse_size(v, &max_mem)) {
                fprintf(stderr, "qmix calibrate: --max-memory: expected a size like 8G or 512M\n");
                return 2;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix calibrate: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix calibrate: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || !out_path || !ea.text == !ea.tokens) {
        if (model_path && out_path)
            fprintf(stderr, "qmix calibrate: give exactly one of --text and --tokens\n");
        else usage(stderr);
        return 2;
    }
    int ctx = (int)ea.ctx;
    int32_t *tokens = NULL;
    int64_t n_tokens = 0;
    if (cli_eval_tokens("calibrate", model_path, ea.text, ea.tokens, &tokens, &n_tokens)) return 1;
    if (skip) {
        int64_t drop = (int64_t)skip * ctx;
        if (drop >= n_tokens) {
            fprintf(stderr, "qmix calibrate: --skip %ld windows of %d tokens leaves nothing of the "
                    "text's %lld tokens\n", skip, ctx, (long long)n_tokens);
            free(tokens);
            return 1;
        }
        memmove(tokens, tokens + drop, (size_t)(n_tokens - drop) * sizeof *tokens);
        n_tokens -= drop;
    }
    int n_windows = qmix_eval_n_windows(n_tokens, ctx, (int)ea.windows);
    if (n_windows < 1) {
        fprintf(stderr, "qmix calibrate: the text has %lld tokens, fewer than one window of --ctx "
                "%d\n", (long long)n_tokens, ctx);
        free(tokens);
        return 1;
    }

    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_calib_collector *col = NULL;
    FILE *f = NULL;
    char *tmp_path = NULL;
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = (int)ea.threads};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;

    /* bands of consecutive layers whose statistics fit --max-memory; the lm_head input rides
     * with the last band */
    uint64_t total = 0, head = qmix_calib_layer_bytes(cfg, -1, hessian);
    int band_lo[QMIX_MAX_LAYERS + 1], n_bands = 0;
    uint64_t cur = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        uint64_t b = qmix_calib_layer_bytes(cfg, l, hessian) + (l == cfg->n_layers - 1 ? head : 0);
        total += b;
        if (b > max_mem) {
            char hb[32], hm[32];
            cli_human_bytes((double)b, hb, sizeof hb);
            cli_human_bytes((double)max_mem, hm, sizeof hm);
            fprintf(stderr, "qmix calibrate: layer %d's statistics need %s, more than --max-memory "
                    "%s (raise it, or --no-hessian for the importance matrix only)\n", l, hb, hm);
            goto fail_quiet;
        }
        if (!n_bands || cur + b > max_mem) {
            band_lo[n_bands++] = l;
            cur = 0;
        }
        cur += b;
    }
    band_lo[n_bands] = cfg->n_layers;
    {
        char ht[32];
        cli_human_bytes((double)total, ht, sizeof ht);
        fprintf(stderr, "calibrate: %d windows x %d tokens, statistics %s (%s), %d pass%s over the "
                "text\n", n_windows, ctx, ht, hessian ? "Hessians + importance" : "importance",
                n_bands, n_bands == 1 ? "" : "es");
    }
    size_t pl = strlen(out_path) + 8;
    tmp_path = malloc(pl);
    if (!tmp_path) goto fail_quiet;
    snprintf(tmp_path, pl, "%s.tmp", out_path);
    f = fopen(tmp_path, "wb");
    if (!f) {
        fprintf(stderr, "qmix calibrate: %s: %s\n", tmp_path, strerror(errno));
        goto fail_quiet;
    }
    const char *dataset = ea.text ? ea.text : ea.tokens;
    qmix_calib_header h = {.hessian = hessian, .n_layers = cfg->n_layers,
                           .n_experts = cfg->n_experts, .n_entries = qmix_calib_total_entries(cfg),
                           .ctx = ctx, .n_windows = n_windows,
                           .n_tokens = (uint64_t)n_windows * (uint64_t)(ctx - 1), /* the last token of a window is not fed */
                           .dataset = dataset};
    if (qmix_calib_write_header(f, &h, &err)) goto fail;
    cli_catch_sigint();
    prog pr = {.t0 = cli_now(), .passes = n_bands, .total = (int64_t)n_windows * n_bands};
    int written = 0;
    for (int b = 0; b < n_bands; b++) {
        pr.pass = b;
        pr.done0 = (int64_t)b * n_windows;
        qmix_session_reset(sess);
        if (qmix_calib_collector_new(sess, band_lo[b], band_lo[b + 1], b == n_bands - 1, hessian,
                                     &col, &err))
            goto fail;
        int done = 0;
        int run = qmix_eval_windows(sess, tokens, ctx, n_windows, no_logits, NULL, on_progress,
                                    &pr, &cli_stop, &done, &err);
        if (run < 0) goto fail;
        if (run > 0) {
            cli_progress_end();
            fprintf(stderr, "qmix calibrate: stopped; no statistics written\n");
            goto fail_quiet;
        }
        int w = qmix_calib_write_records(f, col, &err);
        if (w < 0) goto fail;
        written += w;
        qmix_calib_collector_free(col);
        col = NULL;
    }
    cli_progress_end();
    if (written != h.n_entries) {
        fprintf(stderr, "qmix calibrate: wrote %d entries, expected %d\n", written, h.n_entries);
        goto fail_quiet;
    }
    int cl = fclose(f);
    f = NULL;
    if (cl || rename(tmp_path, out_path)) {
        fprintf(stderr, "qmix calibrate: cannot write %s: %s\n", out_path, strerror(errno));
        goto fail_quiet;
    }
    /* summary from the file just written (also proves it reads back) */
    qmix_calib *c;
    if (qmix_calib_open(out_path, &c, &err)) goto fail;
    int64_t n_exp = 0, n_zero = 0;
    uint64_t mn = UINT64_MAX, mx = 0;
    for (int i = 0; i < qmix_calib_count(c); i++) {
        const qmix_calib_entry *e = qmix_calib_at(c, i);
        if (e->kind != QMIX_CIN_EXPERT) continue;
        n_exp++;
        if (!e->n) n_zero++;
        if (e->n < mn) mn = e->n;
        if (e->n > mx) mx = e->n;
    }
    printf("calibrated %s on %llu tokens (%d windows x %d) -> %s\n", model_path,
           (unsigned long long)h.n_tokens, n_windows, ctx, out_path);
    printf("%d inputs; %lld routed experts: rows per expert %llu..%llu, %lld never routed; "
           "%.1f s\n", qmix_calib_count(c), (long long)n_exp, (unsigned long long)(n_exp ? mn : 0),
           (unsigned long long)mx, (long long)n_zero, cli_now() - pr.t0);
    if (imatrix_out) {
        if (qmix_imatrix_write(imatrix_out, c, cfg, ctx, &err)) {
            qmix_calib_close(c);
            goto fail;
        }
        printf("importance matrix -> %s\n", imatrix_out);
    }
    qmix_calib_close(c);
    rc = 0;
    goto done;
fail:
    cli_progress_end();
    fprintf(stderr, "qmix calibrate: %s\n", err.msg);
fail_quiet:
    if (f) {
        fclose(f);
        remove(tmp_path);
    }
done:
    qmix_calib_collector_free(col);
    free(tmp_path);
    qmix_session_free(sess);
    qmix_model_close(model);
    free(tokens);
    return rc;
}

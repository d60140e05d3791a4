/* qmix calibrate: the statistics calibrated quantization needs (src/quant/calib.h), collected by
 * running the model over calibration windows; optionally an llama.cpp importance matrix. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "eval/windows.h"
#include "kernels/kernels.h"
#include "model/forward.h"
#include "quant/calib.h"
#include "quant/fakequant.h"
#include "quant/imatrix.h"
#include "quant/recipe.h"
#include "runtime/session.h"
#include "util/err.h"

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
            "  --threads N         worker threads (default: all cores)\n\n"
            "Sequential scheme (as GPTQModel calibrates): the statistics of layer L are\n"
            "collected while layers 0..L-1 already run quantized as the recipe will quantize\n"
            "them, so later layers see the inputs the quantized model really produces:\n"
            "  --sequential        one pass over the text per layer (n_layers passes: about\n"
            "                      n_layers times the time of a plain run); after each pass the\n"
            "                      layer is quantized in memory from the statistics just\n"
            "                      collected and runs quantized from then on. Memory: one layer's\n"
            "                      statistics plus the quantized codes of the layers done.\n"
            "                      Embedding and lm_head stay unquantized; the lm_head input is\n"
            "                      collected in the last pass (every layer but the last quantized)\n"
            "  --recipe NAME|FILE  the recipe qmix quantize will use (required with --sequential)\n"
            "  --method rtn|gptq|imatrix  rules without method= (rtn); gptq and imatrix use the\n"
            "                      layer's statistics just collected, with qmix quantize's\n"
            "                      defaults (damping 0.01, RTN failsafe below 0.5%% of the tokens);\n"
            "                      awq rules are rounded to nearest here\n"
            "  --group-size G      override the recipe's group sizes (as qmix quantize's)\n"
            "  --act-order, --mlx-groups, --damp X, --min-tokens N|P%%\n"
            "                      GPTQ options as qmix quantize takes them: give the ones the\n"
            "                      quantize run will use, so the layers run as they will be\n");
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

typedef struct prog { double t0; int pass, passes, sequential; int64_t done0, total; } prog;

static void on_progress(void *user, int done, int total)
{
    prog *p = user;
    char label[48];
    snprintf(label, sizeof label, "calibrate %s%d/%d", p->sequential ? "layer " : "", p->pass + 1,
             p->passes);
    cli_progress(label, p->done0 + done, p->total, p->t0);
}

/* The residual stream of every calibration window between layer bands: a band starts from what
 * the previous one left instead of recomputing the layers before it, so a banded (or sequential)
 * run costs one pass over the layers, not one per band. ctx - 1 rows per window are fed. */
typedef struct stream {
    float *x;          /* [n_windows][ctx - 1][hidden] */
    float *tmp;        /* [chunk][hidden]: a chunk run without advancing the stream */
    float *logits;     /* [chunk][vocab]: the lm_head's output, only to feed its statistics */
    int ctx, n_windows, chunk;
} stream;

/* Layers [lo, hi) of every window (the collector, if any, attached to the session as its tap),
 * plus the lm_head when head; in the chunks qmix_eval_windows uses, so the floats are those of a
 * plain forward pass. advance: the stream then holds the output of layer hi - 1. Returns 0, 1 when
 * stopped, -1 with err. */
static int run_band(qmix_session *sess, stream *st, const int32_t *tokens, int lo, int hi,
                    int head, int advance, prog *pr, qmix_err *err)
{
    const qmix_model *m = sess->model;
    int64_t D = m->cfg.hidden_size, rows = st->ctx - 1;
    for (int w = 0; w < st->n_windows; w++) {
        float *xw = st->x + (int64_t)w * rows * D;
        if (lo == 0)
            for (int64_t t = 0; t < rows; t++) {
                int32_t id = tokens[(int64_t)w * st->ctx + t];
                if (id < 0 || id >= m->cfg.vocab_size)
                    return qmix_errf(err, "calibration token %lld is id %d, outside the vocabulary",
                                     (long long)((int64_t)w * st->ctx + t), id);
                qk_mat_row_f32(&m->embed, id, xw + t * D);
            }
        qmix_session_reset(sess);
        for (int64_t row0 = 0; row0 < rows; row0 += st->chunk) {
            if (cli_stop) return 1;
            int n = rows - row0 < st->chunk ? (int)(rows - row0) : st->chunk;
            for (int at = 0; at < n; at += sess->max_batch) { /* as qmix_session_prefill splits */
                int len = n - at < sess->max_batch ? n - at : sess->max_batch;
                float *x = xw + (row0 + at) * D;
                if (!advance) {
                    memcpy(st->tmp, x, (size_t)(len * D) * sizeof *x);
                    x = st->tmp;
                }
                qmix_forward_hidden(sess, lo, hi, x, len, head ? st->logits : NULL);
            }
        }
        if (pr) on_progress(pr, w + 1, st->n_windows);
    }
    return 0;
}

/* Sequential scheme: quantizes layer L in memory from the statistics just collected (col) as
 * the recipe asks and points the model at the copies, so the next passes run it quantized.
 * Reports the layer on stderr with the ETA of the remaining passes. */
static int quantize_layer(qmix_model *model, qmix_pool *pool, qmix_fq_set *set,
                          const qmix_recipe *recipe, int method, const qmix_gptq_opts *gptq,
                          int64_t min_tokens,
                          const qmix_calib_collector *col, int L, const prog *pr,
                          uint64_t *held, qmix_err *err)
{
    int n = qmix_fq_add_layer(set, model, recipe, L, method);
    if (n < 0) return qmix_errf(err, "out of memory");
    qmix_fq_opts fo = {.collector = col, .min_tokens = min_tokens, .gptq = *gptq};
    qmix_fq_counts cnt = {0};
    if (qmix_fq_quantize(set, pool, &fo, NULL, NULL, &cnt, err))
        return qmix_err_prefix(err, "quantizing layer %d", L);
    qmix_fq_install(set);
    *held += qmix_fq_bytes(set);
    double el = cli_now() - pr->t0, eta = el / (L + 1) * (pr->passes - L - 1);
    char hb[32];
    cli_human_bytes((double)*held, hb, sizeof hb);
    cli_progress_end();
    fprintf(stderr, "calibrate: layer %d/%d quantized: %d matrices (gptq %lld, imatrix %lld, rtn "
            "%lld; rtn failsafe: %lld too few rows, %lld no statistics, %lld not positive "
            "definite); %s of codes held; %.1f s elapsed, ETA %.1f s\n", L + 1, pr->passes, n,
            (long long)cnt.gptq, (long long)cnt.imatrix, (long long)cnt.rtn,
            (long long)cnt.fb_tokens, (long long)cnt.fb_nostats, (long long)cnt.fb_cholesky, hb,
            el, eta);
    return 0;
}

int qmix_cmd_calibrate(int argc, char **argv)
{
    const char *model_path = NULL, *out_path = NULL, *imatrix_out = NULL, *v;
    const char *recipe_name = NULL, *method_name = NULL;
    cli_eval_args ea = {.ctx = 512};
    int hessian = 1, sequential = 0, method = QMIX_METHOD_RTN, gptq_opts_given = 0;
    long group = 0;
    qmix_gptq_opts gptq = {0};
    double min_pct = -1;    /* the RTN failsafe: qmix quantize's default percentage */
    int64_t min_count = -1; /* or a count */
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
        } else if (!strcmp(a, "--sequential")) {
            sequential = 1;
        } else if (!strcmp(a, "--recipe")) {
            if (!(recipe_name = cli_value("calibrate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--method")) {
            if (!(method_name = cli_value("calibrate", argc, argv, &i))) return 2;
            method = qmix_method_parse(method_name);
            if (method != QMIX_METHOD_RTN && method != QMIX_METHOD_GPTQ &&
                method != QMIX_METHOD_IMATRIX) {
                fprintf(stderr, "qmix calibrate: --method must be rtn, gptq or imatrix, not "
                        "'%s'\n", method_name);
                return 2;
            }
        } else if (!strcmp(a, "--act-order")) {
            gptq.act_order = 1;
            gptq_opts_given = 1;
        } else if (!strcmp(a, "--mlx-groups")) {
            gptq.mlx_rule = 1;
            gptq_opts_given = 1;
        } else if (!strcmp(a, "--damp")) {
            if (!(v = cli_value("calibrate", argc, argv, &i)) ||
                cli_double("calibrate", a, v, &gptq.damp))
                return 2;
            if (!(gptq.damp > 0 && gptq.damp < 1)) {
                fprintf(stderr, "qmix calibrate: --damp must be in (0, 1)\n");
                return 2;
            }
            gptq_opts_given = 1;
        } else if (!strcmp(a, "--min-tokens")) {
            if (!(v = cli_value("calibrate", argc, argv, &i))) return 2;
            char *end;
            double x = strtod(v, &end);
            if (end == v || x < 0 || (*end && strcmp(end, "%")) || (!*end && x != floor(x))) {
                fprintf(stderr, "qmix calibrate: --min-tokens takes a count or a percentage "
                        "(0.5%%)\n");
                return 2;
            }
            if (*end) min_pct = x;
            else min_count = (int64_t)x;
            gptq_opts_given = 1;
        } else if (!strcmp(a, "--group-size")) {
            if (!(v = cli_value("calibrate", argc, argv, &i)) ||
                cli_int("calibrate", a, v, 32, 128, &group))
                return 2;
            if (group != 32 && group != 64 && group != 128) {
                fprintf(stderr, "qmix calibrate: --group-size must be 32, 64 or 128\n");
                return 2;
            }
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
        else cli_missing("calibrate", !model_path ? "MODEL" : "-o STATS");
        return 2;
    }
    if (sequential && !recipe_name) {
        fprintf(stderr, "qmix calibrate: --sequential needs --recipe NAME|FILE: the quantization "
                "the layers already calibrated run with (the one qmix quantize will use)\n");
        return 2;
    }
    if (!sequential && (recipe_name || method_name || group || gptq_opts_given)) {
        fprintf(stderr, "qmix calibrate: --recipe, --method, --group-size and the GPTQ options "
                "only apply with --sequential\n");
        return 2;
    }
    if (sequential && method == QMIX_METHOD_GPTQ && !hessian) {
        fprintf(stderr, "qmix calibrate: --method gptq needs the Hessians (drop --no-hessian)\n");
        return 2;
    }
    qmix_recipe recipe;
    qmix_err err;
    if (sequential) {
        if (qmix_recipe_get(recipe_name, &recipe, &err)) {
            fprintf(stderr, "qmix calibrate: %s\n", err.msg);
            return 1;
        }
        if (group) qmix_recipe_set_group(&recipe, (int)group);
        for (int r = 0; r < recipe.n_rules; r++)
            if (recipe.rules[r].bits && recipe.rules[r].method == QMIX_METHOD_GPTQ && !hessian) {
                fprintf(stderr, "qmix calibrate: recipe %s asks for gptq, which needs the "
                        "Hessians (drop --no-hessian)\n", recipe_name);
                return 2;
            }
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

    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_calib_collector *col = NULL;
    qmix_fq_set *layer_sets = NULL; /* sequential: the quantized copies, one set per layer */
    FILE *f = NULL;
    char *tmp_path = NULL;
    stream st = {0};
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = (int)ea.threads};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    if (sequential) {
        layer_sets = calloc((size_t)cfg->n_layers, sizeof *layer_sets);
        if (!layer_sets) {
            fprintf(stderr, "qmix calibrate: out of memory\n");
            goto fail_quiet;
        }
    }

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
        if (!n_bands || cur + b > max_mem || sequential) { /* sequential: a pass per layer */
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
                "text%s\n", n_windows, ctx, ht, hessian ? "Hessians + importance" : "importance",
                n_bands, n_bands == 1 ? "" : "es",
                sequential ? " (sequential: one per layer, earlier layers quantized)" : "");
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
    qmix_calib_header h = {.hessian = hessian, .sequential = sequential, .n_layers = cfg->n_layers,
                           .n_experts = cfg->n_experts, .n_entries = qmix_calib_total_entries(cfg),
                           .ctx = ctx, .n_windows = n_windows,
                           .n_tokens = (uint64_t)n_windows * (uint64_t)(ctx - 1), /* the last token of a window is not fed */
                           .dataset = dataset};
    if (qmix_calib_write_header(f, &h, &err)) goto fail;
    st.ctx = ctx;
    st.n_windows = n_windows;
    st.chunk = qmix_eval_chunk_rows(cfg->vocab_size);
    {
        int64_t per_call = st.chunk < sess->max_batch ? st.chunk : sess->max_batch;
        size_t stream_bytes = (size_t)n_windows * (size_t)(ctx - 1) * (size_t)cfg->hidden_size * 4;
        st.x = malloc(stream_bytes);
        st.tmp = malloc((size_t)per_call * (size_t)cfg->hidden_size * 4);
        st.logits = malloc((size_t)per_call * (size_t)cfg->vocab_size * 4);
        if (!st.x || !st.tmp || !st.logits) {
            char hb[32];
            cli_human_bytes((double)stream_bytes, hb, sizeof hb);
            fprintf(stderr, "qmix calibrate: out of memory for the residual stream of %d windows "
                    "(%s; use fewer --samples)\n", n_windows, hb);
            goto fail_quiet;
        }
    }
    cli_catch_sigint();
    prog pr = {.t0 = cli_now(), .passes = n_bands, .sequential = sequential,
               .total = (int64_t)n_windows * n_bands};
    /* the RTN failsafe threshold qmix quantize --calib derives from this file's token count */
    int64_t min_tokens = min_count >= 0 ? min_count
                                        : qmix_calib_failsafe_rows(h.n_tokens, min_pct);
    if (min_tokens < 1) min_tokens = 1;
    uint64_t held = 0;
    int written = 0;
    for (int b = 0; b < n_bands; b++) {
        pr.pass = b;
        pr.done0 = (int64_t)b * n_windows;
        qmix_session_reset(sess);
        if (qmix_calib_collector_new(sess, band_lo[b], band_lo[b + 1], b == n_bands - 1, hessian,
                                     &col, &err))
            goto fail;
        /* sequential: the stream advances only after the band's layer is quantized, below */
        int run = run_band(sess, &st, tokens, band_lo[b], band_lo[b + 1], b == n_bands - 1,
                           !sequential, &pr, &err);
        if (run < 0) goto fail;
        if (run > 0) {
            cli_progress_end();
            fprintf(stderr, "qmix calibrate: stopped; no statistics written\n");
            goto fail_quiet;
        }
        int w = qmix_calib_write_records(f, col, &err);
        if (w < 0) goto fail;
        written += w;
        /* the last layer's copy would feed nothing: the pass that needed it is the one just run */
        if (sequential && b + 1 < n_bands &&
            quantize_layer(model, sess->pool, &layer_sets[b], &recipe, method, &gptq, min_tokens,
                           col, b, &pr, &held, &err))
            goto fail;
        qmix_calib_collector_free(col);
        col = NULL;
        if (sequential && b + 1 < n_bands) { /* the stream through the quantized layer */
            run = run_band(sess, &st, tokens, band_lo[b], band_lo[b + 1], 0, 1, NULL, &err);
            if (run < 0) goto fail;
            if (run > 0) {
                cli_progress_end();
                fprintf(stderr, "qmix calibrate: stopped; no statistics written\n");
                goto fail_quiet;
            }
        }
    }
    cli_progress_end();
    if (written != h.n_entries) {
        fprintf(stderr, "qmix calibrate: wrote %d entries, expected %d\n", written, h.n_entries);
        goto fail_quiet;
    }
    /* on disk before the rename: a crash right after it must not leave an empty .qcal */
    int cl = fflush(f) || ferror(f) || fsync(fileno(f));
    cl |= fclose(f);
    f = NULL;
    if (cl || rename(tmp_path, out_path)) {
        remove(tmp_path);
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
    printf("calibrated %s on %llu tokens (%d windows x %d)%s -> %s\n", model_path,
           (unsigned long long)h.n_tokens, n_windows, ctx,
           sequential ? ", sequential" : "", out_path);
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
    free(st.x);
    free(st.tmp);
    free(st.logits);
    qmix_calib_collector_free(col);
    if (layer_sets)
        for (int l = 0; l < qmix_model_config(model)->n_layers; l++) qmix_fq_free(&layer_sets[l]);
    free(layer_sets);
    free(tmp_path);
    qmix_session_free(sess);
    qmix_model_close(model);
    free(tokens);
    return rc;
}

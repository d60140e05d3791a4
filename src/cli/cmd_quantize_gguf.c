/* `qmix quantize IN OUT.gguf --format gguf --recipe R [--imatrix F]`: a recipe's roles mapped onto
 * GGUF block types (spec/quant-formats.md §5, §6.5, §6.6), written with the converter's transforms
 * by qmix_gguf_export; then a summary of what was written and of what the recipe asked that GGUF
 * cannot express. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/quantize_budget.h"
#include "quant/gguf_mmproj.h"
#include "quant/ggml_blocks.h"
#include "quant/gguf_export.h"
#include "quant/imatrix.h"

static void types_str(uint64_t mask, char *buf, size_t len)
{
    size_t off = 0;
    buf[0] = 0;
    for (int t = 0; t < 64 && off < len; t++)
        if (mask & (1ull << t))
            off += (size_t)snprintf(buf + off, len - off, "%s%s", off ? "," : "",
                                    qmix_ggml_type_name(t));
}

int quantize_to_gguf(const char *in, const char *out, const qmix_recipe *r,
                     const qmix_quant_opts *o)
{
    /* refuse what the GGUF path would silently not do */
    if (o->method == QMIX_METHOD_GPTQ || o->method == QMIX_METHOD_AWQ) {
        fprintf(stderr, "qmix quantize: --format gguf supports --method rtn or imatrix (GPTQ and "
                "AWQ results do not map onto ggml blocks; write MLX or GPTQ for those)\n");
        return 2;
    }
    if (o->method == QMIX_METHOD_IMATRIX && !o->imatrix) {
        fprintf(stderr, "qmix quantize: --method imatrix needs --imatrix FILE\n");
        return 2;
    }
    if (o->calib) {
        fprintf(stderr, "qmix quantize: --format gguf does not use --calib statistics; give an "
                "importance matrix with --imatrix (qmix calibrate --imatrix-out F.gguf)\n");
        return 2;
    }
    qmix_gguf_export_report rep;
    qmix_gguf_export_opts g = {
        .recipe = r,
        .keep_type = o->dtype == QMIX_F16 ? QMIX_GGML_F16 : QMIX_GGML_BF16,
        .imatrix = o->imatrix,
        .progress = o->progress,
        .n_threads = o->n_threads,
        .report = &rep,
    };
    qmix_err err;
    if (qmix_gguf_export(in, out, &g, &err)) {
        fprintf(stderr, "qmix quantize: %s\n", err.msg);
        return 1;
    }
    char what[600];
    snprintf(what, sizeof what, "quantized %s -> %s (GGUF) with recipe %s", in, out, r->name);
    cli_print_gguf_report(what, &rep, o->imatrix != NULL);
    /* a vision tower goes beside, kept 16-bit, as llama.cpp's mmproj file */
    char mmproj[4096];
    int wrote_mmproj;
    qmix_mmproj_path_for(out, mmproj, sizeof mmproj);
    if (qmix_gguf_write_mmproj(in, mmproj, 0, &wrote_mmproj, &err)) {
        fprintf(stderr, "qmix quantize: the vision tower: %s\n", err.msg);
        return 1;
    }
    if (wrote_mmproj) printf("vision tower (F16, kept 16-bit) -> %s\n", mmproj);
    return 0;
}

void cli_print_gguf_report(const char *what, const qmix_gguf_export_report *rep, int imatrix)
{
    char hb[32], hr[32];
    cli_human_bytes((double)rep->bytes, hb, sizeof hb);
    cli_human_bytes((double)cli_peak_rss(), hr, sizeof hr);
    printf("%s\n", what);
    printf("bits per weight %.3f over all tensors, %s of tensor data, %d tensors, "
           "general.file_type %u; peak RSS %s\n",
           rep->params ? 8.0 * (double)rep->bytes / (double)rep->params : 0.0, hb, rep->n_tensors,
           rep->file_type, hr);
    if (imatrix)
        printf("imatrix: %lld matrices with importance-weighted scales, %lld without an entry\n",
               (long long)rep->n_imatrix, (long long)rep->n_no_imatrix);
    printf("\n%-20s %-22s %16s %12s %7s %6s\n", "role", "types", "parameters", "bytes", "share",
           "bpw");
    for (int i = 0; i < QMIX_ROLE_COUNT; i++) {
        const qmix_gguf_role_stat *s = &rep->roles[i];
        if (!s->tensors) continue;
        char ts[96], by[32];
        types_str(s->type_mask, ts, sizeof ts);
        cli_human_bytes((double)s->bytes, by, sizeof by);
        printf("%-20s %-22s %16llu %12s %6.2f%% %6.3f\n", qmix_role_name((qmix_role)i), ts,
               (unsigned long long)s->params, by,
               rep->bytes ? 100.0 * (double)s->bytes / (double)rep->bytes : 0.0,
               s->params ? 8.0 * (double)s->bytes / (double)s->params : 0.0);
    }
    if (rep->notes[0]) printf("\nnot expressible in GGUF:\n%s", rep->notes);
}

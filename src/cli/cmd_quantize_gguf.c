/* `qmix quantize IN OUT.gguf --format gguf --recipe R`: a recipe's roles mapped onto GGUF block
 * types (spec/quant-formats.md §5, §6.6), written with the converter's transforms. */
#include <stdio.h>

#include "cli/quantize_budget.h"
#include "quant/gguf_export.h"

int quantize_to_gguf(const char *in, const char *out, const qmix_recipe *r,
                     const qmix_quant_opts *o)
{
    (void)in, (void)out, (void)r, (void)o;
    fprintf(stderr, "qmix quantize: --format gguf is not implemented yet\n");
    return 1;
}

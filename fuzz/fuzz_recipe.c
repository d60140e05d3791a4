/* libFuzzer harness: recipe text (qmix quantize --recipe FILE). A parse fails with a message
 * naming the recipe or yields rules within their bounds. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant/recipe.h"

#define LABEL "fuzz-recipe"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0; /* the parser reads text: a NUL ends it early, as a file's would not */
    qmix_recipe r;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_recipe_parse(text, LABEL, &r, &err)) {
        if (!strstr(err.msg, LABEL)) __builtin_trap();
    } else if (r.n_rules < 0 || r.n_rules > QMIX_RECIPE_MAX_RULES) {
        __builtin_trap();
    }
    free(text);
    return 0;
}

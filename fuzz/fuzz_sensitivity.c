/* libFuzzer harness: a saved `qmix sensitivity --json` (qmix quantize --budget --sensitivity
 * FILE). A parse fails with a message naming the file or yields rows within range. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "eval/sens_json.h"
#include "model/roles.h"

#define LABEL "fuzz-sensitivity.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_sens_saved_row *rows = NULL;
    int n = 0, layers = 0, group = 0, method = 0, gguf = 0;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_sens_json_parse((const char *)data, size, LABEL, &rows, &n, &layers, &group, &method,
                             &gguf, &err)) {
        if (!strstr(err.msg, LABEL) && strcmp(err.msg, "out of memory")) __builtin_trap();
        if (n) __builtin_trap();
    }
    for (int i = 0; i < n; i++) {
        const qmix_sens_saved_row *r = &rows[i];
        if (r->role < 0 || r->role >= QMIX_ROLE_COUNT || r->layer < -1 ||
            r->layer >= QMIX_MAX_LAYERS || r->params <= 0 || r->params_measured < 0 ||
            r->params_measured > r->params)
            __builtin_trap();
        for (int b = 0; b < 9; b++)
            if (!isnan(r->kld[b]) && !isfinite(r->kld[b])) __builtin_trap();
    }
    free(rows);
    return 0;
}

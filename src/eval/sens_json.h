/* Reading back `qmix sensitivity --json` output (qmix quantize --budget --sensitivity FILE): one
 * row per tensor role (and layer band), the KLD it adds at each bit width. The file comes from
 * the user, so every field is checked. */
#ifndef QMIX_EVAL_SENS_JSON_H
#define QMIX_EVAL_SENS_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

typedef struct qmix_sens_saved_row {
    int role, layer;                 /* layer -1: all layers; else 0 .. QMIX_MAX_LAYERS-1 */
    int group, method;               /* the group size and method it was measured with */
    int64_t params, params_measured; /* measured < params: experts were sampled */
    int quantizable;
    double kld[9];                   /* by bits; NAN where not measured */
} qmix_sens_saved_row;

/* Appends the rows of one file's text to *rows (realloc'd, *n rows); *group and *method: what it
 * was measured with (group 32/64/128; rtn, gptq or imatrix); *gguf: 1 when it was measured with
 * GGUF blocks ("format": "gguf"); *layers_seen set when a row names a layer. Errors name label
 * and say what is wrong. */
int qmix_sens_json_parse(const char *text, size_t len, const char *label, qmix_sens_saved_row **rows,
                         int *n, int *layers_seen, int *group, int *method, int *gguf,
                         qmix_err *err);

#endif

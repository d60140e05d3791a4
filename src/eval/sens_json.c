#include "eval/sens_json.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/roles.h"
#include "quant/recipe.h"
#include "util/err.h"

static int role_by_name(const char *name)
{
    for (int r = 0; r < QMIX_ROLE_COUNT; r++)
        if (!strcmp(qmix_role_name((qmix_role)r), name)) return r;
    return -1;
}

int qmix_sens_json_parse(const char *text, size_t len, const char *label, qmix_sens_saved_row **rows,
                         int *n, int *layers_seen, int *group, int *method, int *gguf,
                         qmix_err *err)
{
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) return qmix_errf(err, "%s:%d: %s", label, je.line, je.text);
    json_t *arr = json_object_get(root, "rows"), *gs = json_object_get(root, "group_size");
    const char *m = json_string_value(json_object_get(root, "method"));
    const char *format = json_string_value(json_object_get(root, "format"));
    int is_gguf = format && !strcmp(format, "gguf");
    size_t count = json_array_size(arr);
    json_int_t g = json_is_integer(gs) ? json_integer_value(gs) : 64;
    int meth = m ? qmix_method_parse(m) : QMIX_METHOD_RTN; /* older files: RTN */
    const char *why = !json_is_object(root) || !json_is_array(arr) ? "no \"rows\" array"
                      : g != 32 && g != 64 && g != 128         ? "group_size not 32, 64 or 128"
                      : meth != QMIX_METHOD_RTN && meth != QMIX_METHOD_GPTQ &&
                              meth != QMIX_METHOD_IMATRIX
                          ? "method not rtn, gptq or imatrix"
                      : count > (size_t)(1 << 20) ? "more than 2^20 rows"
                                                  : NULL;
    qmix_sens_saved_row *grown = why ? NULL : realloc(*rows, (*n + count + 1) * sizeof **rows);
    if (!why && !grown) {
        json_decref(root);
        return qmix_errf(err, "out of memory");
    }
    if (grown) *rows = grown;
    int added = 0;
    for (size_t i = 0; !why && i < count; i++) {
        json_t *o = json_array_get(arr, i), *bits = json_object_get(o, "bits");
        const char *role = json_string_value(json_object_get(o, "role"));
        qmix_sens_saved_row *s = &(*rows)[*n + added];
        memset(s, 0, sizeof *s);
        s->group = (int)g;
        s->method = meth;
        s->role = role ? role_by_name(role) : -1;
        json_t *layer = json_object_get(o, "layer");
        json_int_t li = json_is_integer(layer) ? json_integer_value(layer) : -1;
        json_t *p = json_object_get(o, "params"), *pm = json_object_get(o, "params_measured");
        s->params = json_is_integer(p) ? json_integer_value(p) : 0;
        s->params_measured = json_is_integer(pm) ? json_integer_value(pm) : s->params;
        s->quantizable = json_is_true(json_object_get(o, "quantizable"));
        if (s->role < 0 || !json_is_object(bits) || s->params <= 0 ||
            (int64_t)s->params > ((int64_t)1 << 50)) {
            why = "a row without a known role, params or bits";
            break;
        }
        if (li < -1 || li >= QMIX_MAX_LAYERS || s->params_measured < 0 ||
            s->params_measured > s->params) {
            why = "a row with a layer or params_measured out of range";
            break;
        }
        s->layer = (int)li;
        for (int b = 0; b < 9; b++) s->kld[b] = NAN;
        const char *key;
        json_t *cell;
        json_object_foreach(bits, key, cell) {
            int b = atoi(key);
            json_t *k = json_object_get(cell, "kld");
            double v = json_is_number(k) ? json_number_value(k) : NAN;
            if (b >= 2 && b <= 8 && isfinite(v)) s->kld[b] = v;
        }
        added++;
    }
    json_decref(root);
    if (why)
        return qmix_errf(err, "%s: %s (expected `qmix sensitivity --json` output)", label, why);
    for (int i = 0; i < added; i++)
        if ((*rows)[*n + i].layer >= 0) *layers_seen = 1;
    *n += added;
    *group = (int)g;
    *method = meth;
    *gguf = is_gguf;
    return 0;
}

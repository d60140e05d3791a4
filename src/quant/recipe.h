/* Quantization recipes: rules mapping tensor roles (optionally restricted by layer selectors) to
 * {bits, group size} or "keep". The text format is documented in docs/recipes.md; the built-in
 * presets reproduce spec/quant-formats.md §6. Later rules override earlier ones. */
#ifndef QMIX_QUANT_RECIPE_H
#define QMIX_QUANT_RECIPE_H

#include <stdint.h>

#include "model/roles.h"
#include "qmix.h"

enum { QMIX_LAYERS_ANY = 0, QMIX_LAYERS_FULL = 1, QMIX_LAYERS_LINEAR = 2 };

/* How a quantized tensor's codes are chosen (method=... in a rule; DEFAULT: the run's --method). */
enum { QMIX_METHOD_DEFAULT = 0, QMIX_METHOD_RTN, QMIX_METHOD_GPTQ, QMIX_METHOD_IMATRIX,
       QMIX_METHOD_AWQ };
/* "rtn", "gptq", "imatrix", "awq" (DEFAULT: "default"), and back (-1 if unknown). */
const char *qmix_method_name(int method);
int qmix_method_parse(const char *name);

typedef struct qmix_recipe_rule {
    uint32_t roles;          /* bit r set: applies to role r */
    int lo, hi;              /* layers=lo-hi (inclusive); lo = -1: no range */
    int first, last;         /* first=N / last=N (union of the two when both given); 0 = unset */
    int type;                /* QMIX_LAYERS_* */
    char match[64];          /* match=SUBSTRING of the tensor name; "" = any */
    int bits, group;         /* bits 0: keep unquantized */
    int method;              /* QMIX_METHOD_* */
} qmix_recipe_rule;

/* Enough for a per-role × per-layer-band allocation (qmix quantize --budget). */
#define QMIX_RECIPE_MAX_RULES 256

typedef struct qmix_recipe {
    char name[64];
    int n_rules;
    qmix_recipe_rule rules[QMIX_RECIPE_MAX_RULES];
} qmix_recipe;

typedef struct qmix_qdecision {
    qmix_role role;
    int bits, group;         /* bits 0: stored unquantized */
    int method;              /* QMIX_METHOD_* of the deciding rule */
} qmix_qdecision;

/* Parses recipe text; errors read "recipe LABEL:LINE: ...". */
int qmix_recipe_parse(const char *text, const char *label, qmix_recipe *out, qmix_err *err);
int qmix_recipe_load(const char *path, qmix_recipe *out, qmix_err *err);
/* A built-in preset by name; -1 with an error listing the names if unknown. */
int qmix_recipe_preset(const char *name, qmix_recipe *out, qmix_err *err);
/* NAME of a preset, or else a recipe file. */
int qmix_recipe_get(const char *name_or_file, qmix_recipe *out, qmix_err *err);
/* Preset names, NULL-terminated; and the text of one. */
extern const char *const qmix_recipe_preset_names[];
const char *qmix_recipe_preset_text(const char *name);
const char *qmix_recipe_preset_summary(const char *name);

/* Replaces the group size of every quantizing rule (the --group-size override). */
void qmix_recipe_set_group(qmix_recipe *r, int group);

/* Decision for one tensor (its name in HF or MLX form), shape, its layer's type and the model's
 * layer count. Only 2-D tensors (3-D for routed experts) whose last dimension is divisible by the
 * group size are quantized; norms, GDN parameters, 1-D tensors always kept. */
qmix_qdecision qmix_recipe_resolve(const qmix_recipe *r, const char *name, int ndim,
                                   const int64_t *shape, int layer_is_full, int n_layers);

#endif

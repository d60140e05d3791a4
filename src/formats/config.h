/* config.json of Qwen3.5-MoE checkpoints: text settings nested in text_config (the released
 * multimodal form) or flat (text-only form). Missing required fields are errors naming the key. */
#ifndef QMIX_FORMATS_CONFIG_H
#define QMIX_FORMATS_CONFIG_H

#include <stddef.h>

#include "qmix.h"

int qmix_config_load(const char *path, qmix_config *cfg, qmix_err *err);
/* label names the source in errors. */
int qmix_config_parse(const char *text, size_t len, const char *label, qmix_config *cfg,
                      qmix_err *err);

/* generation_config.json: end-of-generation ids and the sampling defaults the model ships. */
#define QMIX_MAX_EOS 8
typedef struct qmix_generation_config {
    int n_eos;
    int eos[QMIX_MAX_EOS];
    int has_temperature, has_top_p, has_top_k;
    double temperature, top_p;
    int top_k;
} qmix_generation_config;

/* A missing file is not an error (everything stays unset); a malformed one is. */
int qmix_generation_config_load(const char *model_dir, qmix_generation_config *out,
                                qmix_err *err);

#endif

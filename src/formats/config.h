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

#endif

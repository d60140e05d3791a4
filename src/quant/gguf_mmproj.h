/* The vision tower as llama.cpp's separate multimodal projector GGUF ("mmproj", projector type
 * qwen3vl_merger: v.* tower tensors, mm.* merger), written beside a text GGUF. */
#ifndef QMIX_QUANT_GGUF_MMPROJ_H
#define QMIX_QUANT_GGUF_MMPROJ_H

#include <stddef.h>

#include "qmix.h"

/* The mmproj path for a text GGUF path: "DIR/mmproj-NAME" (llama.cpp's naming). */
void qmix_mmproj_path_for(const char *gguf_path, char *out, size_t len);

/* Writes in's vision tower to out: matrices F16 (F32 when f32), vectors and the position table
 * F32. Returns 0 with *written = 0 when in has no tower. */
int qmix_gguf_write_mmproj(const char *in, const char *out, int f32, int *written, qmix_err *err);

#endif

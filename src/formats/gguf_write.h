/* Streaming GGUF v3 writer (spec/quant-formats.md §5.1). KVs and tensor infos are declared first
 * (the header holds every tensor's offset), then each tensor's bytes are streamed in declaration
 * order, in chunks of any size; the writer pads each tensor to the alignment. Memory use is the
 * header (tokenizer arrays included) plus stdio's buffer, never a tensor.
 *
 *     qmix_ggw *w = qmix_ggw_new();
 *     qmix_ggw_kv_str(w, "general.architecture", "qwen35moe"); ...
 *     qmix_ggw_tensor(w, name, type, n_dims, ne); ...
 *     if (qmix_ggw_open(w, path, err)) ...;            // writes the header
 *     for each tensor: qmix_ggw_write(w, bytes, n, err)*;
 *     if (qmix_ggw_close(w, err)) ...;                  // frees w; removes the file on failure
 *
 * Declaration calls record an error (out of memory, bad key) that qmix_ggw_open reports. */
#ifndef QMIX_FORMATS_GGUF_WRITE_H
#define QMIX_FORMATS_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

typedef struct qmix_ggw qmix_ggw;

qmix_ggw *qmix_ggw_new(void);
void qmix_ggw_kv_u32(qmix_ggw *w, const char *key, uint32_t v);
void qmix_ggw_kv_i32(qmix_ggw *w, const char *key, int32_t v);
void qmix_ggw_kv_f32(qmix_ggw *w, const char *key, float v);
void qmix_ggw_kv_bool(qmix_ggw *w, const char *key, int v);
void qmix_ggw_kv_str(qmix_ggw *w, const char *key, const char *s);
void qmix_ggw_kv_strn(qmix_ggw *w, const char *key, const char *s, size_t len);
/* Array of n numeric elements of GGUF type elem_type, given as little-endian bytes. */
void qmix_ggw_kv_arr(qmix_ggw *w, const char *key, int elem_type, uint64_t n, const void *elems);
/* Array of n strings: begin, then exactly n qmix_ggw_arr_str calls. */
void qmix_ggw_kv_arr_str_begin(qmix_ggw *w, const char *key, uint64_t n);
void qmix_ggw_arr_str(qmix_ggw *w, const char *s, size_t len);
/* Declares the next tensor (ne[0] innermost). */
void qmix_ggw_tensor(qmix_ggw *w, const char *name, int ggml_type, int n_dims, const int64_t *ne);

int qmix_ggw_open(qmix_ggw *w, const char *path, qmix_err *err);
/* Appends bytes to the current tensor, moving on to the next when one is complete. */
int qmix_ggw_write(qmix_ggw *w, const void *data, size_t len, qmix_err *err);
/* Checks every tensor is complete, flushes, closes and frees w. */
int qmix_ggw_close(qmix_ggw *w, qmix_err *err);
/* Abandons: removes the partial file (if opened) and frees w. NULL is a no-op. */
void qmix_ggw_discard(qmix_ggw *w);

#endif

/* Streaming safetensors writer: all tensors are declared up front (so the header and every
 * offset are known before the first data byte), then each tensor's bytes are streamed in
 * declaration order, in chunks of any size. Memory use is one I/O buffer, never a tensor.
 *
 *     qmix_stw *w;
 *     if (qmix_stw_open(path, specs, n, meta, n_meta, &w, err)) return -1;
 *     for each tensor i:  qmix_stw_begin(w, specs[i].name, err);  qmix_stw_write(w, ...)*;
 *     if (qmix_stw_close(w, err)) ...;   // or qmix_stw_discard(w) after an error
 *
 * Every error message names the file (and tensor where there is one). */
#ifndef QMIX_FORMATS_SAFETENSORS_WRITE_H
#define QMIX_FORMATS_SAFETENSORS_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "formats/safetensors.h"
#include "qmix.h"

/* The writer's I/O buffer: large enough that syscall overhead vanishes, small enough not to
 * matter for peak memory. Chunks at least this big are written straight through, uncopied. */
#define QMIX_STW_BUF_BYTES ((size_t)4 << 20)

typedef struct qmix_stw_tensor {
    const char *name;
    qmix_dtype dtype;
    int ndim;                       /* 0 (a scalar) .. QMIX_MAX_DIMS */
    int64_t shape[QMIX_MAX_DIMS];
} qmix_stw_tensor;

/* One __metadata__ entry; safetensors allows only string values. */
typedef struct qmix_stw_kv {
    const char *key;
    const char *value;
} qmix_stw_kv;

typedef struct qmix_stw qmix_stw;

/* Bytes a declared tensor occupies; 0 with an error on overflow or a bad dtype/shape. */
int qmix_stw_tensor_nbytes(const qmix_stw_tensor *t, uint64_t *nbytes, qmix_err *err);

/* Size in bytes of the file these tensors and metadata would produce (8 + header + data), without
 * writing anything: lets a caller plan shards exactly. */
int qmix_stw_file_size(const qmix_stw_tensor *tensors, size_t n_tensors, const qmix_stw_kv *meta,
                       size_t n_meta, uint64_t *size, qmix_err *err);

/* Creates (truncating) path and writes the header. The tensor array and names are copied. */
int qmix_stw_open(const char *path, const qmix_stw_tensor *tensors, size_t n_tensors,
                  const qmix_stw_kv *meta, size_t n_meta, qmix_stw **out, qmix_err *err);
/* Starts the next declared tensor; name must match it (catches callers that lost their place),
 * and the previous tensor must have received exactly its declared byte count. */
int qmix_stw_begin(qmix_stw *w, const char *name, qmix_err *err);
/* Appends bytes to the current tensor; writing past its declared size is an error. */
int qmix_stw_write(qmix_stw *w, const void *data, size_t len, qmix_err *err);
/* Checks every tensor is complete, flushes and closes. The writer is freed either way; on failure
 * the partial file is removed. */
int qmix_stw_close(qmix_stw *w, qmix_err *err);
/* Abandons the file: closes it, removes it, frees the writer. NULL is a no-op. */
void qmix_stw_discard(qmix_stw *w);

/* Bytes written so far, header included (for progress reports). */
uint64_t qmix_stw_bytes_written(const qmix_stw *w);
const char *qmix_stw_path(const qmix_stw *w);

/* Writes a sharded checkpoint's model.safetensors.index.json:
 * {"metadata": {"total_parameters": P, "total_size": S}, "weight_map": {name: file, ...}}
 * total_size is the sum of tensor bytes (not file sizes), as in Hugging Face's indexes. Keys are
 * sorted like the released files; a duplicate name is an error. */
int qmix_st_write_index(const char *path, uint64_t total_size, uint64_t total_parameters,
                        const char *const *names, const char *const *files, size_t n,
                        qmix_err *err);

#endif

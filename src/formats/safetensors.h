/* safetensors reader: single files and sharded checkpoints (model.safetensors.index.json),
 * mmapped, zero-copy. Headers are untrusted and validated in full; lookups are O(1). */
#ifndef QMIX_FORMATS_SAFETENSORS_H
#define QMIX_FORMATS_SAFETENSORS_H

#include <stdint.h>

#include "qmix.h"

#define QMIX_MAX_DIMS 8
/* The safetensors format caps its JSON header at 100 MB. */
#define QMIX_ST_MAX_HEADER (100u * 1000u * 1000u)

typedef struct qmix_tensor {
    const char *name;
    qmix_dtype dtype;
    int ndim;
    int64_t shape[QMIX_MAX_DIMS];
    const void *data;       /* inside the mmapped file; may be unaligned for its dtype */
    uint64_t nbytes;
    int file;               /* index into the store's file list */
} qmix_tensor;

typedef struct qmix_st_store qmix_st_store;

/* path: a .safetensors file, a model.safetensors.index.json, or a directory holding one of
 * them (the index wins). */
int qmix_st_open(const char *path, qmix_st_store **out, qmix_err *err);
/* Parses a whole safetensors file image already in memory (borrowed, must outlive the store).
 * label names it in errors. Used by tests and fuzzers. */
int qmix_st_open_memory(const void *buf, uint64_t len, const char *label, qmix_st_store **out,
                        qmix_err *err);
void qmix_st_close(qmix_st_store *store);

const qmix_tensor *qmix_st_find(const qmix_st_store *store, const char *name);
/* count, at and file_count accept NULL (no tensors, no files): a GGUF model has no store. */
uint64_t qmix_st_count(const qmix_st_store *store);
const qmix_tensor *qmix_st_at(const qmix_st_store *store, uint64_t index);
int qmix_st_file_count(const qmix_st_store *store);
const char *qmix_st_file_path(const qmix_st_store *store, int file);
/* The file's __metadata__ value for key, or NULL. */
const char *qmix_st_metadata(const qmix_st_store *store, int file, const char *key);

qmix_dtype qmix_dtype_from_st_name(const char *name); /* "BF16" -> QMIX_BF16; unknown -> 0 */
const char *qmix_dtype_st_name(qmix_dtype dtype);     /* QMIX_BF16 -> "BF16" */

#endif

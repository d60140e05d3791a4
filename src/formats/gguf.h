/* GGUF v3 reader (spec/quant-formats.md §5.1): single files and split sets
 * (NAME-00001-of-000NN.gguf), mmapped, zero-copy. Every header is untrusted: counts, string and
 * array lengths, types, dims, offsets and sizes are checked (every §5.1 rule) before anything is
 * handed out, and loading is linear in the number of KVs and tensors. */
#ifndef QMIX_FORMATS_GGUF_H
#define QMIX_FORMATS_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* KV value types (§5.1). */
enum {
    QMIX_GGUF_U8 = 0, QMIX_GGUF_I8, QMIX_GGUF_U16, QMIX_GGUF_I16, QMIX_GGUF_U32, QMIX_GGUF_I32,
    QMIX_GGUF_F32, QMIX_GGUF_BOOL, QMIX_GGUF_STRING, QMIX_GGUF_ARRAY, QMIX_GGUF_U64,
    QMIX_GGUF_I64, QMIX_GGUF_F64, QMIX_GGUF_NTYPES
};

#define QMIX_GGUF_MAX_NAME 64     /* tensor names are shorter than this (ggml's limit) */
#define QMIX_GGUF_DEFAULT_ALIGN 32

typedef struct qmix_gguf_tensor {
    const char *name;
    int type;               /* ggml type id (quant/ggml_blocks.h) */
    int n_dims;             /* 1…4 */
    int64_t ne[4];          /* ne[0] innermost; unused dims are 1 */
    const void *data;       /* inside the mapping; aligned to the file's alignment */
    uint64_t nbytes;
    int file;               /* shard index */
} qmix_gguf_tensor;

typedef struct qmix_gguf_kv {
    const char *key;
    int type;               /* QMIX_GGUF_* */
    int arr_type;           /* element type when type is ARRAY */
    uint64_t arr_n;         /* element count when type is ARRAY */
    const uint8_t *data;    /* the value (array: its first element; string: its length field) */
} qmix_gguf_kv;

typedef struct qmix_gguf qmix_gguf;

/* path: a .gguf file, or any shard of a split set (all shards are opened). */
int qmix_gguf_open(const char *path, qmix_gguf **out, qmix_err *err);
/* Parses one GGUF image already in memory (borrowed); label names it in errors. For tests and
 * fuzzers. */
int qmix_gguf_open_memory(const void *buf, uint64_t len, const char *label, qmix_gguf **out,
                          qmix_err *err);
void qmix_gguf_close(qmix_gguf *g);

uint64_t qmix_gguf_tensor_count(const qmix_gguf *g);
const qmix_gguf_tensor *qmix_gguf_tensor_at(const qmix_gguf *g, uint64_t i);
const qmix_gguf_tensor *qmix_gguf_find(const qmix_gguf *g, const char *name);
int qmix_gguf_file_count(const qmix_gguf *g);
const char *qmix_gguf_file_path(const qmix_gguf *g, int file);

/* Model KVs (those of the first shard). */
uint64_t qmix_gguf_kv_count(const qmix_gguf *g);
const qmix_gguf_kv *qmix_gguf_kv_at(const qmix_gguf *g, uint64_t i);
const qmix_gguf_kv *qmix_gguf_kv_find(const qmix_gguf *g, const char *key);

/* Typed reads. Each returns 1 if found and converted, 0 if absent, -1 (with err naming the key)
 * if present with an unusable type or value. get_int accepts any integer or bool type that
 * fits; get_float any float or integer type; get_str gives a pointer into the mapping (not
 * NUL-terminated). */
int qmix_gguf_get_int(const qmix_gguf *g, const char *key, int64_t *out, qmix_err *err);
int qmix_gguf_get_float(const qmix_gguf *g, const char *key, double *out, qmix_err *err);
int qmix_gguf_get_str(const qmix_gguf *g, const char *key, const char **s, uint64_t *len,
                      qmix_err *err);
/* Element i of a numeric array KV as int64 (integer and bool elements) or double. */
int64_t qmix_gguf_arr_int(const qmix_gguf_kv *kv, uint64_t i);
double qmix_gguf_arr_float(const qmix_gguf_kv *kv, uint64_t i);
/* Walks a string array (validated at open): *cursor starts at kv->data; each call gives the next
 * string and advances. */
void qmix_gguf_arr_str_next(const uint8_t **cursor, const char **s, uint64_t *len);

const char *qmix_gguf_type_name(int kv_type);

#endif

/* safetensors reader. The header is attacker-controlled: every offset, size, shape and dtype is
 * checked before a pointer into the mapping is handed out. */
#include "formats/safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/err.h"
#include "util/fileio.h"

static const struct {
    const char *name;
    qmix_dtype dtype;
    size_t size;
} dtype_table[] = {
    {"F32", QMIX_F32, 4},  {"F16", QMIX_F16, 2},   {"BF16", QMIX_BF16, 2}, {"U32", QMIX_U32, 4},
    {"I32", QMIX_I32, 4},  {"U8", QMIX_U8, 1},     {"I8", QMIX_I8, 1},     {"I64", QMIX_I64, 8},
    {"U16", QMIX_U16, 2},  {"I16", QMIX_I16, 2},   {"F64", QMIX_F64, 8},   {"BOOL", QMIX_BOOL, 1},
};
#define N_DTYPES (sizeof dtype_table / sizeof dtype_table[0])

qmix_dtype qmix_dtype_from_st_name(const char *name)
{
    for (size_t i = 0; i < N_DTYPES; i++)
        if (!strcmp(dtype_table[i].name, name)) return dtype_table[i].dtype;
    return QMIX_DTYPE_UNKNOWN;
}

const char *qmix_dtype_st_name(qmix_dtype dtype)
{
    for (size_t i = 0; i < N_DTYPES; i++)
        if (dtype_table[i].dtype == dtype) return dtype_table[i].name;
    return "UNKNOWN";
}

const char *qmix_dtype_name(qmix_dtype dtype)
{
    static const char *lower[] = {"unknown", "f32", "f16", "bf16", "u32", "i32", "u8",
                                  "i8",      "i64", "u16", "i16",  "f64", "bool"};
    return (unsigned)dtype < QMIX_DTYPE_COUNT ? lower[dtype] : "unknown";
}

size_t qmix_dtype_size(qmix_dtype dtype)
{
    for (size_t i = 0; i < N_DTYPES; i++)
        if (dtype_table[i].dtype == dtype) return dtype_table[i].size;
    return 0;
}

typedef struct st_file {
    char *path;
    const uint8_t *map;     /* whole file; NULL for memory images */
    uint64_t size;
    json_t *metadata;       /* __metadata__ object or NULL */
} st_file;

struct qmix_st_store {
    st_file *files;
    int n_files;
    qmix_tensor *tensors;
    uint64_t n_tensors, cap_tensors;
    char **name_blocks;     /* names are owned here (jansson strings die with their document) */
    uint64_t n_name_blocks, cap_name_blocks;
    uint64_t *slots;        /* open-addressing table of tensor index + 1; 0 = empty */
    uint64_t n_slots;
};

static uint64_t hash_name(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static const qmix_tensor *table_lookup(const qmix_st_store *st, const char *name)
{
    if (!st->n_slots) return NULL;
    for (uint64_t i = hash_name(name) & (st->n_slots - 1);; i = (i + 1) & (st->n_slots - 1)) {
        uint64_t slot = st->slots[i];
        if (!slot) return NULL;
        if (!strcmp(st->tensors[slot - 1].name, name)) return &st->tensors[slot - 1];
    }
}

/* Built once after all files are parsed, so loading is linear in the number of tensors. */
static int table_build(qmix_st_store *st, qmix_err *err)
{
    uint64_t n = 16;
    while (n < st->n_tensors * 2) n <<= 1;
    st->slots = calloc(n, sizeof *st->slots);
    if (!st->slots) return qmix_errf(err, "out of memory for a %llu-tensor index",
                                     (unsigned long long)st->n_tensors);
    st->n_slots = n;
    for (uint64_t t = 0; t < st->n_tensors; t++) {
        const char *name = st->tensors[t].name;
        uint64_t i = hash_name(name) & (n - 1);
        for (; st->slots[i]; i = (i + 1) & (n - 1)) {
            const qmix_tensor *other = &st->tensors[st->slots[i] - 1];
            if (!strcmp(other->name, name))
                return qmix_errf(err, "tensor '%s' appears twice (in %s and %s)", name,
                                 st->files[other->file].path, st->files[st->tensors[t].file].path);
        }
        st->slots[i] = t + 1;
    }
    return 0;
}

static int push_tensor(qmix_st_store *st, qmix_tensor **out)
{
    if (st->n_tensors == st->cap_tensors) {
        uint64_t cap = st->cap_tensors ? st->cap_tensors * 2 : 256;
        qmix_tensor *grown = realloc(st->tensors, cap * sizeof *grown);
        if (!grown) return -1;
        st->tensors = grown;
        st->cap_tensors = cap;
    }
    *out = &st->tensors[st->n_tensors++];
    return 0;
}

typedef struct span { uint64_t begin, end, tensor; } span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

static int parse_shape(json_t *shape, qmix_tensor *t, const char *file, qmix_err *err)
{
    if (!json_is_array(shape))
        return qmix_errf(err, "%s: tensor '%s': shape is not an array", file, t->name);
    size_t nd = json_array_size(shape);
    if (nd > QMIX_MAX_DIMS)
        return qmix_errf(err, "%s: tensor '%s': %zu dimensions (at most %d supported)", file,
                         t->name, nd, QMIX_MAX_DIMS);
    t->ndim = (int)nd;
    for (size_t d = 0; d < nd; d++) {
        json_t *dim = json_array_get(shape, d);
        if (!json_is_integer(dim) || json_integer_value(dim) < 0)
            return qmix_errf(err, "%s: tensor '%s': shape[%zu] is not a non-negative integer",
                             file, t->name, d);
        t->shape[d] = json_integer_value(dim);
    }
    return 0;
}

/* Element count × dtype size, refusing anything that overflows 64 bits. */
static int expected_bytes(const qmix_tensor *t, uint64_t *out)
{
    uint64_t n = qmix_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) {
        uint64_t dim = (uint64_t)t->shape[d];
        if (dim && n > UINT64_MAX / dim) return -1;
        n *= dim;
    }
    *out = n;
    return 0;
}

static int parse_offsets(json_t *offs, uint64_t *begin, uint64_t *end)
{
    if (!json_is_array(offs) || json_array_size(offs) != 2) return -1;
    json_t *b = json_array_get(offs, 0), *e = json_array_get(offs, 1);
    if (!json_is_integer(b) || !json_is_integer(e)) return -1;
    if (json_integer_value(b) < 0 || json_integer_value(e) < 0) return -1;
    *begin = (uint64_t)json_integer_value(b);
    *end = (uint64_t)json_integer_value(e);
    return *begin <= *end ? 0 : -1;
}

static int keep_name(qmix_st_store *st, const char *name, const char **out)
{
    size_t len = strlen(name) + 1;
    if (st->n_name_blocks == st->cap_name_blocks) {
        /* geometric growth: growing by one each time is quadratic where realloc copies */
        uint64_t cap = st->cap_name_blocks ? st->cap_name_blocks * 2 : 256;
        char **grown = realloc(st->name_blocks, cap * sizeof *grown);
        if (!grown) return -1;
        st->name_blocks = grown;
        st->cap_name_blocks = cap;
    }
    char *copy = malloc(len);
    if (!copy) return -1;
    memcpy(copy, name, len);
    st->name_blocks[st->n_name_blocks++] = copy;
    *out = copy;
    return 0;
}

/* jansson names a duplicate key in its message only when the key is short; tensor names are long.
 * The error position is just past the repeated key: decode the JSON string that ends there. */
static int duplicate_key_at(const char *text, size_t len, int position, char *out, size_t cap)
{
    if (position <= 0 || (size_t)position > len) return -1;
    size_t close = (size_t)position - 1;
    while (close > 0 && text[close] && strchr(" \t\r\n", text[close])) close--;
    if (text[close] != '"') return -1;
    size_t open = close;
    for (;;) { /* the nearest quote before it not escaped by an odd run of backslashes */
        if (open == 0) return -1;
        if (text[--open] != '"') continue;
        size_t bs = 0;
        while (bs < open && text[open - 1 - bs] == '\\') bs++;
        if (bs % 2 == 0) break;
    }
    json_t *key = json_loadb(text + open, close + 1 - open, JSON_DECODE_ANY, NULL);
    int rc = json_is_string(key) ? 0 : -1;
    if (!rc) snprintf(out, cap, "%s", json_string_value(key));
    json_decref(key);
    return rc;
}

/* Parses and validates the header of files[fi], whose bytes are image[0..size). */
static int parse_file(qmix_st_store *st, int fi, const uint8_t *image, uint64_t size,
                      qmix_err *err)
{
    st_file *f = &st->files[fi];
    const char *path = f->path;
    if (size < 8) return qmix_errf(err, "%s: truncated: %llu bytes, no header length", path,
                                   (unsigned long long)size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | image[i];
    if (hlen > QMIX_ST_MAX_HEADER)
        return qmix_errf(err, "%s: header length %llu exceeds the format's 100 MB limit", path,
                         (unsigned long long)hlen);
    if (hlen > size - 8)
        return qmix_errf(err, "%s: truncated: header claims %llu bytes, file has %llu after the "
                         "length field", path, (unsigned long long)hlen,
                         (unsigned long long)(size - 8));
    if (hlen < 2 || image[8] != '{')
        return qmix_errf(err, "%s: not a safetensors file (header is not a JSON object)", path);
    const uint8_t *data = image + 8 + hlen;
    uint64_t data_size = size - 8 - hlen;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)image + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        char dup[512];
        if (json_error_code(&jerr) == json_error_duplicate_key &&
            !duplicate_key_at((const char *)image + 8, hlen, jerr.position, dup, sizeof dup))
            return qmix_errf(err, "%s: bad header JSON at byte %d: duplicate key '%s'", path,
                             jerr.position, dup);
        return qmix_errf(err, "%s: bad header JSON at byte %d: %s", path, jerr.position,
                         jerr.text);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return qmix_errf(err, "%s: header is not a JSON object", path);
    }
    uint64_t first = st->n_tensors;
    const char *key;
    json_t *val;
    int rc = 0;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            const char *mk;
            json_t *mv;
            if (!json_is_object(val)) {
                rc = qmix_errf(err, "%s: __metadata__ is not an object", path);
                break;
            }
            json_object_foreach(val, mk, mv) if (!json_is_string(mv)) {
                rc = qmix_errf(err, "%s: __metadata__['%s'] is not a string", path, mk);
                break;
            }
            if (rc) break;
            f->metadata = json_incref(val);
            continue;
        }
        qmix_tensor *t;
        if (!json_is_object(val)) {
            rc = qmix_errf(err, "%s: tensor '%s': entry is not an object", path, key);
            break;
        }
        if (push_tensor(st, &t) || keep_name(st, key, &t->name)) {
            rc = qmix_errf(err, "%s: out of memory", path);
            break;
        }
        t->file = fi;
        json_t *dt = json_object_get(val, "dtype");
        if (!json_is_string(dt)) {
            rc = qmix_errf(err, "%s: tensor '%s': missing dtype", path, key);
            break;
        }
        t->dtype = qmix_dtype_from_st_name(json_string_value(dt));
        if (!t->dtype) {
            rc = qmix_errf(err, "%s: tensor '%s': unknown dtype '%s'", path, key,
                           json_string_value(dt));
            break;
        }
        if ((rc = parse_shape(json_object_get(val, "shape"), t, path, err))) break;
        uint64_t begin, end, want = 0;
        if (parse_offsets(json_object_get(val, "data_offsets"), &begin, &end)) {
            rc = qmix_errf(err, "%s: tensor '%s': data_offsets must be [begin, end] with "
                           "0 <= begin <= end", path, key);
            break;
        }
        if (end > data_size) {
            rc = qmix_errf(err, "%s: tensor '%s': data [%llu, %llu) runs past the end of the "
                           "file's %llu data bytes (truncated?)", path, key,
                           (unsigned long long)begin, (unsigned long long)end,
                           (unsigned long long)data_size);
            break;
        }
        if (expected_bytes(t, &want)) {
            rc = qmix_errf(err, "%s: tensor '%s': size of shape x dtype %s overflows 64 bits",
                           path, key, qmix_dtype_st_name(t->dtype));
            break;
        }
        if (want != end - begin) {
            rc = qmix_errf(err, "%s: tensor '%s': %llu bytes stored but shape and dtype %s need "
                           "%llu", path, key, (unsigned long long)(end - begin),
                           qmix_dtype_st_name(t->dtype), (unsigned long long)want);
            break;
        }
        t->nbytes = want;
        t->data = data + begin;
    }
    json_decref(root);
    if (rc) return rc;

    /* Overlapping tensors would alias: reject them (sort by offset, compare neighbours).
     * Zero-size tensors hold no bytes and alias nothing, wherever they point. */
    uint64_t n_all = st->n_tensors - first, n = 0;
    if (n_all > 1) {
        span *spans = malloc(n_all * sizeof *spans);
        if (!spans) return qmix_errf(err, "%s: out of memory", path);
        for (uint64_t i = 0; i < n_all; i++) {
            const qmix_tensor *t = &st->tensors[first + i];
            if (!t->nbytes) continue;
            uint64_t b = (uint64_t)((const uint8_t *)t->data - data);
            spans[n++] = (span){b, b + t->nbytes, first + i};
        }
        qsort(spans, n, sizeof *spans, cmp_span);
        for (uint64_t i = 1; i < n && !rc; i++)
            if (spans[i].begin < spans[i - 1].end)
                rc = qmix_errf(err, "%s: tensors '%s' and '%s' overlap", path,
                               st->tensors[spans[i - 1].tensor].name,
                               st->tensors[spans[i].tensor].name);
        free(spans);
    }
    return rc;
}

static int add_file(qmix_st_store *st, const char *path)
{
    st_file *grown = realloc(st->files, (st->n_files + 1) * sizeof *grown);
    if (!grown) return -1;
    st->files = grown;
    st_file *f = &st->files[st->n_files];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return -1;
    return st->n_files++;
}

static int map_file(qmix_st_store *st, int fi, qmix_err *err)
{
    st_file *f = &st->files[fi];
    if (qmix_map_file(f->path, &f->map, &f->size, err)) return -1;
    return parse_file(st, fi, f->map, f->size, err);
}

void qmix_st_close(qmix_st_store *st)
{
    if (!st) return;
    for (int i = 0; i < st->n_files; i++) {
        st_file *f = &st->files[i];
        qmix_unmap_file(f->map, f->size);
        if (f->metadata) json_decref(f->metadata);
        free(f->path);
    }
    for (uint64_t i = 0; i < st->n_name_blocks; i++) free(st->name_blocks[i]);
    free(st->name_blocks);
    free(st->files);
    free(st->tensors);
    free(st->slots);
    free(st);
}

static int path_is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* Opens every shard the index names (each once) and checks that each tensor it maps is in the
 * shard it names. */
static int open_index(qmix_st_store *st, const char *index_path, qmix_err *err)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return qmix_errf(err, "%s: %s (line %d)", index_path, jerr.text, jerr.line);
    json_t *map = json_object_get(root, "weight_map");
    int rc = 0;
    if (!json_is_object(map)) {
        json_decref(root);
        return qmix_errf(err, "%s: no \"weight_map\" object", index_path);
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", index_path);
    char *slash = strrchr(dir, '/');
    if (slash) slash[1] = 0; else dir[0] = 0;

    /* shard name -> file index, through a small jansson object used as a hash map */
    json_t *shard_ids = json_object();
    const char *name;
    json_t *shard;
    json_object_foreach(map, name, shard) {
        if (!json_is_string(shard)) {
            rc = qmix_errf(err, "%s: weight_map['%s'] is not a file name", index_path, name);
            break;
        }
        const char *sname = json_string_value(shard);
        if (strchr(sname, '/') || !strcmp(sname, "..") || !sname[0]) {
            rc = qmix_errf(err, "%s: weight_map['%s'] names '%s', not a file beside the index",
                           index_path, name, sname);
            break;
        }
        if (json_object_get(shard_ids, sname)) continue;
        char path[PATH_MAX];
        if ((size_t)snprintf(path, sizeof path, "%s%s", dir, sname) >= sizeof path) {
            rc = qmix_errf(err, "%s: shard path too long", index_path);
            break;
        }
        if (access(path, R_OK)) {
            rc = qmix_errf(err, "%s: weight_map['%s'] points at missing shard %s (%s)",
                           index_path, name, path, strerror(errno));
            break;
        }
        int fi = add_file(st, path);
        if (fi < 0) {
            rc = qmix_errf(err, "out of memory");
            break;
        }
        json_object_set_new(shard_ids, sname, json_integer(fi));
        if ((rc = map_file(st, fi, err))) break;
    }
    if (!rc && (rc = table_build(st, err)) == 0) {
        json_object_foreach(map, name, shard) {
            const qmix_tensor *t = table_lookup(st, name);
            int want = (int)json_integer_value(json_object_get(shard_ids, json_string_value(shard)));
            if (!t) {
                rc = qmix_errf(err, "%s: tensor '%s' is not in its shard %s", index_path, name,
                               st->files[want].path);
                break;
            }
            if (t->file != want) {
                rc = qmix_errf(err, "%s: tensor '%s' is in %s, but the index says %s", index_path,
                               name, st->files[t->file].path, st->files[want].path);
                break;
            }
        }
    }
    json_decref(shard_ids);
    json_decref(root);
    return rc;
}

int qmix_st_open(const char *path, qmix_st_store **out, qmix_err *err)
{
    *out = NULL;
    qmix_st_store *st = calloc(1, sizeof *st);
    if (!st) return qmix_errf(err, "out of memory");
    char buf[PATH_MAX];
    int rc;
    if (path_is_dir(path)) {
        snprintf(buf, sizeof buf, "%s/model.safetensors.index.json", path);
        if (access(buf, F_OK) == 0) {
            rc = open_index(st, buf, err);
        } else {
            snprintf(buf, sizeof buf, "%s/model.safetensors", path);
            if (access(buf, F_OK)) {
                qmix_st_close(st);
                return qmix_errf(err, "%s: no model.safetensors or model.safetensors.index.json",
                                 path);
            }
            int fi = add_file(st, buf);
            rc = fi < 0 ? qmix_errf(err, "out of memory") : map_file(st, fi, err);
            if (!rc) rc = table_build(st, err);
        }
    } else if (ends_with(path, ".json")) {
        rc = open_index(st, path, err);
    } else {
        int fi = add_file(st, path);
        rc = fi < 0 ? qmix_errf(err, "out of memory") : map_file(st, fi, err);
        if (!rc) rc = table_build(st, err);
    }
    if (rc) {
        qmix_st_close(st);
        return -1;
    }
    *out = st;
    return 0;
}

int qmix_st_open_memory(const void *buf, uint64_t len, const char *label, qmix_st_store **out,
                        qmix_err *err)
{
    *out = NULL;
    qmix_st_store *st = calloc(1, sizeof *st);
    if (!st) return qmix_errf(err, "out of memory");
    int fi = add_file(st, label ? label : "<memory>");
    int rc = fi < 0 ? qmix_errf(err, "out of memory") : parse_file(st, fi, buf, len, err);
    if (!rc) rc = table_build(st, err);
    if (rc) {
        qmix_st_close(st);
        return -1;
    }
    *out = st;
    return 0;
}

const qmix_tensor *qmix_st_find(const qmix_st_store *st, const char *name)
{
    return table_lookup(st, name);
}

/* NULL-safe: a model opened from GGUF has no safetensors store */
uint64_t qmix_st_count(const qmix_st_store *st) { return st ? st->n_tensors : 0; }

const qmix_tensor *qmix_st_at(const qmix_st_store *st, uint64_t index)
{
    return st && index < st->n_tensors ? &st->tensors[index] : NULL;
}

int qmix_st_file_count(const qmix_st_store *st) { return st ? st->n_files : 0; }

const char *qmix_st_file_path(const qmix_st_store *st, int file)
{
    return file >= 0 && file < st->n_files ? st->files[file].path : NULL;
}

const char *qmix_st_metadata(const qmix_st_store *st, int file, const char *key)
{
    if (file < 0 || file >= st->n_files || !st->files[file].metadata) return NULL;
    return json_string_value(json_object_get(st->files[file].metadata, key));
}

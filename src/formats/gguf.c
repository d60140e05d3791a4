/* GGUF reader. The header is attacker-controlled: every count is bounded by the bytes left
 * before anything is allocated for it, every string and array is checked to lie inside the file,
 * and tensor data must follow ggml's contiguity rule exactly (§5.1), which also rules out
 * overlapping, misaligned and out-of-range tensors. */
#include "formats/gguf.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant/ggml_blocks.h"
#include "util/err.h"
#include "util/fileio.h"

typedef struct gg_file {
    char *path;
    const uint8_t *map;       /* NULL for memory images */
    uint64_t size;
} gg_file;

/* Open-addressing set of strings (index + 1 per slot), built once: linear loading. */
typedef struct strtab { uint64_t *slots; uint64_t n; } strtab;

struct qmix_gguf {
    gg_file *files;
    int n_files;
    qmix_gguf_tensor *tensors;
    uint64_t n_tensors, cap_tensors;
    qmix_gguf_kv *kvs;         /* the first file's KVs */
    uint64_t n_kvs;
    char **strings;            /* owned copies of keys and names */
    uint64_t n_strings, cap_strings;
    strtab tensor_tab, kv_tab;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static int tab_init(strtab *t, uint64_t count)
{
    uint64_t n = 16;
    while (n < count * 2) n <<= 1;
    free(t->slots);
    t->slots = calloc(n, sizeof *t->slots);
    t->n = t->slots ? n : 0;
    return t->slots ? 0 : -1;
}

/* Inserts item (its string from name_of) unless an equal string is there: returns the index of
 * that one, or -1 if inserted. */
static int64_t tab_insert(strtab *t, uint64_t item, const char *(*name_of)(const qmix_gguf *, uint64_t),
                          const qmix_gguf *g)
{
    const char *s = name_of(g, item);
    for (uint64_t i = hash_str(s) & (t->n - 1);; i = (i + 1) & (t->n - 1)) {
        if (!t->slots[i]) {
            t->slots[i] = item + 1;
            return -1;
        }
        if (!strcmp(name_of(g, t->slots[i] - 1), s)) return (int64_t)(t->slots[i] - 1);
    }
}

static int64_t tab_find(const strtab *t, const char *s,
                        const char *(*name_of)(const qmix_gguf *, uint64_t), const qmix_gguf *g)
{
    if (!t->n) return -1;
    for (uint64_t i = hash_str(s) & (t->n - 1);; i = (i + 1) & (t->n - 1)) {
        if (!t->slots[i]) return -1;
        if (!strcmp(name_of(g, t->slots[i] - 1), s)) return (int64_t)(t->slots[i] - 1);
    }
}

static const char *tensor_name(const qmix_gguf *g, uint64_t i) { return g->tensors[i].name; }
static const char *kv_name(const qmix_gguf *g, uint64_t i) { return g->kvs[i].key; }

/* ---- cursor over an untrusted image ------------------------------------------------------ */

typedef struct cur { const uint8_t *p, *base, *end; const char *path; } cur;

static uint64_t left(const cur *c) { return (uint64_t)(c->end - c->p); }
static uint64_t pos(const cur *c) { return (uint64_t)(c->p - c->base); }

static uint64_t le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int need(cur *c, uint64_t n, const char *what, qmix_err *err)
{
    if (left(c) < n)
        return qmix_errf(err, "%s: truncated at byte %llu reading %s (%llu bytes needed, %llu "
                         "left)", c->path, (unsigned long long)pos(c), what,
                         (unsigned long long)n, (unsigned long long)left(c));
    return 0;
}

static int rd(cur *c, int n, uint64_t *v, const char *what, qmix_err *err)
{
    if (need(c, (uint64_t)n, what, err)) return -1;
    *v = le(c->p, n);
    c->p += n;
    return 0;
}

/* A gguf_string: length checked against what is left; *s points into the image. */
static int rd_str(cur *c, const char **s, uint64_t *len, const char *what, qmix_err *err)
{
    if (rd(c, 8, len, what, err)) return -1;
    if (*len > left(c))
        return qmix_errf(err, "%s: %s: string length %llu at byte %llu runs past the end of the "
                         "file", c->path, what, (unsigned long long)*len,
                         (unsigned long long)(pos(c) - 8));
    *s = (const char *)c->p;
    c->p += *len;
    return 0;
}

static size_t scalar_size(int type)
{
    switch (type) {
    case QMIX_GGUF_U8: case QMIX_GGUF_I8: case QMIX_GGUF_BOOL: return 1;
    case QMIX_GGUF_U16: case QMIX_GGUF_I16: return 2;
    case QMIX_GGUF_U32: case QMIX_GGUF_I32: case QMIX_GGUF_F32: return 4;
    case QMIX_GGUF_U64: case QMIX_GGUF_I64: case QMIX_GGUF_F64: return 8;
    default: return 0;
    }
}

const char *qmix_gguf_type_name(int t)
{
    static const char *names[QMIX_GGUF_NTYPES] = {"u8",   "i8",     "u16",   "i16", "u32",
                                                  "i32",  "f32",    "bool",  "string",
                                                  "array", "u64",   "i64",   "f64"};
    return t >= 0 && t < QMIX_GGUF_NTYPES ? names[t] : "unknown";
}

static int keep_string(qmix_gguf *g, const char *s, uint64_t len, const char **out)
{
    if (g->n_strings == g->cap_strings) {
        uint64_t cap = g->cap_strings ? g->cap_strings * 2 : 256;
        char **grown = realloc(g->strings, cap * sizeof *grown);
        if (!grown) return -1;
        g->strings = grown;
        g->cap_strings = cap;
    }
    char *copy = malloc(len + 1);
    if (!copy) return -1;
    memcpy(copy, s, len);
    copy[len] = 0;
    g->strings[g->n_strings++] = copy;
    *out = copy;
    return 0;
}

/* Skips one value of type (not ARRAY) after checking it lies in the image. */
static int skip_value(cur *c, int type, const char *key, qmix_err *err)
{
    if (type == QMIX_GGUF_STRING) {
        const char *s;
        uint64_t len;
        return rd_str(c, &s, &len, key, err);
    }
    size_t n = scalar_size(type);
    if (need(c, n, key, err)) return -1;
    if (type == QMIX_GGUF_BOOL && c->p[0] > 1)
        return qmix_errf(err, "%s: KV '%s': bool value %u is not 0 or 1", c->path, key, c->p[0]);
    c->p += n;
    return 0;
}

static int parse_kv(cur *c, qmix_gguf *g, qmix_gguf_kv *kv, uint64_t index, qmix_err *err)
{
    const char *ks;
    uint64_t klen, t;
    char what[64];
    snprintf(what, sizeof what, "the key of KV #%llu", (unsigned long long)index);
    if (rd_str(c, &ks, &klen, what, err)) return -1;
    if (!klen) return qmix_errf(err, "%s: KV #%llu has an empty key", c->path,
                                (unsigned long long)index);
    if (memchr(ks, 0, klen))
        return qmix_errf(err, "%s: KV #%llu: key contains a NUL byte", c->path,
                         (unsigned long long)index);
    if (keep_string(g, ks, klen, &kv->key)) return qmix_errf(err, "%s: out of memory", c->path);
    if (rd(c, 4, &t, kv->key, err)) return -1;
    if (t >= QMIX_GGUF_NTYPES)
        return qmix_errf(err, "%s: KV '%s': unknown value type %llu", c->path, kv->key,
                         (unsigned long long)t);
    kv->type = (int)t;
    if (t != QMIX_GGUF_ARRAY) {
        kv->data = c->p;
        return skip_value(c, (int)t, kv->key, err);
    }
    uint64_t et, n;
    if (rd(c, 4, &et, kv->key, err) || rd(c, 8, &n, kv->key, err)) return -1;
    if (et >= QMIX_GGUF_NTYPES)
        return qmix_errf(err, "%s: KV '%s': array of unknown type %llu", c->path, kv->key,
                         (unsigned long long)et);
    if (et == QMIX_GGUF_ARRAY)
        return qmix_errf(err, "%s: KV '%s': nested arrays are not allowed", c->path, kv->key);
    kv->arr_type = (int)et;
    kv->arr_n = n;
    kv->data = c->p;
    /* bound the count by the bytes left before looping over it */
    uint64_t min_elem = et == QMIX_GGUF_STRING ? 8 : scalar_size((int)et);
    if (n > left(c) / min_elem)
        return qmix_errf(err, "%s: KV '%s': array of %llu %s elements does not fit in the %llu "
                         "bytes left", c->path, kv->key, (unsigned long long)n,
                         qmix_gguf_type_name((int)et), (unsigned long long)left(c));
    if (et == QMIX_GGUF_STRING || et == QMIX_GGUF_BOOL) {
        for (uint64_t i = 0; i < n; i++)
            if (skip_value(c, (int)et, kv->key, err)) return -1;
    } else {
        c->p += n * min_elem;
    }
    return 0;
}

/* ---- one file ------------------------------------------------------------------------------ */

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static int push_tensor(qmix_gguf *g, qmix_gguf_tensor **out)
{
    if (g->n_tensors == g->cap_tensors) {
        uint64_t cap = g->cap_tensors ? g->cap_tensors * 2 : 256;
        qmix_gguf_tensor *grown = realloc(g->tensors, cap * sizeof *grown);
        if (!grown) return -1;
        g->tensors = grown;
        g->cap_tensors = cap;
    }
    *out = &g->tensors[g->n_tensors++];
    memset(*out, 0, sizeof **out);
    return 0;
}

static int parse_tensor_info(cur *c, qmix_gguf *g, int fi, uint64_t index, uint64_t *offset,
                             qmix_err *err)
{
    const char *ns;
    uint64_t nlen, v;
    char what[64];
    snprintf(what, sizeof what, "the name of tensor #%llu", (unsigned long long)index);
    if (rd_str(c, &ns, &nlen, what, err)) return -1;
    if (!nlen || nlen >= QMIX_GGUF_MAX_NAME || memchr(ns, 0, nlen))
        return qmix_errf(err, "%s: tensor #%llu: name of %llu bytes (must be 1…%d bytes, no NUL)",
                         c->path, (unsigned long long)index, (unsigned long long)nlen,
                         QMIX_GGUF_MAX_NAME - 1);
    qmix_gguf_tensor *t;
    if (push_tensor(g, &t) || keep_string(g, ns, nlen, &t->name))
        return qmix_errf(err, "%s: out of memory", c->path);
    t->file = fi;
    if (rd(c, 4, &v, t->name, err)) return -1;
    if (v < 1 || v > 4)
        return qmix_errf(err, "%s: tensor '%s': %llu dimensions (must be 1…4)", c->path, t->name,
                         (unsigned long long)v);
    t->n_dims = (int)v;
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    for (int d = 0; d < t->n_dims; d++) {
        if (rd(c, 8, &v, t->name, err)) return -1;
        if (v > (uint64_t)INT64_MAX)
            return qmix_errf(err, "%s: tensor '%s': ne[%d] is negative", c->path, t->name, d);
        t->ne[d] = (int64_t)v;
    }
    if (rd(c, 4, &v, t->name, err)) return -1;
    const char *tn = qmix_ggml_type_name(v < QMIX_GGML_TYPE_LIMIT ? (int)v : -1);
    if (!tn)
        return qmix_errf(err, "%s: tensor '%s': unknown ggml type %llu", c->path, t->name,
                         (unsigned long long)v);
    t->type = (int)v;
    int be = qmix_ggml_block_elems(t->type);
    if (!be)
        return qmix_errf(err, "%s: tensor '%s': unsupported type %s", c->path, t->name, tn);
    if (t->ne[0] % be)
        return qmix_errf(err, "%s: tensor '%s': ne[0] = %lld is not a multiple of %s's block "
                         "of %d", c->path, t->name, (long long)t->ne[0], tn, be);
    /* element count and byte size must both fit in 63 bits */
    uint64_t elems = 1, bytes = (uint64_t)(t->ne[0] / be) * qmix_ggml_block_bytes(t->type);
    for (int d = 0; d < 4; d++) {
        uint64_t n = (uint64_t)t->ne[d];
        if (n && elems > (uint64_t)INT64_MAX / n)
            return qmix_errf(err, "%s: tensor '%s': element count overflows", c->path, t->name);
        elems *= n;
        if (d && n && bytes > (uint64_t)INT64_MAX / n)
            return qmix_errf(err, "%s: tensor '%s': byte size overflows", c->path, t->name);
        if (d) bytes *= n;
    }
    if (!elems) bytes = 0;
    t->nbytes = bytes;
    if (rd(c, 8, offset, t->name, err)) return -1;
    return 0;
}

/* Parses files[fi] = image[0..size): header, KVs (kept if keep_kvs), tensor infos, data
 * layout. *split_no / *split_count get the split.* KVs (-1 if absent). */
static int parse_file(qmix_gguf *g, int fi, const uint8_t *image, uint64_t size, int keep_kvs,
                      int64_t *split_no, int64_t *split_count, int64_t *split_tensors,
                      qmix_err *err)
{
    const char *path = g->files[fi].path;
    cur c = {image, image, image + size, path};
    uint64_t version, nt, nkv;
    if (size < 4 || memcmp(image, "GGUF", 4))
        return qmix_errf(err, "%s: not a GGUF file (bad magic)", path);
    c.p += 4;
    if (rd(&c, 4, &version, "the version", err)) return -1;
    if (version != 3)
        return qmix_errf(err, "%s: GGUF version %llu not supported (only version 3)", path,
                         (unsigned long long)version);
    if (rd(&c, 8, &nt, "the tensor count", err) || rd(&c, 8, &nkv, "the KV count", err))
        return -1;
    /* a KV takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8 */
    if (nkv > left(&c) / 14)
        return qmix_errf(err, "%s: %llu KVs cannot fit in a %llu-byte file", path,
                         (unsigned long long)nkv, (unsigned long long)size);
    if (nt > left(&c) / 33)
        return qmix_errf(err, "%s: %llu tensors cannot fit in a %llu-byte file", path,
                         (unsigned long long)nt, (unsigned long long)size);

    qmix_gguf_kv *kvs = calloc(nkv ? nkv : 1, sizeof *kvs);
    strtab keys = {0};
    if (!kvs || tab_init(&keys, nkv)) {
        free(kvs);
        return qmix_errf(err, "%s: out of memory", path);
    }
    /* dedup through g->kvs temporarily pointing at this file's list */
    qmix_gguf_kv *saved = g->kvs;
    g->kvs = kvs;
    int rc = 0;
    uint64_t alignment = QMIX_GGUF_DEFAULT_ALIGN;
    *split_no = *split_count = *split_tensors = -1;
    for (uint64_t i = 0; i < nkv && !rc; i++) {
        if ((rc = parse_kv(&c, g, &kvs[i], i, err))) break;
        int64_t dup = tab_insert(&keys, i, kv_name, g);
        if (dup >= 0) {
            rc = qmix_errf(err, "%s: KV '%s' appears twice", path, kvs[i].key);
            break;
        }
        const qmix_gguf_kv *kv = &kvs[i];
        if (!strcmp(kv->key, "general.alignment")) {
            if (kv->type != QMIX_GGUF_U32) {
                rc = qmix_errf(err, "%s: KV 'general.alignment' has type %s, expected u32", path,
                               qmix_gguf_type_name(kv->type));
                break;
            }
            alignment = le(kv->data, 4);
            if (!alignment || (alignment & (alignment - 1))) {
                rc = qmix_errf(err, "%s: KV 'general.alignment' = %llu is not a power of two",
                               path, (unsigned long long)alignment);
                break;
            }
        }
        int64_t *dst = !strcmp(kv->key, "split.no")              ? split_no
                       : !strcmp(kv->key, "split.count")         ? split_count
                       : !strcmp(kv->key, "split.tensors.count") ? split_tensors
                                                                 : NULL;
        if (dst) {
            size_t n = scalar_size(kv->type);
            if (kv->type == QMIX_GGUF_STRING || kv->type == QMIX_GGUF_ARRAY ||
                kv->type == QMIX_GGUF_F32 || kv->type == QMIX_GGUF_F64 || !n) {
                rc = qmix_errf(err, "%s: KV '%s' is not an integer", path, kv->key);
                break;
            }
            uint64_t v = le(kv->data, (int)n);
            if (v > INT32_MAX) {
                rc = qmix_errf(err, "%s: KV '%s' = %llu is out of range", path, kv->key,
                               (unsigned long long)v);
                break;
            }
            *dst = (int64_t)v;
        }
    }
    g->kvs = saved;
    free(keys.slots);
    if (!rc && keep_kvs) {
        g->kvs = kvs;
        g->n_kvs = nkv;
        kvs = NULL;
    }
    free(kvs);
    if (rc) return rc;

    uint64_t first = g->n_tensors;
    uint64_t *offsets = malloc((nt ? nt : 1) * sizeof *offsets);
    if (!offsets) return qmix_errf(err, "%s: out of memory", path);
    for (uint64_t i = 0; i < nt && !rc; i++)
        rc = parse_tensor_info(&c, g, fi, i, &offsets[i], err);
    uint64_t data_start = align_up(pos(&c), alignment);
    if (!rc && nt && data_start > size)
        rc = qmix_errf(err, "%s: truncated: the data section would start at byte %llu of %llu",
                       path, (unsigned long long)data_start, (unsigned long long)size);
    /* ggml's rule: tensor i+1 starts where tensor i ends, padded to the alignment; this excludes
     * overlap, gaps and misalignment in one check, and keeps every tensor inside the file */
    uint64_t expect = 0, data_size = nt && !rc ? size - data_start : 0;
    for (uint64_t i = 0; i < nt && !rc; i++) {
        qmix_gguf_tensor *t = &g->tensors[first + i];
        uint64_t off = offsets[i];
        if (off % alignment)
            rc = qmix_errf(err, "%s: tensor '%s': offset %llu is not a multiple of the alignment "
                           "%llu", path, t->name, (unsigned long long)off,
                           (unsigned long long)alignment);
        else if (off < expect)
            rc = qmix_errf(err, "%s: tensor '%s': offset %llu overlaps tensor '%s' (which ends at "
                           "%llu)", path, t->name, (unsigned long long)off,
                           g->tensors[first + i - 1].name, (unsigned long long)expect);
        else if (off != expect)
            rc = qmix_errf(err, "%s: tensor '%s': offset %llu, expected %llu (tensor data must "
                           "be contiguous in info order)", path, t->name,
                           (unsigned long long)off, (unsigned long long)expect);
        else if (t->nbytes > data_size || off > data_size - t->nbytes)
            rc = qmix_errf(err, "%s: tensor '%s': data [%llu, %llu) runs past the end of the "
                           "file's %llu data bytes (truncated?)", path, t->name,
                           (unsigned long long)off, (unsigned long long)(off + t->nbytes),
                           (unsigned long long)data_size);
        if (rc) break;
        t->data = image + data_start + off;
        expect = off + align_up(t->nbytes, alignment);
    }
    free(offsets);
    return rc;
}

/* ---- files, split sets -------------------------------------------------------------------- */

static int add_file(qmix_gguf *g, const char *path)
{
    gg_file *grown = realloc(g->files, (size_t)(g->n_files + 1) * sizeof *grown);
    if (!grown) return -1;
    g->files = grown;
    gg_file *f = &g->files[g->n_files];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return -1;
    return g->n_files++;
}

static int map_file(qmix_gguf *g, int fi, qmix_err *err)
{
    gg_file *f = &g->files[fi];
    if (qmix_map_file(f->path, &f->map, &f->size, err)) return -1;
    return 0;
}

void qmix_gguf_close(qmix_gguf *g)
{
    if (!g) return;
    for (int i = 0; i < g->n_files; i++) {
        gg_file *f = &g->files[i];
        qmix_unmap_file(f->map, f->size);
        free(f->path);
    }
    for (uint64_t i = 0; i < g->n_strings; i++) free(g->strings[i]);
    free(g->strings);
    free(g->files);
    free(g->tensors);
    free(g->kvs);
    free(g->tensor_tab.slots);
    free(g->kv_tab.slots);
    free(g);
}

/* Lookup tables over all tensors and the model KVs; duplicate tensor names are an error. */
static int build_tables(qmix_gguf *g, qmix_err *err)
{
    if (tab_init(&g->tensor_tab, g->n_tensors) || tab_init(&g->kv_tab, g->n_kvs))
        return qmix_errf(err, "out of memory");
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        int64_t dup = tab_insert(&g->tensor_tab, i, tensor_name, g);
        if (dup >= 0) {
            const qmix_gguf_tensor *a = &g->tensors[dup], *b = &g->tensors[i];
            if (a->file == b->file)
                return qmix_errf(err, "%s: tensor '%s' appears twice", g->files[a->file].path,
                                 a->name);
            return qmix_errf(err, "tensor '%s' appears twice (in %s and %s)", a->name,
                             g->files[a->file].path, g->files[b->file].path);
        }
    }
    for (uint64_t i = 0; i < g->n_kvs; i++) tab_insert(&g->kv_tab, i, kv_name, g);
    return 0;
}

/* "NAME-00001-of-00017.gguf": *prefix_len = length of NAME, *count = 17; 0 if not a shard. */
static int split_pattern(const char *path, size_t *prefix_len, int *count)
{
    size_t n = strlen(path);
    const char *tail = "-00000-of-00000.gguf";
    size_t tl = strlen(tail);
    if (n < tl) return 0;
    const char *s = path + n - tl;
    for (size_t i = 0; i < tl; i++) {
        int digit = tail[i] == '0';
        if (digit ? (s[i] < '0' || s[i] > '9') : s[i] != tail[i]) return 0;
    }
    *count = atoi(s + 10);
    *prefix_len = n - tl;
    return *count > 0;
}

int qmix_gguf_open(const char *path, qmix_gguf **out, qmix_err *err)
{
    *out = NULL;
    qmix_gguf *g = calloc(1, sizeof *g);
    if (!g) return qmix_errf(err, "out of memory");
    size_t plen;
    int count = 0, rc = 0;
    int is_split = split_pattern(path, &plen, &count);
    int n = is_split ? count : 1;
    int64_t total_expected = -1;
    for (int i = 0; i < n && !rc; i++) {
        char shard[PATH_MAX];
        if (is_split) {
            if ((size_t)snprintf(shard, sizeof shard, "%.*s-%05d-of-%05d.gguf", (int)plen, path,
                                 i + 1, count) >= sizeof shard) {
                rc = qmix_errf(err, "%s: path too long", path);
                break;
            }
        } else {
            snprintf(shard, sizeof shard, "%s", path);
        }
        int fi = add_file(g, shard);
        if (fi < 0) {
            rc = qmix_errf(err, "out of memory");
            break;
        }
        if ((rc = map_file(g, fi, err))) break;
        int64_t sno, scount, stensors;
        if ((rc = parse_file(g, fi, g->files[fi].map, g->files[fi].size, i == 0, &sno, &scount,
                             &stensors, err)))
            break;
        if (!is_split && scount > 1)
            rc = qmix_errf(err, "%s: split.count = %lld but the name is not NAME-%05d-of-%05lld.gguf; "
                           "open the set by its shard names", shard, (long long)scount, 1,
                           (long long)scount);
        else if (is_split && scount >= 0 && scount != count)
            rc = qmix_errf(err, "%s: split.count = %lld, but the file name says %d shards", shard,
                           (long long)scount, count);
        else if (is_split && sno >= 0 && sno != i)
            rc = qmix_errf(err, "%s: split.no = %lld, expected %d", shard, (long long)sno, i);
        if (i == 0) total_expected = stensors;
    }
    if (!rc && total_expected >= 0 && (uint64_t)total_expected != g->n_tensors)
        rc = qmix_errf(err, "%s: split.tensors.count = %lld but the %d file(s) hold %llu tensors",
                       path, (long long)total_expected, g->n_files,
                       (unsigned long long)g->n_tensors);
    if (!rc) rc = build_tables(g, err);
    if (rc) {
        qmix_gguf_close(g);
        return -1;
    }
    *out = g;
    return 0;
}

int qmix_gguf_open_memory(const void *buf, uint64_t len, const char *label, qmix_gguf **out,
                          qmix_err *err)
{
    *out = NULL;
    qmix_gguf *g = calloc(1, sizeof *g);
    if (!g) return qmix_errf(err, "out of memory");
    int64_t a, b, c;
    int fi = add_file(g, label ? label : "<memory>");
    int rc = fi < 0 ? qmix_errf(err, "out of memory")
                    : parse_file(g, fi, buf, len, 1, &a, &b, &c, err);
    if (!rc) rc = build_tables(g, err);
    if (rc) {
        qmix_gguf_close(g);
        return -1;
    }
    *out = g;
    return 0;
}

/* ---- lookups -------------------------------------------------------------------------------- */

uint64_t qmix_gguf_tensor_count(const qmix_gguf *g) { return g->n_tensors; }

const qmix_gguf_tensor *qmix_gguf_tensor_at(const qmix_gguf *g, uint64_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const qmix_gguf_tensor *qmix_gguf_find(const qmix_gguf *g, const char *name)
{
    int64_t i = tab_find(&g->tensor_tab, name, tensor_name, g);
    return i < 0 ? NULL : &g->tensors[i];
}

int qmix_gguf_file_count(const qmix_gguf *g) { return g->n_files; }

const char *qmix_gguf_file_path(const qmix_gguf *g, int file)
{
    return file >= 0 && file < g->n_files ? g->files[file].path : NULL;
}

uint64_t qmix_gguf_kv_count(const qmix_gguf *g) { return g->n_kvs; }

const qmix_gguf_kv *qmix_gguf_kv_at(const qmix_gguf *g, uint64_t i)
{
    return i < g->n_kvs ? &g->kvs[i] : NULL;
}

const qmix_gguf_kv *qmix_gguf_kv_find(const qmix_gguf *g, const char *key)
{
    int64_t i = tab_find(&g->kv_tab, key, kv_name, g);
    return i < 0 ? NULL : &g->kvs[i];
}

/* A scalar of an integer or bool type at p, as int64 (u64 above INT64_MAX saturates: callers
 * range-check anyway). */
static int64_t int_at(const uint8_t *p, int type)
{
    uint64_t v = le(p, (int)scalar_size(type));
    switch (type) {
    case QMIX_GGUF_I8: return (int8_t)v;
    case QMIX_GGUF_I16: return (int16_t)v;
    case QMIX_GGUF_I32: return (int32_t)v;
    case QMIX_GGUF_I64: return (int64_t)v;
    default: return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v;
    }
}

static int is_int_type(int t)
{
    return t == QMIX_GGUF_U8 || t == QMIX_GGUF_I8 || t == QMIX_GGUF_U16 || t == QMIX_GGUF_I16 ||
           t == QMIX_GGUF_U32 || t == QMIX_GGUF_I32 || t == QMIX_GGUF_U64 || t == QMIX_GGUF_I64 ||
           t == QMIX_GGUF_BOOL;
}

static double float_at(const uint8_t *p, int type)
{
    if (type == QMIX_GGUF_F32) {
        uint32_t v = (uint32_t)le(p, 4);
        float f;
        memcpy(&f, &v, 4);
        return f;
    }
    if (type == QMIX_GGUF_F64) {
        uint64_t v = le(p, 8);
        double d;
        memcpy(&d, &v, 8);
        return d;
    }
    return (double)int_at(p, type);
}

int qmix_gguf_get_int(const qmix_gguf *g, const char *key, int64_t *out, qmix_err *err)
{
    const qmix_gguf_kv *kv = qmix_gguf_kv_find(g, key);
    if (!kv) return 0;
    if (!is_int_type(kv->type))
        return qmix_errf(err, "%s: KV '%s' has type %s, expected an integer",
                         g->files[0].path, key, qmix_gguf_type_name(kv->type));
    *out = int_at(kv->data, kv->type);
    return 1;
}

int qmix_gguf_get_float(const qmix_gguf *g, const char *key, double *out, qmix_err *err)
{
    const qmix_gguf_kv *kv = qmix_gguf_kv_find(g, key);
    if (!kv) return 0;
    if (kv->type != QMIX_GGUF_F32 && kv->type != QMIX_GGUF_F64 && !is_int_type(kv->type))
        return qmix_errf(err, "%s: KV '%s' has type %s, expected a number", g->files[0].path,
                         key, qmix_gguf_type_name(kv->type));
    *out = float_at(kv->data, kv->type);
    return 1;
}

int qmix_gguf_get_str(const qmix_gguf *g, const char *key, const char **s, uint64_t *len,
                      qmix_err *err)
{
    const qmix_gguf_kv *kv = qmix_gguf_kv_find(g, key);
    if (!kv) return 0;
    if (kv->type != QMIX_GGUF_STRING)
        return qmix_errf(err, "%s: KV '%s' has type %s, expected a string", g->files[0].path,
                         key, qmix_gguf_type_name(kv->type));
    *len = le(kv->data, 8);
    *s = (const char *)kv->data + 8;
    return 1;
}

int64_t qmix_gguf_arr_int(const qmix_gguf_kv *kv, uint64_t i)
{
    if (kv->type != QMIX_GGUF_ARRAY || i >= kv->arr_n || !is_int_type(kv->arr_type)) return 0;
    return int_at(kv->data + i * scalar_size(kv->arr_type), kv->arr_type);
}

double qmix_gguf_arr_float(const qmix_gguf_kv *kv, uint64_t i)
{
    if (kv->type != QMIX_GGUF_ARRAY || i >= kv->arr_n || kv->arr_type == QMIX_GGUF_STRING)
        return 0;
    return float_at(kv->data + i * scalar_size(kv->arr_type), kv->arr_type);
}

void qmix_gguf_arr_str_next(const uint8_t **cursor, const char **s, uint64_t *len)
{
    *len = le(*cursor, 8);
    *s = (const char *)*cursor + 8;
    *cursor += 8 + *len;
}

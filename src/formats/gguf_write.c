/* GGUF writer: the header is assembled in memory (KV section, tensor-info section), then data is
 * streamed with ggml's contiguity rule: tensor i+1 at the end of tensor i rounded up to the
 * alignment (32; no general.alignment KV is written). */
#include "formats/gguf_write.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "quant/ggml_blocks.h"
#include "util/err.h"
#include "util/fileio.h"

typedef struct buf { uint8_t *p; size_t len, cap; } buf;

typedef struct wtensor { char *name; uint64_t nbytes; } wtensor;

struct qmix_ggw {
    buf kv, ti;
    uint64_t n_kv, n_tensors, cap_tensors;
    wtensor *tensors;
    uint64_t data_off;        /* running offset while declaring */
    uint64_t arr_pending;     /* strings still owed to an array being declared */
    char bad[256];            /* first declaration error */
    char *path;
    qmix_wfile out;           /* under a temporary name until qmix_ggw_close renames it */
    FILE *f;                  /* out.f */
    uint64_t cur, cur_written; /* streaming position */
};

#define ALIGN QMIX_GGUF_DEFAULT_ALIGN

static void put(qmix_ggw *w, buf *b, const void *p, size_t n)
{
    if (w->bad[0]) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        uint8_t *g = realloc(b->p, cap);
        if (!g) {
            snprintf(w->bad, sizeof w->bad, "out of memory building the header");
            return;
        }
        b->p = g;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void put_le(qmix_ggw *w, buf *b, uint64_t v, int n)
{
    uint8_t t[8];
    for (int i = 0; i < n; i++) t[i] = (uint8_t)(v >> (8 * i));
    put(w, b, t, (size_t)n);
}

static void put_str(qmix_ggw *w, buf *b, const char *s, size_t len)
{
    put_le(w, b, len, 8);
    put(w, b, s, len);
}

qmix_ggw *qmix_ggw_new(void) { return calloc(1, sizeof(qmix_ggw)); }

static void kv_head(qmix_ggw *w, const char *key, int type)
{
    if (w->arr_pending && !w->bad[0])
        snprintf(w->bad, sizeof w->bad, "KV '%s' declared while a string array still needs "
                 "%llu elements", key, (unsigned long long)w->arr_pending);
    if (!key[0] && !w->bad[0]) snprintf(w->bad, sizeof w->bad, "empty KV key");
    put_str(w, &w->kv, key, strlen(key));
    put_le(w, &w->kv, (uint64_t)type, 4);
    w->n_kv++;
}

void qmix_ggw_kv_u32(qmix_ggw *w, const char *key, uint32_t v)
{
    kv_head(w, key, QMIX_GGUF_U32);
    put_le(w, &w->kv, v, 4);
}

void qmix_ggw_kv_i32(qmix_ggw *w, const char *key, int32_t v)
{
    kv_head(w, key, QMIX_GGUF_I32);
    put_le(w, &w->kv, (uint32_t)v, 4);
}

void qmix_ggw_kv_f32(qmix_ggw *w, const char *key, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    kv_head(w, key, QMIX_GGUF_F32);
    put_le(w, &w->kv, bits, 4);
}

void qmix_ggw_kv_bool(qmix_ggw *w, const char *key, int v)
{
    kv_head(w, key, QMIX_GGUF_BOOL);
    put_le(w, &w->kv, v ? 1 : 0, 1);
}

void qmix_ggw_kv_strn(qmix_ggw *w, const char *key, const char *s, size_t len)
{
    kv_head(w, key, QMIX_GGUF_STRING);
    put_str(w, &w->kv, s, len);
}

void qmix_ggw_kv_str(qmix_ggw *w, const char *key, const char *s)
{
    qmix_ggw_kv_strn(w, key, s, strlen(s));
}

void qmix_ggw_kv_arr(qmix_ggw *w, const char *key, int elem_type, uint64_t n, const void *elems)
{
    static const size_t sizes[QMIX_GGUF_NTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    kv_head(w, key, QMIX_GGUF_ARRAY);
    if (elem_type < 0 || elem_type >= QMIX_GGUF_NTYPES || !sizes[elem_type]) {
        if (!w->bad[0]) snprintf(w->bad, sizeof w->bad, "KV '%s': not a numeric array", key);
        return;
    }
    put_le(w, &w->kv, (uint64_t)elem_type, 4);
    put_le(w, &w->kv, n, 8);
    put(w, &w->kv, elems, n * sizes[elem_type]); /* the host is little-endian (x86-64) */
}

void qmix_ggw_kv_arr_str_begin(qmix_ggw *w, const char *key, uint64_t n)
{
    kv_head(w, key, QMIX_GGUF_ARRAY);
    put_le(w, &w->kv, QMIX_GGUF_STRING, 4);
    put_le(w, &w->kv, n, 8);
    w->arr_pending = n;
}

void qmix_ggw_arr_str(qmix_ggw *w, const char *s, size_t len)
{
    if (!w->arr_pending) {
        if (!w->bad[0]) snprintf(w->bad, sizeof w->bad, "more array strings than declared");
        return;
    }
    w->arr_pending--;
    put_str(w, &w->kv, s, len);
}

void qmix_ggw_tensor(qmix_ggw *w, const char *name, int type, int n_dims, const int64_t *ne)
{
    if (w->bad[0]) return;
    size_t row = qmix_ggml_row_bytes(type, ne[0]);
    if (!row || n_dims < 1 || n_dims > 4 || strlen(name) >= QMIX_GGUF_MAX_NAME) {
        snprintf(w->bad, sizeof w->bad, "tensor '%s': bad type, dims or name", name);
        return;
    }
    uint64_t nbytes = row;
    for (int d = 1; d < n_dims; d++) nbytes *= (uint64_t)ne[d];
    if (w->n_tensors == w->cap_tensors) {
        uint64_t cap = w->cap_tensors ? 2 * w->cap_tensors : 256;
        wtensor *g = realloc(w->tensors, cap * sizeof *g);
        if (!g) {
            snprintf(w->bad, sizeof w->bad, "out of memory");
            return;
        }
        w->tensors = g;
        w->cap_tensors = cap;
    }
    wtensor *t = &w->tensors[w->n_tensors];
    if (!(t->name = strdup(name))) {
        snprintf(w->bad, sizeof w->bad, "out of memory");
        return;
    }
    t->nbytes = nbytes;
    w->n_tensors++;
    put_str(w, &w->ti, name, strlen(name));
    put_le(w, &w->ti, (uint64_t)n_dims, 4);
    for (int d = 0; d < n_dims; d++) put_le(w, &w->ti, (uint64_t)ne[d], 8);
    put_le(w, &w->ti, (uint64_t)type, 4);
    put_le(w, &w->ti, w->data_off, 8);
    w->data_off += (nbytes + ALIGN - 1) / ALIGN * ALIGN;
}

static int werr(qmix_ggw *w, qmix_err *err)
{
    return qmix_errf(err, "%s: write failed: %s", w->path, strerror(errno));
}

static int pad(qmix_ggw *w, uint64_t n, qmix_err *err)
{
    static const uint8_t zeros[ALIGN];
    uint64_t p = (ALIGN - n % ALIGN) % ALIGN;
    return p && fwrite(zeros, 1, p, w->f) != p ? werr(w, err) : 0;
}

int qmix_ggw_open(qmix_ggw *w, const char *path, qmix_err *err)
{
    if (!w) return qmix_errf(err, "%s: out of memory", path);
    if (!w->bad[0] && w->arr_pending)
        snprintf(w->bad, sizeof w->bad, "a string array is missing %llu elements",
                 (unsigned long long)w->arr_pending);
    if (w->bad[0]) return qmix_errf(err, "%s: %s", path, w->bad);
    if (!(w->path = strdup(path))) return qmix_errf(err, "out of memory");
    if (qmix_wfile_open(&w->out, path, err)) return -1;
    w->f = w->out.f;
    buf h = {0};
    put(w, &h, "GGUF", 4);
    put_le(w, &h, 3, 4);
    put_le(w, &h, w->n_tensors, 8);
    put_le(w, &h, w->n_kv, 8);
    if (w->bad[0]) {
        free(h.p);
        return qmix_errf(err, "%s: %s", path, w->bad);
    }
    int rc = fwrite(h.p, 1, h.len, w->f) != h.len ||
             (w->kv.len && fwrite(w->kv.p, 1, w->kv.len, w->f) != w->kv.len) ||
             (w->ti.len && fwrite(w->ti.p, 1, w->ti.len, w->f) != w->ti.len);
    uint64_t header = h.len + w->kv.len + w->ti.len;
    free(h.p);
    if (rc) return werr(w, err);
    return pad(w, header, err);
}

int qmix_ggw_write(qmix_ggw *w, const void *data, size_t len, qmix_err *err)
{
    const uint8_t *p = data;
    while (len) {
        if (w->cur >= w->n_tensors)
            return qmix_errf(err, "%s: more data than the declared tensors hold", w->path);
        wtensor *t = &w->tensors[w->cur];
        uint64_t room = t->nbytes - w->cur_written, n = len < room ? len : room;
        if (n && fwrite(p, 1, n, w->f) != n) return werr(w, err);
        p += n;
        len -= n;
        w->cur_written += n;
        if (w->cur_written == t->nbytes) {
            if (pad(w, t->nbytes, err)) return -1;
            w->cur++;
            w->cur_written = 0;
        }
    }
    /* zero-byte tensors complete without data */
    while (w->cur < w->n_tensors && !w->tensors[w->cur].nbytes) w->cur++;
    return 0;
}

static void free_writer(qmix_ggw *w)
{
    for (uint64_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
    free(w->tensors);
    free(w->kv.p);
    free(w->ti.p);
    free(w->path);
    free(w);
}

int qmix_ggw_close(qmix_ggw *w, qmix_err *err)
{
    if (!w) return qmix_errf(err, "no writer");
    int rc = 0;
    if (qmix_ggw_write(w, NULL, 0, err)) rc = -1;
    else if (w->cur < w->n_tensors)
        rc = qmix_errf(err, "%s: tensor '%s' is incomplete (%llu of %llu bytes written)",
                       w->path, w->tensors[w->cur].name, (unsigned long long)w->cur_written,
                       (unsigned long long)w->tensors[w->cur].nbytes);
    if (w->f && rc) qmix_wfile_abandon(&w->out);
    else if (w->f) rc = qmix_wfile_commit(&w->out, err);
    w->f = NULL;
    free_writer(w);
    return rc;
}

void qmix_ggw_discard(qmix_ggw *w)
{
    if (!w) return;
    if (w->f) qmix_wfile_abandon(&w->out);
    free_writer(w);
}

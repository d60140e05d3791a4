#include "formats/safetensors_write.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/err.h"
#include "util/fileio.h"

#define STW_BUF_CAP QMIX_STW_BUF_BYTES

struct stw_ent {
    char *name;
    uint64_t nbytes;
};

struct qmix_stw {
    char *path;
    int fd;
    char *tmp;           /* written under this name, renamed to path when complete (NULL:
                          * in place, e.g. /dev/stdout) */
    struct stw_ent *t;
    size_t n;
    size_t cur;          /* tensor being received; n before the first qmix_stw_begin */
    uint64_t cur_got;    /* bytes received for t[cur] */
    unsigned char *buf;
    size_t buf_len;
    uint64_t written;    /* bytes accepted so far, buffered ones included */
};

int qmix_stw_tensor_nbytes(const qmix_stw_tensor *t, uint64_t *nbytes, qmix_err *err)
{
    *nbytes = 0;
    const char *name = t->name ? t->name : "(null)";
    size_t esize = qmix_dtype_size(t->dtype);
    if (t->dtype <= QMIX_DTYPE_UNKNOWN || t->dtype >= QMIX_DTYPE_COUNT || esize == 0)
        return qmix_errf(err, "tensor %s: unsupported dtype %d", name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > QMIX_MAX_DIMS)
        return qmix_errf(err, "tensor %s: %d dimensions (at most %d)", name, t->ndim,
                         QMIX_MAX_DIMS);
    uint64_t count = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0)
            return qmix_errf(err, "tensor %s: negative dimension %lld", name,
                             (long long)t->shape[d]);
        uint64_t dim = (uint64_t)t->shape[d];
        if (dim && count > UINT64_MAX / dim)
            return qmix_errf(err, "tensor %s: element count overflows", name);
        count *= dim;
    }
    /* Offsets go into JSON as signed 64-bit integers, so stay well inside that. */
    if (count > ((uint64_t)1 << 60) / esize)
        return qmix_errf(err, "tensor %s: too large", name);
    *nbytes = count * esize;
    return 0;
}

/* The header JSON, padded with spaces so that data starts 8-byte aligned (8 + len is a multiple
 * of 8), with tensors laid out back to back in declaration order. */
static int build_header(const qmix_stw_tensor *tensors, size_t n, const qmix_stw_kv *meta,
                        size_t n_meta, char **out, size_t *out_len, uint64_t *data_len,
                        qmix_err *err)
{
    *out = NULL;
    json_t *root = json_object();
    if (!root) return qmix_errf(err, "out of memory");
    if (n_meta) {
        json_t *m = json_object();
        if (!m || json_object_set_new(root, "__metadata__", m)) {
            json_decref(root);
            return qmix_errf(err, "out of memory");
        }
        for (size_t i = 0; i < n_meta; i++) {
            if (!meta[i].key || !meta[i].value) {
                json_decref(root);
                return qmix_errf(err, "metadata entry %zu: NULL key or value", i);
            }
            json_t *v = json_string(meta[i].value);
            if (!v) {
                json_decref(root);
                return qmix_errf(err, "metadata %s: value is not valid UTF-8", meta[i].key);
            }
            if (json_object_get(m, meta[i].key)) {
                json_decref(v);
                json_decref(root);
                return qmix_errf(err, "metadata key %s given twice", meta[i].key);
            }
            if (json_object_set_new(m, meta[i].key, v)) {
                json_decref(root);
                return qmix_errf(err, "metadata key is not valid UTF-8");
            }
        }
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const qmix_stw_tensor *t = &tensors[i];
        if (!t->name || !t->name[0]) {
            json_decref(root);
            return qmix_errf(err, "tensor %zu: empty name", i);
        }
        if (!strcmp(t->name, "__metadata__")) {
            json_decref(root);
            return qmix_errf(err, "tensor %zu: the name __metadata__ is reserved", i);
        }
        if (json_object_get(root, t->name)) {
            json_decref(root);
            return qmix_errf(err, "tensor %s declared twice", t->name);
        }
        uint64_t nb;
        if (qmix_stw_tensor_nbytes(t, &nb, err)) {
            json_decref(root);
            return -1;
        }
        json_t *shape = json_array(), *offs = json_array(), *e = json_object();
        int bad = !shape || !offs || !e;
        for (int d = 0; !bad && d < t->ndim; d++)
            bad = json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
        bad = bad || json_array_append_new(offs, json_integer((json_int_t)off)) ||
              json_array_append_new(offs, json_integer((json_int_t)(off + nb)));
        bad = bad || json_object_set_new(e, "dtype", json_string(qmix_dtype_st_name(t->dtype)));
        if (!bad) {
            bad = json_object_set_new(e, "shape", shape) ||
                  json_object_set_new(e, "data_offsets", offs);
            shape = offs = NULL; /* owned by e now, whatever happened */
        }
        if (bad) {
            json_decref(shape);
            json_decref(offs);
            json_decref(e);
            json_decref(root);
            return qmix_errf(err, "tensor %s: cannot build header entry", t->name);
        }
        if (json_object_set_new(root, t->name, e)) {
            json_decref(root);
            return qmix_errf(err, "tensor name %s is not valid UTF-8", t->name);
        }
        off += nb;
    }
    /* Compact and in declaration order (jansson keeps insertion order), like other writers. */
    char *text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text) return qmix_errf(err, "out of memory building the header");
    size_t len = strlen(text), padded = (len + 7) & ~(size_t)7;
    if (padded > QMIX_ST_MAX_HEADER) {
        free(text);
        return qmix_errf(err, "header of %zu bytes exceeds the format's %u-byte limit", padded,
                         QMIX_ST_MAX_HEADER);
    }
    char *p = realloc(text, padded + 1);
    if (!p) {
        free(text);
        return qmix_errf(err, "out of memory");
    }
    memset(p + len, ' ', padded - len);
    p[padded] = '\0';
    *out = p;
    *out_len = padded;
    *data_len = off;
    return 0;
}

int qmix_stw_file_size(const qmix_stw_tensor *tensors, size_t n_tensors, const qmix_stw_kv *meta,
                       size_t n_meta, uint64_t *size, qmix_err *err)
{
    char *hdr;
    size_t hlen;
    uint64_t dlen;
    if (build_header(tensors, n_tensors, meta, n_meta, &hdr, &hlen, &dlen, err)) return -1;
    free(hdr);
    *size = 8 + (uint64_t)hlen + dlen;
    return 0;
}

static int full_write(int fd, const char *path, const void *data, size_t len, qmix_err *err)
{
    const unsigned char *p = data;
    while (len) {
        ssize_t k = write(fd, p, len);
        if (k < 0) {
            if (errno == EINTR) continue;
            return qmix_errf(err, "writing %s: %s", path, strerror(errno));
        }
        if (k == 0) return qmix_errf(err, "writing %s: short write (device full?)", path);
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

static int flush_buf(qmix_stw *w, qmix_err *err)
{
    if (!w->buf_len) return 0;
    int rc = full_write(w->fd, w->path, w->buf, w->buf_len, err);
    w->buf_len = 0;
    return rc;
}

static void stw_free(qmix_stw *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) free(w->t[i].name);
    free(w->t);
    free(w->buf);
    free(w->path);
    free(w);
}

void qmix_stw_discard(qmix_stw *w)
{
    if (!w) return;
    qmix_out_abandon(w->fd, w->tmp);
    w->tmp = NULL;
    stw_free(w);
}

int qmix_stw_open(const char *path, const qmix_stw_tensor *tensors, size_t n_tensors,
                  const qmix_stw_kv *meta, size_t n_meta, qmix_stw **out, qmix_err *err)
{
    *out = NULL;
    char *hdr;
    size_t hlen;
    uint64_t dlen;
    if (build_header(tensors, n_tensors, meta, n_meta, &hdr, &hlen, &dlen, err))
        return qmix_err_prefix(err, "%s", path);

    qmix_stw *w = calloc(1, sizeof *w);
    if (!w) {
        free(hdr);
        return qmix_errf(err, "%s: out of memory", path);
    }
    w->fd = -1;
    w->n = n_tensors;
    w->cur = n_tensors;
    w->path = strdup(path);
    w->t = calloc(n_tensors ? n_tensors : 1, sizeof *w->t);
    w->buf = malloc(STW_BUF_CAP);
    int oom = !w->path || !w->t || !w->buf;
    for (size_t i = 0; !oom && i < n_tensors; i++) {
        w->t[i].name = strdup(tensors[i].name);
        oom = !w->t[i].name || qmix_stw_tensor_nbytes(&tensors[i], &w->t[i].nbytes, err);
    }
    if (oom) {
        free(hdr);
        stw_free(w);
        return qmix_errf(err, "%s: out of memory", path);
    }

    w->fd = qmix_out_open(path, &w->tmp, err);
    if (w->fd < 0) {
        free(hdr);
        stw_free(w);
        return -1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(w->buf, len8, 8);
    w->buf_len = 8;
    w->written = 8;
    /* Headers beyond the buffer (huge tensor counts) go straight out. */
    if (hlen <= STW_BUF_CAP - 8) {
        memcpy(w->buf + 8, hdr, hlen);
        w->buf_len += hlen;
    } else if (flush_buf(w, err) || full_write(w->fd, w->path, hdr, hlen, err)) {
        free(hdr);
        qmix_stw_discard(w);
        return -1;
    }
    w->written += hlen;
    free(hdr);
    *out = w;
    return 0;
}

static int check_complete(const qmix_stw *w, qmix_err *err)
{
    if (w->cur < w->n && w->cur_got != w->t[w->cur].nbytes)
        return qmix_errf(err, "%s: tensor %s received %llu bytes, declared %llu", w->path,
                         w->t[w->cur].name, (unsigned long long)w->cur_got,
                         (unsigned long long)w->t[w->cur].nbytes);
    return 0;
}

int qmix_stw_begin(qmix_stw *w, const char *name, qmix_err *err)
{
    if (check_complete(w, err)) return -1;
    size_t next = w->cur == w->n ? 0 : w->cur + 1;
    if (w->cur != w->n && next == w->n)
        return qmix_errf(err, "%s: tensor %s begun after the last declared tensor", w->path,
                         name);
    if (next >= w->n)
        return qmix_errf(err, "%s: tensor %s begun but no tensors were declared", w->path, name);
    if (strcmp(name, w->t[next].name))
        return qmix_errf(err, "%s: tensor %s begun where %s was declared", w->path, name,
                         w->t[next].name);
    w->cur = next;
    w->cur_got = 0;
    return 0;
}

int qmix_stw_write(qmix_stw *w, const void *data, size_t len, qmix_err *err)
{
    if (w->cur == w->n)
        return qmix_errf(err, "%s: data written before qmix_stw_begin", w->path);
    struct stw_ent *t = &w->t[w->cur];
    if (len > t->nbytes - w->cur_got)
        return qmix_errf(err, "%s: tensor %s: %zu more bytes would exceed its declared %llu "
                              "(%llu already received)",
                         w->path, t->name, len, (unsigned long long)t->nbytes,
                         (unsigned long long)w->cur_got);
    w->cur_got += len;
    w->written += len;
    /* Big chunks skip the copy; small ones are gathered so tiny tensors cost no syscalls. */
    if (len >= STW_BUF_CAP)
        return flush_buf(w, err) || full_write(w->fd, w->path, data, len, err) ? -1 : 0;
    if (w->buf_len + len > STW_BUF_CAP && flush_buf(w, err)) return -1;
    memcpy(w->buf + w->buf_len, data, len);
    w->buf_len += len;
    return 0;
}

int qmix_stw_close(qmix_stw *w, qmix_err *err)
{
    if (!w) return 0;
    int rc = check_complete(w, err);
    if (!rc && w->n && w->cur != w->n - 1)
        rc = qmix_errf(err, "%s: only %zu of %zu declared tensors were written (next: %s)",
                       w->path, w->cur == w->n ? 0 : w->cur + 1, w->n,
                       w->t[w->cur == w->n ? 0 : w->cur + 1].name);
    if (!rc) rc = flush_buf(w, err);
    if (!rc) {
        /* fsync/close can be the first to report a failed write-back (NFS, quotas) */
        int fd = w->fd;
        w->fd = -1;
        rc = qmix_out_commit(fd, w->tmp, w->path, err);
        w->tmp = NULL;
    }
    if (rc) {
        qmix_stw_discard(w);
        return -1;
    }
    stw_free(w);
    return 0;
}

uint64_t qmix_stw_bytes_written(const qmix_stw *w) { return w->written; }

const char *qmix_stw_path(const qmix_stw *w) { return w->path; }

int qmix_st_write_index(const char *path, uint64_t total_size, uint64_t total_parameters,
                        const char *const *names, const char *const *files, size_t n,
                        qmix_err *err)
{
    json_t *root = json_object(), *meta = json_object(), *map = json_object();
    if (!root || !meta || !map) {
        json_decref(root);
        json_decref(meta);
        json_decref(map);
        return qmix_errf(err, "%s: out of memory", path);
    }
    int bad = json_object_set_new(root, "metadata", meta);
    bad = json_object_set_new(root, "weight_map", map) || bad;
    bad = bad || json_object_set_new(meta, "total_parameters",
                                     json_integer((json_int_t)total_parameters));
    bad = bad || json_object_set_new(meta, "total_size", json_integer((json_int_t)total_size));
    if (bad) {
        json_decref(root);
        return qmix_errf(err, "%s: out of memory", path);
    }
    for (size_t i = 0; i < n; i++) {
        if (!names[i] || !files[i]) {
            json_decref(root);
            return qmix_errf(err, "%s: entry %zu has a NULL name or file", path, i);
        }
        if (json_object_get(map, names[i])) {
            json_decref(root);
            return qmix_errf(err, "%s: tensor %s listed twice", path, names[i]);
        }
        json_t *f = json_string(files[i]);
        if (!f || json_object_set_new(map, names[i], f)) {
            json_decref(root);
            return qmix_errf(err, "%s: tensor %s: name or file is not valid UTF-8", path,
                             names[i]);
        }
    }
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(root);
    if (!text) return qmix_errf(err, "%s: out of memory", path);
    char *tmp;
    int fd = qmix_out_open(path, &tmp, err);
    if (fd < 0) {
        free(text);
        return -1;
    }
    int rc = full_write(fd, path, text, strlen(text), err);
    if (!rc) rc = full_write(fd, path, "\n", 1, err);
    free(text);
    if (rc) qmix_out_abandon(fd, tmp);
    else rc = qmix_out_commit(fd, tmp, path, err);
    return rc;
}

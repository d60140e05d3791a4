#include "util/fileio.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/err.h"

int qmix_read_file(const char *path, size_t max_bytes, char **out, size_t *len, qmix_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return qmix_errf(err, "%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 1 == cap) {
            if (cap > max_bytes) break;
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - 1 - n, f);
        n += got;
        if (got == 0) break;
    }
    int failed = ferror(f);
    fclose(f);
    if (!buf) return qmix_errf(err, "%s: out of memory", path);
    if (n > max_bytes) {
        free(buf);
        return qmix_errf(err, "%s: larger than %zu bytes", path, max_bytes);
    }
    if (failed) {
        free(buf);
        return qmix_errf(err, "%s: read error", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return 0;
}

int qmix_map_file(const char *path, const uint8_t **map, uint64_t *size, qmix_err *err)
{
    *map = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qmix_errf(err, "%s: %s", path, strerror(errno));
    struct stat sb;
    int rc = -1;
    if (fstat(fd, &sb)) {
        qmix_errf(err, "%s: %s", path, strerror(errno));
    } else if (!S_ISREG(sb.st_mode)) {
        qmix_errf(err, "%s: not a regular file", path);
    } else if (sb.st_size == 0) {
        qmix_errf(err, "%s: empty file", path);
    } else {
        void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            qmix_errf(err, "%s: mmap: %s", path, strerror(errno));
        } else {
            *map = m;
            *size = (uint64_t)sb.st_size;
            rc = 0;
        }
    }
    close(fd);
    return rc;
}

void qmix_unmap_file(const uint8_t *map, uint64_t size)
{
    if (map) munmap((void *)map, (size_t)size);
}

/* ---- outputs */

static char *tmp_name(const char *path)
{
    static atomic_uint counter;
    size_t n = strlen(path) + 48;
    char *t = malloc(n);
    if (t)
        snprintf(t, n, "%s.tmp-%ld-%u", path, (long)getpid(),
                 atomic_fetch_add(&counter, 1) & 0xffff);
    return t;
}

int qmix_out_open(const char *path, char **tmp, qmix_err *err)
{
    *tmp = NULL;
    struct stat st;
    if (!stat(path, &st) && !S_ISREG(st.st_mode)) { /* a device or a pipe: in place */
        int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
        if (fd < 0) qmix_errf(err, "cannot open %s: %s", path, strerror(errno));
        return fd;
    }
    char *t = tmp_name(path);
    if (!t) {
        qmix_errf(err, "%s: out of memory", path);
        return -1;
    }
    int fd = open(t, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        qmix_errf(err, "cannot create %s: %s", path, strerror(errno));
        free(t);
        return -1;
    }
    *tmp = t;
    return fd;
}

int qmix_out_commit(int fd, char *tmp, const char *path, qmix_err *err)
{
    int rc = 0;
    /* on disk before the rename: a crash right after it must not leave an empty file */
    if (tmp && fsync(fd)) rc = qmix_errf(err, "%s: %s", path, strerror(errno));
    if (close(fd) && !rc) rc = qmix_errf(err, "%s: %s", path, strerror(errno));
    if (tmp && !rc && rename(tmp, path))
        rc = qmix_errf(err, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (tmp && rc) unlink(tmp);
    free(tmp);
    return rc;
}

void qmix_out_abandon(int fd, char *tmp)
{
    if (fd >= 0) close(fd);
    if (tmp) unlink(tmp);
    free(tmp);
}

/* The stream writes through this, so that the errno of a failed write (ENOSPC, EFBIG) is kept:
 * ferror alone cannot tell it once the buffer is flushed later. */
struct qmix_wsink {
    int fd, err;
};

static ssize_t sink_write(void *cookie, const char *buf, size_t len)
{
    struct qmix_wsink *k = cookie;
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(k->fd, buf + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (!k->err) k->err = n < 0 ? errno : ENOSPC;
            return done ? (ssize_t)done : -1;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

static int sink_seek(void *cookie, off64_t *pos, int whence)
{
    struct qmix_wsink *k = cookie;
    off64_t r = lseek64(k->fd, *pos, whence);
    if (r < 0) return -1;
    *pos = r;
    return 0;
}

int qmix_wfile_open(qmix_wfile *w, const char *path, qmix_err *err)
{
    memset(w, 0, sizeof *w);
    int fd = qmix_out_open(path, &w->tmp, err);
    if (fd < 0) return -1;
    w->path = strdup(path);
    w->sink = malloc(sizeof *w->sink);
    if (w->path && w->sink) {
        *w->sink = (struct qmix_wsink){.fd = fd};
        w->f = fopencookie(w->sink, "w", (cookie_io_functions_t){.write = sink_write,
                                                                 .seek = sink_seek});
    }
    if (!w->f) {
        qmix_out_abandon(fd, w->tmp);
        free(w->path);
        free(w->sink);
        memset(w, 0, sizeof *w);
        return qmix_errf(err, "%s: out of memory", path);
    }
    w->fd = fd;
    return 0;
}

int qmix_wfile_commit(qmix_wfile *w, qmix_err *err)
{
    int rc = 0;
    int bad = fflush(w->f) || ferror(w->f);
    fclose(w->f); /* the descriptor stays open: the cookie does not close it */
    if (bad)
        rc = qmix_errf(err, "cannot write %s: %s", w->path,
                       strerror(w->sink->err ? w->sink->err : EIO));
    if (rc) qmix_out_abandon(w->fd, w->tmp);
    else rc = qmix_out_commit(w->fd, w->tmp, w->path, err);
    free(w->path);
    free(w->sink);
    memset(w, 0, sizeof *w);
    return rc;
}

void qmix_wfile_abandon(qmix_wfile *w)
{
    if (!w->f) return;
    fclose(w->f);
    qmix_out_abandon(w->fd, w->tmp);
    free(w->path);
    free(w->sink);
    memset(w, 0, sizeof *w);
}

int qmix_write_file(const char *path, const void *data, size_t len, qmix_err *err)
{
    qmix_wfile w;
    if (qmix_wfile_open(&w, path, err)) return -1;
    if (len) fwrite(data, 1, len, w.f);
    return qmix_wfile_commit(&w, err);
}

int qmix_write_json(const char *path, const json_t *v, size_t flags, qmix_err *err)
{
    qmix_wfile w;
    if (qmix_wfile_open(&w, path, err)) return -1;
    if (json_dumpf(v, w.f, flags) && !ferror(w.f)) { /* not a write error: an encoding one */
        qmix_wfile_abandon(&w);
        return qmix_errf(err, "cannot write %s: the JSON cannot be encoded", path);
    }
    return qmix_wfile_commit(&w, err);
}

int qmix_copy_file(const char *from, const char *to, int missing_ok, qmix_err *err)
{
    FILE *in = fopen(from, "rb");
    if (!in) {
        if (missing_ok && errno == ENOENT) return 0;
        return qmix_errf(err, "%s: %s", from, strerror(errno));
    }
    qmix_wfile w;
    if (qmix_wfile_open(&w, to, err)) {
        fclose(in);
        return -1;
    }
    char buf[65536];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, k, w.f) != k) break; /* the commit reports it */
    int bad_read = ferror(in);
    fclose(in);
    if (bad_read) {
        qmix_wfile_abandon(&w);
        return qmix_errf(err, "%s: read error", from);
    }
    return qmix_wfile_commit(&w, err);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

int qmix_remove_tree(const char *path)
{
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *e;
    int empty = 1;
    while (empty && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
    closedir(d);
    return empty;
}

static void sync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

int qmix_outdir_begin(qmix_outdir *d, const char *final, qmix_err *err)
{
    memset(d, 0, sizeof *d);
    size_t n = strlen(final);
    while (n > 1 && final[n - 1] == '/') n--;
    d->final = strndup(final, n);
    d->work = d->final ? malloc(n + 40) : NULL;
    if (!d->work) {
        free(d->final);
        d->final = NULL;
        return qmix_errf(err, "out of memory");
    }
    snprintf(d->work, n + 40, "%s.partial-%ld", d->final, (long)getpid());
    qmix_remove_tree(d->work); /* a leftover of an earlier run with this process id */
    if (mkdir(d->work, 0777)) {
        qmix_errf(err, "cannot create %s: %s", d->work, strerror(errno));
        free(d->final);
        free(d->work);
        memset(d, 0, sizeof *d);
        return -1;
    }
    return 0;
}

/* Moves every entry of work into final (config.json last, after final's own was removed). */
static int move_into(const qmix_outdir *d, qmix_err *err)
{
    size_t cap = strlen(d->final) + strlen(d->work) + 512;
    char *a = malloc(cap), *b = malloc(cap);
    DIR *dir = a && b ? opendir(d->work) : NULL;
    int rc = 0;
    if (!dir) {
        rc = qmix_errf(err, "%s: %s", d->work, a && b ? strerror(errno) : "out of memory");
        goto done;
    }
    snprintf(b, cap, "%s/config.json", d->final);
    if (unlink(b) && errno != ENOENT) {
        rc = qmix_errf(err, "cannot remove %s: %s", b, strerror(errno));
        goto done;
    }
    struct dirent *e;
    while (!rc && (e = readdir(dir))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
            !strcmp(e->d_name, "config.json"))
            continue;
        snprintf(a, cap, "%s/%s", d->work, e->d_name);
        snprintf(b, cap, "%s/%s", d->final, e->d_name);
        if (rename(a, b)) rc = qmix_errf(err, "cannot move %s to %s: %s", a, b, strerror(errno));
    }
    snprintf(a, cap, "%s/config.json", d->work);
    snprintf(b, cap, "%s/config.json", d->final);
    if (!rc && rename(a, b) && errno != ENOENT)
        rc = qmix_errf(err, "cannot move %s to %s: %s", a, b, strerror(errno));
done:
    if (dir) closedir(dir);
    free(a);
    free(b);
    return rc;
}

int qmix_outdir_commit(qmix_outdir *d, qmix_err *err)
{
    sync_dir(d->work);
    struct stat st;
    int rc = 0;
    if (stat(d->final, &st)) {
        if (rename(d->work, d->final))
            rc = qmix_errf(err, "cannot rename %s to %s: %s", d->work, d->final, strerror(errno));
    } else if (!S_ISDIR(st.st_mode)) {
        rc = qmix_errf(err, "%s exists and is not a directory", d->final);
    } else if (dir_is_empty(d->final) && !rmdir(d->final)) { /* not a mount point, say */
        if (rename(d->work, d->final))
            rc = qmix_errf(err, "cannot rename %s to %s: %s", d->work, d->final, strerror(errno));
    } else {
        rc = move_into(d, err);
    }
    if (!rc) {
        char *parent = strdup(d->final);
        char *slash = parent ? strrchr(parent, '/') : NULL;
        if (slash) *slash = 0;
        if (parent) sync_dir(slash ? (*parent ? parent : "/") : ".");
        free(parent);
    }
    qmix_outdir_abandon(d); /* whatever is left of work (nothing after a rename) */
    return rc;
}

void qmix_outdir_abandon(qmix_outdir *d)
{
    if (d->work) qmix_remove_tree(d->work);
    free(d->work);
    free(d->final);
    memset(d, 0, sizeof *d);
}

#include "util/fileio.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

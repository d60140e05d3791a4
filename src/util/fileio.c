#include "util/fileio.h"

#include <errno.h>
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

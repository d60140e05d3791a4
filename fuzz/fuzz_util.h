/* For harnesses whose parser reads files: the input written to a file in a directory of this
 * process (created once, reused; libFuzzer runs one input at a time). */
#ifndef QMIX_FUZZ_UTIL_H
#define QMIX_FUZZ_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static inline const char *fuzz_dir(void)
{
    static char dir[64];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/qmix-fuzz-XXXXXX");
        if (!mkdtemp(dir)) __builtin_trap();
    }
    return dir;
}

/* Writes size bytes to DIR/name (or removes it when data is NULL); returns the path (static). */
static inline const char *fuzz_file(const char *name, const uint8_t *data, size_t size)
{
    static char path[4][256];
    static int k;
    char *p = path[k++ & 3];
    snprintf(p, sizeof path[0], "%s/%s", fuzz_dir(), name);
    if (!data) {
        unlink(p);
        return p;
    }
    FILE *f = fopen(p, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f)) __builtin_trap();
    return p;
}

/* The input split at its first occurrence of sep (a byte string): before and after. */
static inline void fuzz_split(const uint8_t *data, size_t size, const char *sep, size_t sep_len,
                       const uint8_t **a, size_t *na, const uint8_t **b, size_t *nb)
{
    for (size_t i = 0; i + sep_len <= size; i++)
        if (!memcmp(data + i, sep, sep_len)) {
            *a = data, *na = i, *b = data + i + sep_len, *nb = size - i - sep_len;
            return;
        }
    *a = data, *na = size, *b = data + size, *nb = 0;
}

#endif

/* libFuzzer harness: arbitrary bytes as a whole safetensors file image (and, second, as header text
 * and data separated by a NUL). A parse either fails with a message naming the input, or every
 * tensor it hands out lies inside the input, is found by its own name, and has a size that matches
 * its shape and dtype. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/safetensors.h"

#define LABEL "fuzz-input.safetensors"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_tensor(const qmix_st_store *st, const qmix_tensor *t, const uint8_t *data,
                         size_t size)
{
    if (!t || !t->name || qmix_st_find(st, t->name) != t) __builtin_trap();
    if (t->ndim < 0 || t->ndim > QMIX_MAX_DIMS) __builtin_trap();
    uint64_t n = qmix_dtype_size(t->dtype);
    if (!n) __builtin_trap();
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0) __builtin_trap();
        n *= (uint64_t)t->shape[d]; /* validated not to overflow */
    }
    if (n != t->nbytes) __builtin_trap();
    const uint8_t *p = t->data;
    if (p < data || t->nbytes > size || (size_t)(p - data) > size - t->nbytes) __builtin_trap();
    if (t->nbytes) {
        /* touch both ends: ASan reports any read outside the input */
        volatile uint8_t first = p[0], last = p[t->nbytes - 1];
        (void)first;
        (void)last;
    }
}

static void parse_image(const uint8_t *data, size_t size)
{
    qmix_err err;
    err.msg[0] = 0;
    qmix_st_store *st = NULL;
    if (qmix_st_open_memory(data, size, LABEL, &st, &err)) {
        if (st || !strstr(err.msg, LABEL)) __builtin_trap();
        return;
    }
    if (qmix_st_file_count(st) != 1 || strcmp(qmix_st_file_path(st, 0), LABEL)) __builtin_trap();
    uint64_t n = qmix_st_count(st);
    for (uint64_t i = 0; i < n; i++) check_tensor(st, qmix_st_at(st, i), data, size);
    if (qmix_st_at(st, n)) __builtin_trap();
    const char *fmt = qmix_st_metadata(st, 0, "format");
    if (fmt) (void)strlen(fmt);
    qmix_st_close(st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the input as a file image */
    parse_image(data, size);
    /* and as "HEADER\0DATA", given the length prefix that matches: mutations of the JSON text then
     * reach the validation instead of dying on an inconsistent length field */
    const uint8_t *nul = memchr(data, 0, size);
    if (nul && nul != data) {
        size_t hl = (size_t)(nul - data), dl = size - hl - 1;
        uint8_t *img = malloc(8 + hl + dl);
        if (!img) return 0;
        for (int i = 0; i < 8; i++) img[i] = (uint8_t)((uint64_t)hl >> (8 * i));
        memcpy(img + 8, data, hl);
        memcpy(img + 8 + hl, nul + 1, dl);
        parse_image(img, 8 + hl + dl);
        free(img);
    }
    return 0;
}

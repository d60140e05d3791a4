/* libFuzzer harness: arbitrary bytes as a GGUF file image. A parse either fails with a message
 * naming the input, or every tensor it hands out lies inside the input, is found by its own name,
 * has 1…4 dims and a byte size matching its type and shape, and every KV reads back through the
 * typed accessors (string arrays walk exactly to their end). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "formats/gguf.h"
#include "quant/ggml_blocks.h"

#define LABEL "fuzz-input.gguf"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_tensor(const qmix_gguf *g, const qmix_gguf_tensor *t, const uint8_t *data,
                         size_t size)
{
    if (!t || !t->name || qmix_gguf_find(g, t->name) != t) __builtin_trap();
    if (t->n_dims < 1 || t->n_dims > 4) __builtin_trap();
    int be = qmix_ggml_block_elems(t->type);
    if (!be || t->ne[0] % be) __builtin_trap();
    uint64_t n = (uint64_t)(t->ne[0] / be) * qmix_ggml_block_bytes(t->type);
    for (int d = 1; d < 4; d++) n *= (uint64_t)t->ne[d];
    for (int d = 0; d < 4; d++)
        if (t->ne[d] < 0) __builtin_trap();
    if (n != t->nbytes) __builtin_trap();
    const uint8_t *p = t->data;
    if (p < data || t->nbytes > size || (size_t)(p - data) > size - t->nbytes) __builtin_trap();
    if (t->nbytes) {
        volatile uint8_t first = p[0], last = p[t->nbytes - 1];
        (void)first;
        (void)last;
    }
}

static void check_kv(const qmix_gguf *g, const qmix_gguf_kv *kv, const uint8_t *data, size_t size)
{
    if (!kv || !kv->key || !kv->key[0] || qmix_gguf_kv_find(g, kv->key) != kv) __builtin_trap();
    qmix_err err;
    int64_t i;
    double f;
    const char *s;
    uint64_t len;
    (void)qmix_gguf_get_int(g, kv->key, &i, &err);
    (void)qmix_gguf_get_float(g, kv->key, &f, &err);
    if (qmix_gguf_get_str(g, kv->key, &s, &len, &err) > 0) {
        if ((const uint8_t *)s < data || len > size || (size_t)((const uint8_t *)s - data) > size - len)
            __builtin_trap();
        if (len) {
            volatile char last = s[len - 1];
            (void)last;
        }
    }
    if (kv->type == QMIX_GGUF_ARRAY && kv->arr_type == QMIX_GGUF_STRING) {
        const uint8_t *cur = kv->data;
        for (uint64_t k = 0; k < kv->arr_n; k++) {
            qmix_gguf_arr_str_next(&cur, &s, &len);
            if (len) {
                volatile char last = s[len - 1];
                (void)last;
            }
        }
        if (cur > data + size) __builtin_trap();
    } else if (kv->type == QMIX_GGUF_ARRAY && kv->arr_n) {
        (void)qmix_gguf_arr_int(kv, kv->arr_n - 1);
        (void)qmix_gguf_arr_float(kv, kv->arr_n - 1);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_err err;
    err.msg[0] = 0;
    qmix_gguf *g = NULL;
    if (qmix_gguf_open_memory(data, size, LABEL, &g, &err)) {
        if (g || !strstr(err.msg, LABEL)) __builtin_trap();
        return 0;
    }
    uint64_t n = qmix_gguf_tensor_count(g);
    for (uint64_t i = 0; i < n; i++) check_tensor(g, qmix_gguf_tensor_at(g, i), data, size);
    if (qmix_gguf_tensor_at(g, n)) __builtin_trap();
    for (uint64_t i = 0; i < qmix_gguf_kv_count(g); i++) check_kv(g, qmix_gguf_kv_at(g, i), data, size);
    qmix_gguf_close(g);
    return 0;
}

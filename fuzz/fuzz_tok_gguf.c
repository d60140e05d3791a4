/* libFuzzer harness: the GGUF tokenizer. Arbitrary bytes as a GGUF file whose tokenizer.ggml.*
 * KVs are rebuilt into a tokenizer.json and loaded; the result encodes and decodes. Seeds: small
 * GGUF files holding only tokenizer KVs (written by qmix_tok_gguf_declare). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "text/tok_gguf.h"
#include "text/tokenizer.h"

#define LABEL "fuzz-tokenizer.gguf"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_gguf *g;
    qmix_err err;
    if (qmix_gguf_open_memory(data, size, LABEL, &g, &err)) return 0;
    char *json = NULL;
    size_t len = 0;
    err.msg[0] = 0;
    if (qmix_tok_gguf_json(g, &json, &len, &err)) {
        if (!err.msg[0]) __builtin_trap();
    } else {
        qmix_tokenizer *t;
        if (!qmix_tok_load_json(json, len, LABEL, &t, &err)) {
            static const char text[] = "Hello, world! <|im_start|>user\n123 \xc3\xa9t\xc3\xa9";
            int32_t *ids = NULL;
            size_t n = 0;
            if (!qmix_tok_encode(t, text, sizeof text - 1, 1, &ids, &n, &err)) {
                char *out = NULL;
                size_t out_len;
                if (!qmix_tok_decode(t, ids, n, 0, &out, &out_len, &err)) free(out);
                free(ids);
            }
            qmix_tok_free(t);
        }
        free(json);
    }
    qmix_gguf_close(g);
    return 0;
}

/* libFuzzer harness: tokenizer.json loading and encoding. The input is a tokenizer.json, then
 * "\n--TEXT--\n", then text to encode (with and without special tokens). A load fails with a
 * message or yields a tokenizer whose encodings decode again. Without a separator the input is
 * encoded with the tiny-a fixture's tokenizer instead. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "text/tokenizer.h"

#define LABEL "fuzz-tokenizer.json"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static qmix_tokenizer *fixture;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    qmix_err err;
    if (qmix_tok_load("testdata/fixtures/tiny-a", &fixture, &err)) __builtin_trap();
    return 0;
}

static void encode_decode(qmix_tokenizer *t, const char *text, size_t len, int special)
{
    int32_t *ids = NULL;
    size_t n = 0;
    qmix_err err;
    if (qmix_tok_encode(t, text, len, special, &ids, &n, &err)) return;
    char *out = NULL;
    size_t out_len = 0;
    if (!qmix_tok_decode(t, ids, n, 0, &out, &out_len, &err)) {
        if (!out || strlen(out) > out_len) __builtin_trap();
        free(out);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *json, *text;
    size_t nj, nt;
    static const char sep[] = "\n--TEXT--\n";
    fuzz_split(data, size, sep, sizeof sep - 1, &json, &nj, &text, &nt);
    if (json + nj == data + size) { /* no separator: text for the fixture */
        encode_decode(fixture, (const char *)data, size, 0);
        encode_decode(fixture, (const char *)data, size, 1);
        return 0;
    }
    qmix_tokenizer *t;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_tok_load_json((const char *)json, nj, LABEL, &t, &err)) {
        if (!err.msg[0]) __builtin_trap();
        return 0;
    }
    encode_decode(t, (const char *)text, nt, 0);
    encode_decode(t, (const char *)text, nt, 1);
    qmix_tok_free(t);
    return 0;
}

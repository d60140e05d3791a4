/* libFuzzer harness: a model directory's generation_config.json and tokenizer_config.json (the
 * input split at "\n--FILE--\n"), read as `qmix serve` and `qmix chat` read them: the
 * end-of-generation ids and sampling defaults, and the chat template (with and without tools).
 * Each read fails with a message or yields values in range. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/config.h"
#include "fuzz_util.h"
#include "text/chat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *gen, *tc;
    size_t ng, nt;
    static const char sep[] = "\n--FILE--\n";
    fuzz_split(data, size, sep, sizeof sep - 1, &gen, &ng, &tc, &nt);
    fuzz_file("generation_config.json", gen, ng);
    if (tc != data + size || (size >= sizeof sep - 1 && !memcmp(data + size - (sizeof sep - 1), sep,
                                                              sizeof sep - 1)))
        fuzz_file("tokenizer_config.json", tc, nt);
    else
        fuzz_file("tokenizer_config.json", NULL, 0);
    qmix_generation_config g;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_generation_config_load(fuzz_dir(), &g, &err)) {
        if (!err.msg[0]) __builtin_trap();
    } else if (g.n_eos < 0 || g.n_eos > QMIX_MAX_EOS) {
        __builtin_trap();
    }
    for (int tools = 0; tools < 2; tools++) {
        char *text = NULL;
        size_t len = 0;
        char source[256];
        err.msg[0] = 0;
        if (qmix_chat_template_load(fuzz_dir(), tools, &text, &len, source, sizeof source,
                                    &err)) {
            if (!err.msg[0] || text) __builtin_trap();
        } else {
            if (!text) __builtin_trap();
            qmix_chat_template_is_qwen35(text, len);
            free(text);
        }
    }
    return 0;
}

/* libFuzzer harness: the chat template renderer's inputs. The bytes are a JSON object
 * {"messages": ..., "tools": ..., "add_generation_prompt": ..., "enable_thinking": ...} as a
 * request carries them; rendering either fails with a message or yields text, and the text
 * encodes with the chat encoder. */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "text/chat.h"
#include "text/tokenizer.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static qmix_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    qmix_err err;
    if (qmix_tok_load("testdata/fixtures/tiny-a", &tok, &err)) __builtin_trap();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t je;
    json_t *root = json_loadb((const char *)data, size, 0, &je);
    if (!root) return 0;
    qmix_chat_opts o;
    qmix_chat_opts_default(&o);
    json_t *v;
    if ((v = json_object_get(root, "add_generation_prompt"))) o.add_generation_prompt = json_is_true(v);
    if ((v = json_object_get(root, "enable_thinking"))) o.enable_thinking = json_is_true(v);
    if ((v = json_object_get(root, "add_vision_id"))) o.add_vision_id = json_is_true(v);
    json_t *messages = json_object_get(root, "messages"), *tools = json_object_get(root, "tools");
    char *out = NULL;
    size_t len = 0;
    qmix_err err;
    err.msg[0] = 0;
    if (messages && !qmix_chat_render(messages, json_is_null(tools) ? NULL : tools, &o, &out, &len,
                                      &err)) {
        if (!out || strlen(out) != len) __builtin_trap();
        int32_t *ids = NULL;
        size_t n = 0;
        if (!qmix_chat_encode(tok, out, len, messages, &ids, &n, &err)) free(ids);
        free(out);
    } else if (messages && !err.msg[0]) {
        __builtin_trap(); /* a failure says why */
    }
    json_decref(root);
    return 0;
}

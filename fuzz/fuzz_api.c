/* libFuzzer harness: arbitrary bytes as the body of POST /v1/chat/completions (first byte even)
 * or /v1/completions (odd): messages, content parts, tools, tool_choice, sampling fields, stop
 * strings, logprobs. The request is checked, templated, tokenized and built into a job exactly as
 * the server does, but not run (api_ctx without an engine). Every answer is a JSON object: an
 * OpenAI error with a 4xx/5xx status, or an accepted request. */
#include <jansson.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"
#include "text/tokenizer.h"

#define TOKENIZER_DIR "testdata/fixtures/tiny-a"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static qmix_tokenizer *tok;
static pthread_mutex_t tok_mu = PTHREAD_MUTEX_INITIALIZER;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    qmix_err err;
    if (qmix_tok_load(TOKENIZER_DIR, &tok, &err)) __builtin_trap(); /* run from the repo root */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!size) return 0;
    json_t *targs = json_pack("{s:b}", "enable_thinking", data[0] & 2);
    api_ctx ctx = {.tok = tok, .tok_mu = &tok_mu, .model_id = "tiny-a",
                   .model_path = TOKENIZER_DIR, .defaults = qmix_sampling_greedy(),
                   .template_args = (data[0] & 4) ? targs : NULL, .ctx = 512};
    api_reply r;
    const char *body = (const char *)data + 1;
    if (data[0] & 1) api_completions(&ctx, body, size - 1, &r);
    else api_chat_completions(&ctx, body, size - 1, &r);
    json_decref(targs);
    if (r.job) __builtin_trap(); /* nothing is submitted without an engine */
    if (r.status == 200) {
        if (r.body) __builtin_trap();
        return 0;
    }
    if (r.status < 400 || r.status > 599 || !r.body) __builtin_trap();
    json_error_t je;
    json_t *v = json_loads(r.body, 0, &je);
    json_t *e = json_object_get(v, "error");
    if (!json_is_string(json_object_get(e, "message")) ||
        !json_is_string(json_object_get(e, "type")))
        __builtin_trap();
    json_decref(v);
    free(r.body);
    return 0;
}

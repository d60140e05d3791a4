/* libFuzzer harness: the tool-call stream parser (model output -> reasoning, content,
 * tool_calls). The first byte picks the options and the chunk size the text is fed in; the
 * result must not depend on how the text was split, and every call's arguments are a JSON
 * object. */
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "text/toolcall.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A tool with typed parameters, so that values are converted by their schema. */
static const char TOOLS[] =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": "
    "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": "
    "{\"type\": \"integer\"}, \"hot\": {\"type\": \"boolean\"}, \"temp\": {\"type\": "
    "\"number\"}, \"tags\": {\"type\": \"array\"}, \"opts\": {\"type\": \"object\"}}}}}]";

static qmix_toolcall_parser *run(const json_t *tools, bool thinking, const uint8_t *text,
                                 size_t len, size_t chunk)
{
    qmix_toolcall_parser *p = qmix_toolcall_parser_new(tools, thinking);
    if (!p) return NULL;
    for (size_t i = 0; i < len; i += chunk)
        if (qmix_toolcall_feed(p, (const char *)text + i, len - i < chunk ? len - i : chunk))
            break;
    qmix_toolcall_finish(p);
    return p;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!size) return 0;
    json_error_t je;
    json_t *tools = (data[0] & 1) ? json_loads(TOOLS, 0, &je) : NULL;
    bool thinking = data[0] & 2;
    size_t chunk = 1 + (data[0] >> 2);
    qmix_toolcall_parser *a = run(tools, thinking, data + 1, size - 1, chunk);
    qmix_toolcall_parser *b = run(tools, thinking, data + 1, size - 1, size);
    if (a && b) {
        size_t la, lb;
        const char *ca = qmix_toolcall_content(a, &la), *cb = qmix_toolcall_content(b, &lb);
        if (la != lb || memcmp(ca, cb, la)) __builtin_trap();
        ca = qmix_toolcall_reasoning(a, &la);
        cb = qmix_toolcall_reasoning(b, &lb);
        if (la != lb || memcmp(ca, cb, la)) __builtin_trap();
        if (qmix_toolcall_count(a) != qmix_toolcall_count(b)) __builtin_trap();
        for (size_t i = 0; i < qmix_toolcall_count(a); i++) {
            const qmix_tool_call *x = qmix_toolcall_at(a, i), *y = qmix_toolcall_at(b, i);
            if (strcmp(x->name, y->name) || strcmp(x->arguments, y->arguments)) __builtin_trap();
            json_t *args = json_loads(x->arguments, JSON_ALLOW_NUL, &je); /* \u0000 is valid */
            if (!json_is_object(args)) __builtin_trap();
            json_decref(args);
        }
    }
    qmix_toolcall_parser_free(a);
    qmix_toolcall_parser_free(b);
    json_decref(tools);
    return 0;
}

/* Incremental parser of Qwen3.5 model output: reasoning (inside <think>…</think>), visible content,
 * and tool calls in the template's XML form
 *
 *   <tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>
 *
 * Text arrives in arbitrary chunks (streaming); a tag split across chunks is held back until it is
 * decided. Reasoning and content only ever grow (a streaming UI prints what is new since it last
 * looked); leading whitespace is skipped and trailing whitespace is held back until more text
 * follows, so at the end both are trimmed as the template trims them on the next turn.
 *
 * Parameter values are typed by the tool's JSON schema (parameters.properties.P.type: string,
 * integer, number, boolean, object, array, null, or a list of these; Python's True/False/None as
 * the template renders them are accepted), falling back to the string with a warning. A malformed
 * or truncated call is never dropped: a warning says what is wrong and its raw text is kept in the
 * content. */
#ifndef QMIX_TEXT_TOOLCALL_H
#define QMIX_TEXT_TOOLCALL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct qmix_tool_call {
    char *name;
    char *arguments; /* a JSON object, as OpenAI's arguments string: {"city": "Paris", "days": 3} */
} qmix_tool_call;

typedef struct qmix_toolcall_parser qmix_toolcall_parser;

/* tools: the tool definitions given to the template (NULL: every value stays a string; the parser
 * keeps its own reference). thinking_open: the prompt ended with "<think>\n", so output starts
 * inside the reasoning. Output that itself starts with <think> opens reasoning either way.
 * Returns NULL when out of memory. */
qmix_toolcall_parser *qmix_toolcall_parser_new(const json_t *tools, bool thinking_open);
void qmix_toolcall_parser_free(qmix_toolcall_parser *p);

/* Feeds the next chunk of output. Returns 0, or -1 when out of memory. */
int qmix_toolcall_feed(qmix_toolcall_parser *p, const char *text, size_t len);
/* End of output: flushes held-back text and reports what was left open (an unclosed <think>, a
 * truncated tool call). Feeding after finish is an error. Returns 0 or -1 (out of memory). */
int qmix_toolcall_finish(qmix_toolcall_parser *p);

/* NUL-terminated; valid until the next feed/finish/free. */
const char *qmix_toolcall_reasoning(const qmix_toolcall_parser *p, size_t *len);
const char *qmix_toolcall_content(const qmix_toolcall_parser *p, size_t *len);
size_t qmix_toolcall_count(const qmix_toolcall_parser *p);
const qmix_tool_call *qmix_toolcall_at(const qmix_toolcall_parser *p, size_t i);
/* Problems found: malformed or truncated calls, values not of their schema type, unknown
 * functions, an unclosed <think>. */
size_t qmix_toolcall_warning_count(const qmix_toolcall_parser *p);
const char *qmix_toolcall_warning(const qmix_toolcall_parser *p, size_t i);

#endif

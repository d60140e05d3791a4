/* The Qwen3.5 chat format, rendered in C exactly as the official chat template
 * (testdata/assets/qwen3.5/chat_template.jinja) renders under transformers' Jinja setup — no
 * general Jinja engine. Input is OpenAI-style messages as jansson values.
 *
 * Conventions beyond the bare template, shared with tools/ref/render_template.py:
 *  - an assistant tool call's `arguments` given as a JSON string is parsed into an object first,
 *    and a null or empty one becomes {} (what vLLM does before rendering; the template itself
 *    only iterates mappings). */
#ifndef QMIX_TEXT_CHAT_H
#define QMIX_TEXT_CHAT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

typedef struct qmix_chat_opts {
    bool add_generation_prompt; /* default true: ends with "<|im_start|>assistant\n<think>\n" */
    bool enable_thinking;       /* default true; false: an empty think block ends the prompt */
    bool add_vision_id;         /* default false: "Picture N: " before each image */
} qmix_chat_opts;

void qmix_chat_opts_default(qmix_chat_opts *opts);

/* Renders messages (a JSON array of {role, content, ...}) and tools (NULL or a JSON array) into
 * *out (malloc'd, NUL-terminated, *out_len bytes). On failure returns -1 and err holds the
 * template's own message where the template raises one ("No user query found in messages.",
 * "System message must be at the beginning.", ...), else a description of what Jinja rejects. */
int qmix_chat_render(const json_t *messages, const json_t *tools, const qmix_chat_opts *opts,
                     char **out, size_t *out_len, qmix_err *err);

/* The official Qwen3.5 chat template, byte for byte (7,756 bytes, no trailing newline). */
extern const char qmix_chat_qwen35_template[];
extern const size_t qmix_chat_qwen35_template_len;

/* Finds a model directory's chat template as transformers does: chat_template.jinja wins over the
 * chat_template field of tokenizer_config.json (a string, or a list of {name, template}: "tool_use"
 * when with_tools and present, else "default"). *text is malloc'd; source (if non-NULL) receives
 * the file it came from. */
int qmix_chat_template_load(const char *model_dir, bool with_tools, char **text, size_t *len,
                            char *source, size_t source_len, qmix_err *err);

/* True when text is the official Qwen3.5 template byte for byte. */
bool qmix_chat_template_is_qwen35(const char *text, size_t len);

/* Python's json.dumps(v, ensure_ascii=False) (transformers' tojson): ", " and ": " separators,
 * insertion order, floats as Python's repr. *out malloc'd, NUL-terminated. Returns 0 or -1 (OOM
 * or a value JSON cannot hold). */
int qmix_chat_json_dumps(const json_t *v, char **out, size_t *len);

/* Python's str() of a JSON scalar (None, True, 1, 1.5, text); containers return -1. */
int qmix_chat_py_str(const json_t *v, char **out, size_t *len);

/* Token ids of a rendered conversation: special-token strings count as special tokens in the
 * template's own text but not inside what users and tools wrote (their message text is encoded as
 * plain text). *ids is malloc'd. */
struct qmix_tokenizer;
int qmix_chat_encode(struct qmix_tokenizer *tok, const char *text, size_t len,
                     const json_t *messages, int32_t **ids, size_t *n_ids, qmix_err *err);

#endif

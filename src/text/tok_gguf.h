/* The GGUF tokenizer KVs (tokenizer.ggml.*, tokenizer.chat_template) in the text layer's terms:
 * the reader rebuilds an equivalent tokenizer.json (byte-level BPE, the pre-tokenizer regex that
 * tokenizer.ggml.pre names) and hands it to qmix_tok_load_json; the writer goes the other way. */
#ifndef QMIX_TEXT_TOK_GGUF_H
#define QMIX_TEXT_TOK_GGUF_H

#include <stddef.h>

#include "formats/gguf.h"
#include "formats/gguf_write.h"
#include "text/tokenizer.h"

/* GGUF token types (llama.cpp's llama_token_type). */
enum { QMIX_TOKTYPE_NORMAL = 1, QMIX_TOKTYPE_UNKNOWN = 2, QMIX_TOKTYPE_CONTROL = 3,
       QMIX_TOKTYPE_USER_DEFINED = 4, QMIX_TOKTYPE_UNUSED = 5, QMIX_TOKTYPE_BYTE = 6 };

/* tokenizer.json text (malloc'd, NUL-terminated) equivalent to g's tokenizer KVs. */
int qmix_tok_gguf_json(const qmix_gguf *g, char **json, size_t *len, qmix_err *err);
/* Loads the tokenizer of a .gguf file (any shard of a split set). */
int qmix_tok_load_gguf(const char *path, qmix_tokenizer **out, qmix_err *err);
/* tokenizer.chat_template of a .gguf file, malloc'd; error if absent. */
int qmix_gguf_chat_template(const char *path, char **text, size_t *len, qmix_err *err);

/* Declares the tokenizer KVs from a tokenizer.json text on w: model "gpt2", pre by regex
 * ("qwen35" or "qwen2"), tokens padded with [PADn] (UNUSED) up to n_vocab, token types, merges,
 * eos/padding ids (from the added tokens named eos_name / pad_name, may be NULL) and the chat
 * template (may be NULL). */
int qmix_tok_gguf_declare(qmix_ggw *w, const char *json, size_t len, int n_vocab,
                          const char *eos_name, const char *pad_name, const char *chat_template,
                          size_t template_len, qmix_err *err);

/* The pre-tokenizer regexes tokenizer.ggml.pre names. */
extern const char *const QMIX_REGEX_QWEN2, *const QMIX_REGEX_QWEN35;

#endif

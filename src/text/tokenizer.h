/* Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (the Qwen2/3/3.5 family and
 * GPT-2-style files): vocab, merges ("a b" strings or ["a","b"] pairs), added tokens, the
 * normalizer (NFC/NFD/NFKC/NFKD, none, or a Sequence of them), the pre-tokenizer (Split with the
 * file's regex, ByteLevel with or without the GPT-2 regex, Sequence) and the ByteLevel decoder.
 *
 * Encoding follows the Rust `tokenizers` crate (what transformers uses): the text is decoded as
 * UTF-8 (invalid sequences become U+FFFD, one per maximal invalid subpart, as Python's
 * errors="replace" and the WHATWG decoder do), added-token strings are cut out first (leftmost,
 * longest) when allowed, each remaining segment is normalized, split by the pre-tokenizer and
 * BPE-merged (lowest merge rank first, leftmost among equals). No BOS/EOS is added.
 *
 * Decoding concatenates the tokens' bytes and, like HF's decode, replaces invalid UTF-8 with
 * U+FFFD; qmix_tok_decode_raw gives the bytes unchanged. The streaming decoder emits only
 * complete UTF-8 sequences and its total output equals qmix_tok_decode of all the ids.
 *
 * A tokenizer is immutable after loading except for an internal word cache guarded by a mutex, so
 * one instance may be shared by threads. */
#ifndef QMIX_TEXT_TOKENIZER_H
#define QMIX_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

typedef struct qmix_tokenizer qmix_tokenizer;

/* path: a tokenizer.json file, or a directory holding one. */
int qmix_tok_load(const char *path, qmix_tokenizer **out, qmix_err *err);
/* The same from a JSON text in memory; label names it in error messages. */
int qmix_tok_load_json(const char *json, size_t len, const char *label, qmix_tokenizer **out,
                       qmix_err *err);
void qmix_tok_free(qmix_tokenizer *tok);

/* Encodes len bytes of text. allow_special: added-token strings (special or not) become their ids,
 * like HF's encode; otherwise they are tokenized as plain text. *ids is malloc'd (the caller frees
 * it; NULL with *n_ids == 0 for an empty result). */
int qmix_tok_encode(qmix_tokenizer *tok, const char *text, size_t len, int allow_special,
                    int32_t **ids, size_t *n_ids, qmix_err *err);

/* Decodes ids to a malloc'd NUL-terminated string (invalid UTF-8 replaced by U+FFFD). Ids out of
 * range are an error. skip_special drops tokens marked special. */
int qmix_tok_decode(const qmix_tokenizer *tok, const int32_t *ids, size_t n, int skip_special,
                    char **out, size_t *out_len, qmix_err *err);
/* The tokens' bytes exactly, without UTF-8 repair. */
int qmix_tok_decode_raw(const qmix_tokenizer *tok, const int32_t *ids, size_t n, int skip_special,
                        char **out, size_t *out_len, qmix_err *err);

/* Vocabulary size: one more than the largest id (model vocab and added tokens). */
int32_t qmix_tok_vocab_size(const qmix_tokenizer *tok);
/* Id of a token in its tokenizer.json spelling ("Ġthe", "<|im_end|>"), or -1. */
int32_t qmix_tok_token_to_id(const qmix_tokenizer *tok, const char *token);
/* The tokenizer.json spelling of an id, or NULL (ids without a token, out of range). */
const char *qmix_tok_id_to_token(const qmix_tokenizer *tok, int32_t id);
/* The raw bytes an id decodes to (not NUL-terminated), or NULL. */
const char *qmix_tok_id_bytes(const qmix_tokenizer *tok, int32_t id, size_t *len);
/* 1 if id is an added token marked "special". */
int qmix_tok_is_special(const qmix_tokenizer *tok, int32_t id);

/* Well-known special tokens by their usual spelling, -1 where the vocabulary has none. */
typedef struct qmix_tok_specials {
    int32_t endoftext;  /* <|endoftext|> (Qwen's bos/pad) */
    int32_t im_start;   /* <|im_start|> */
    int32_t im_end;     /* <|im_end|> (chat eos) */
    int32_t think;      /* <think> */
    int32_t think_end;  /* </think> */
    int32_t tool_call;  /* <tool_call> */
    int32_t tool_call_end; /* </tool_call> */
} qmix_tok_specials;
const qmix_tok_specials *qmix_tok_special_ids(const qmix_tokenizer *tok);

/* Streaming decoder: feed ids one at a time; text comes out only in complete UTF-8 sequences. */
typedef struct qmix_tok_stream {
    const qmix_tokenizer *tok;
    int skip_special;
    unsigned char pend[4]; /* an incomplete UTF-8 sequence held back */
    int npend;
} qmix_tok_stream;

void qmix_tok_stream_init(qmix_tok_stream *s, const qmix_tokenizer *tok, int skip_special);
/* Writes the text that id completes to out (cap bytes, at least 3 * (token bytes + 4);
 * qmix_tok_stream_max gives a size enough for any id) and sets *out_len. Invalid bytes come out as
 * U+FFFD as soon as they cannot begin a valid sequence. Returns -1 for an id not in the vocabulary
 * or a too small cap. */
int qmix_tok_stream_push(qmix_tok_stream *s, int32_t id, char *out, size_t cap, size_t *out_len,
                         qmix_err *err);
/* Ends the stream: a held-back incomplete sequence comes out as U+FFFD (out needs 3 bytes). */
size_t qmix_tok_stream_flush(qmix_tok_stream *s, char *out);
/* Output capacity that qmix_tok_stream_push needs for any id. */
size_t qmix_tok_stream_max(const qmix_tokenizer *tok);

#endif

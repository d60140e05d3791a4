/* Images in OpenAI-style messages, for every front end: image parts found in the order the chat
 * template renders them, their URLs read (data: URLs; file:// and plain paths where the caller
 * allows files; remote URLs refused), and the whole request turned into a prompt with its images
 * encoded and spliced in (model/vision.h). */
#ifndef QMIX_RUNTIME_MM_INPUT_H
#define QMIX_RUNTIME_MM_INPUT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "formats/data_url.h"
#include "model/vision.h"
#include "qmix.h"
#include "text/chat.h"
#include "text/tokenizer.h"

/* An image URL's bytes: data: URLs always; file://PATH and plain paths only with allow_files;
 * http(s) and any other scheme refused. */
int qmix_image_url_read(const char *url, int allow_files, uint8_t **data, size_t *len,
                        qmix_err *err);

/* The image source of each image part of messages, in rendering order (borrowed from messages).
 * Parts the template renders as images: objects with an "image" or "image_url" key or type
 * "image"; the source is image_url (a string or {"url": ...}), else image, else url. A part with
 * none, or a video part, is an error. *urls is malloc'd (NULL when there are none). */
int qmix_messages_image_urls(const json_t *messages, const char ***urls, int *n, qmix_err *err);

/* A rendered request: prompt (tokens, embeddings, positions) and the images it points into. */
typedef struct qmix_mm_request {
    qmix_mm_prompt prompt;
    qmix_prompt_image *images;
    int n_images;
} qmix_mm_request;

/* Renders messages with the Qwen3.5 chat format, encodes them, reads and encodes their images
 * (vision may be NULL when the model has none: a request with images is then an error saying so),
 * at most max_images of them. */
int qmix_mm_request_build(const qmix_model *model, const qmix_vision *vision, qmix_pool *pool,
                          qmix_tokenizer *tok, const json_t *messages, const json_t *tools,
                          const qmix_chat_opts *opts, int allow_files, int max_images,
                          qmix_mm_request *out, qmix_err *err);
/* The same from ids already rendered and encoded (they hold one <|image_pad|> per image part). */
int qmix_mm_request_images(const qmix_vision *vision, qmix_pool *pool, const int32_t *ids,
                           int n_ids, const json_t *messages, int allow_files, int max_images,
                           int embed_dim, qmix_mm_request *out, qmix_err *err);
void qmix_mm_request_free(qmix_mm_request *r);

#endif

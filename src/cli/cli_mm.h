/* The CLI's image front end: --messages conv.json (OpenAI-style, image parts as file:// or data:
 * URLs) or --image FILE with -p TEXT, rendered with the chat format and the images encoded. */
#ifndef QMIX_CLI_CLI_MM_H
#define QMIX_CLI_CLI_MM_H

#include <jansson.h>

#include "qmix.h"
#include "runtime/mm_input.h"
#include "text/tokenizer.h"

#define CLI_MAX_IMAGES 64

/* messages_path: a JSON file holding a list of messages (or {"messages": [...]}); else one user
 * message of the images (paths) then text. */
json_t *cli_mm_messages(const char *messages_path, const char *const *images, int n_images,
                        const char *text, qmix_err *err);

/* Opens the tokenizer of model_dir and, when messages hold images, the model's vision tower (from
 * mmproj, llama.cpp's separate projector GGUF, when not NULL), then
 * builds the request (images read from files or data: URLs, encoded with threads threads). */
int cli_mm_request(qmix_model *model, const char *model_dir, const char *mmproj,
                   const json_t *messages, int threads, int enable_thinking, qmix_tokenizer **tok,
                   qmix_mm_request *req, qmix_err *err);

/* The model's vision tower: from the mmproj file when given, else from the checkpoint. */
int cli_mm_vision(qmix_model *model, const char *mmproj, const qmix_tokenizer *tok,
                  qmix_vision **out, qmix_err *err);

#endif

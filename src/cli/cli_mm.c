#include "cli/cli_mm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/vision.h"
#include "runtime/threadpool.h"
#include "util/err.h"

json_t *cli_mm_messages(const char *messages_path, const char *const *images, int n_images,
                        const char *text, qmix_err *err)
{
    if (messages_path) {
        json_error_t je;
        json_t *root = json_load_file(messages_path, 0, &je);
        if (!root) {
            qmix_errf(err, "%s: %s (line %d)", messages_path, je.text, je.line);
            return NULL;
        }
        json_t *msgs = json_is_object(root) ? json_incref(json_object_get(root, "messages"))
                                            : json_incref(root);
        json_decref(root);
        if (!json_is_array(msgs)) {
            json_decref(msgs);
            qmix_errf(err, "%s: expected a list of messages (or {\"messages\": [...]})",
                      messages_path);
            return NULL;
        }
        return msgs;
    }
    json_t *content = json_array();
    for (int i = 0; i < n_images; i++) {
        json_t *part = json_pack("{s:s, s:{s:s}}", "type", "image_url", "image_url", "url",
                                 images[i]);
        json_array_append_new(content, part);
    }
    json_array_append_new(content, json_pack("{s:s, s:s}", "type", "text", "text", text ? text : ""));
    return json_pack("[{s:s, s:o}]", "role", "user", "content", content);
}

int cli_mm_vision(qmix_model *model, const char *mmproj, const qmix_tokenizer *tok,
                  qmix_vision **out, qmix_err *err)
{
    return mmproj ? qmix_vision_open_mmproj(model, mmproj, tok, out, err)
                  : qmix_vision_open(model, out, err);
}

int cli_mm_request(qmix_model *model, const char *model_dir, const char *mmproj,
                   const json_t *messages, int threads, int enable_thinking, qmix_tokenizer **tok,
                   qmix_mm_request *req, qmix_err *err)
{
    *tok = NULL;
    const char **urls;
    int n_urls;
    qmix_vision *vision = NULL;
    qmix_pool *pool = NULL;
    int rc = -1;
    if (qmix_messages_image_urls(messages, &urls, &n_urls, err)) return -1;
    free(urls);
    if (qmix_tok_load(model_dir, tok, err)) return -1;
    if (n_urls) {
        if (cli_mm_vision(model, mmproj, *tok, &vision, err)) goto done;
        if (!(pool = qmix_pool_new(threads))) {
            qmix_errf(err, "cannot start %d threads", threads);
            goto done;
        }
    }
    qmix_chat_opts co;
    qmix_chat_opts_default(&co);
    co.enable_thinking = enable_thinking;
    rc = qmix_mm_request_build(model, vision, pool, *tok, messages, NULL, &co, 1, CLI_MAX_IMAGES,
                               req, err);
done:
    if (pool) qmix_pool_free(pool);
    qmix_vision_free(vision);
    if (rc) {
        qmix_tok_free(*tok);
        *tok = NULL;
    }
    return rc;
}

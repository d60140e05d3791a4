/* Image parts of OpenAI-style messages: URLs read, images encoded, prompt built (mm_input.h). */
#include "runtime/mm_input.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "formats/data_url.h"
#include "model/model.h"
#include "util/err.h"
#include "util/fileio.h"

int qmix_image_url_read(const char *url, int allow_files, uint8_t **data, size_t *len,
                        qmix_err *err)
{
    *data = NULL;
    *len = 0;
    size_t n = strlen(url);
    if (n >= 5 && !strncasecmp(url, "data:", 5)) return qmix_data_url_decode(url, n, data, len, err);
    const char *path = NULL;
    if (!strncasecmp(url, "file://", 7)) path = url + 7;
    else if (!strstr(url, "://")) path = url;
    if (!path) {
        const char *colon = strstr(url, "://");
        return qmix_errf(err, "image URL scheme '%.*s' is not supported: qmix does not fetch remote "
                         "images; send the image inline as a data: URL (data:image/png;base64,...)",
                         (int)(colon - url > 16 ? 16 : colon - url), url);
    }
    if (!allow_files)
        return qmix_errf(err, "image URLs must be data: URLs here (local files are not read)");
    char *buf;
    if (qmix_read_file(path, QMIX_IMAGE_MAX_FILE_BYTES, &buf, len, err)) return -1;
    *data = (uint8_t *)buf;
    return 0;
}

/* The source of one image part (see mm_input.h), or NULL. */
static const char *part_source(const json_t *item)
{
    json_t *u = json_object_get(item, "image_url");
    if (json_is_string(u)) return json_string_value(u);
    if (json_is_object(u) && json_is_string(json_object_get(u, "url")))
        return json_string_value(json_object_get(u, "url"));
    if (json_is_string(json_object_get(item, "image")))
        return json_string_value(json_object_get(item, "image"));
    if (json_is_string(json_object_get(item, "url")))
        return json_string_value(json_object_get(item, "url"));
    return NULL;
}

int qmix_messages_image_urls(const json_t *messages, const char ***urls, int *n, qmix_err *err)
{
    *urls = NULL;
    *n = 0;
    size_t i, j;
    json_t *msg, *item;
    int count = 0;
    for (int pass = 0; pass < 2; pass++) {
        json_array_foreach(messages, i, msg) {
            json_t *content = json_object_get(msg, "content");
            if (!json_is_array(content)) continue;
            json_array_foreach(content, j, item) {
                if (!json_is_object(item)) continue;
                const char *type = json_string_value(json_object_get(item, "type"));
                int is_image = json_object_get(item, "image") || json_object_get(item, "image_url") ||
                               (type && !strcmp(type, "image"));
                if (!is_image && (json_object_get(item, "video") || (type && !strcmp(type, "video")))) {
                    free(*urls);
                    *urls = NULL;
                    return qmix_errf(err, "messages[%zu].content[%zu]: video input is not "
                                     "supported", i, j);
                }
                if (!is_image) continue;
                const char *src = part_source(item);
                if (!src) {
                    free(*urls);
                    *urls = NULL;
                    return qmix_errf(err, "messages[%zu].content[%zu]: image part without a URL "
                                     "(expected {\"type\": \"image_url\", \"image_url\": {\"url\": "
                                     "...}})", i, j);
                }
                if (pass) (*urls)[(*n)++] = src;
                else count++;
            }
        }
        if (!pass) {
            if (!count) return 0;
            if (!(*urls = malloc(sizeof **urls * (size_t)count)))
                return qmix_errf(err, "out of memory");
        }
    }
    return 0;
}

void qmix_mm_request_free(qmix_mm_request *r)
{
    if (!r) return;
    qmix_mm_prompt_free(&r->prompt);
    for (int i = 0; i < r->n_images; i++) qmix_prompt_image_free(&r->images[i]);
    free(r->images);
    *r = (qmix_mm_request){0};
}

int qmix_mm_request_images(const qmix_vision *vision, qmix_pool *pool, const int32_t *ids,
                           int n_ids, const json_t *messages, int allow_files, int max_images,
                           int embed_dim, qmix_mm_request *out, qmix_err *err)
{
    *out = (qmix_mm_request){0};
    const char **urls = NULL;
    int n_urls = 0, rc = -1;
    if (qmix_messages_image_urls(messages, &urls, &n_urls, err)) return -1;
    if (n_urls && !vision) {
        qmix_errf(err, "this model has no vision tower: it cannot take images");
        goto done;
    }
    if (n_urls > max_images) {
        qmix_errf(err, "too many images: %d (at most %d per request)", n_urls, max_images);
        goto done;
    }
    if (n_urls && !(out->images = calloc((size_t)n_urls, sizeof *out->images))) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int k = 0; k < n_urls; k++) {
        uint8_t *bytes;
        size_t len;
        char label[64];
        snprintf(label, sizeof label, "image %d", k + 1);
        if (qmix_image_url_read(urls[k], allow_files, &bytes, &len, err)) {
            qmix_err_prefix(err, "%s", label);
            goto done;
        }
        int r = qmix_vision_prompt_image(vision, pool, bytes, len, label, &out->images[k], err);
        free(bytes);
        if (r) goto done;
        out->n_images++;
    }
    int image_token = vision ? vision->cfg.image_token_id : -1; /* -1: a text-only prompt */
    if (qmix_mm_prompt_build(ids, n_ids, image_token, out->images, out->n_images, embed_dim,
                             &out->prompt, err))
        goto done;
    rc = 0;
done:
    if (rc) qmix_mm_request_free(out);
    free(urls);
    return rc;
}

int qmix_mm_request_build(const qmix_model *model, const qmix_vision *vision, qmix_pool *pool,
                          qmix_tokenizer *tok, const json_t *messages, const json_t *tools,
                          const qmix_chat_opts *opts, int allow_files, int max_images,
                          qmix_mm_request *out, qmix_err *err)
{
    *out = (qmix_mm_request){0};
    char *text = NULL;
    size_t text_len = 0, n_ids = 0;
    int32_t *ids = NULL;
    int rc = -1;
    if (!qmix_chat_render(messages, tools, opts, &text, &text_len, err) &&
        !qmix_chat_encode(tok, text, text_len, messages, &ids, &n_ids, err))
        rc = qmix_mm_request_images(vision, pool, ids, (int)n_ids, messages, allow_files,
                                    max_images, model->cfg.hidden_size, out, err);
    free(text);
    free(ids);
    return rc;
}

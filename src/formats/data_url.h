#ifndef QMIX_FORMATS_DATA_URL_H
#define QMIX_FORMATS_DATA_URL_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* A data: URL's payload: "data:[type][;params];base64,DATA" (base64 only, standard or URL-safe
 * alphabet; whitespace in the payload is skipped; padding optional). *data is malloc'd, never
 * empty on success. */
int qmix_data_url_decode(const char *url, size_t len, uint8_t **data, size_t *out_len,
                         qmix_err *err);

#endif

/* libFuzzer harness: arbitrary bytes as an image_url data: URL. Decoding either fails with a
 * message or yields a non-empty payload no longer than 3/4 of the URL; the payload then goes
 * through the image decoder (which must fail cleanly or give an image within its limit). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/data_url.h"
#include "formats/image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *payload;
    size_t len;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_data_url_decode((const char *)data, size, &payload, &len, &err)) {
        if (!err.msg[0] || payload) __builtin_trap();
        return 0;
    }
    if (!payload || !len || len > size / 4 * 3 + 3) __builtin_trap();
    volatile uint8_t last = payload[len - 1];
    (void)last;
    qmix_image img;
    if (!qmix_image_decode_limited(payload, len, "data-url", 1u << 20, &img, &err)) {
        if (img.width <= 0 || img.height <= 0) __builtin_trap();
        qmix_image_free(&img);
    }
    free(payload);
    return 0;
}

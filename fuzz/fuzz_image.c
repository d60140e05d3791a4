/* libFuzzer harness: arbitrary bytes as an uploaded image (PNG or JPEG), decoded and preprocessed
 * as the vision tower's input. Decoding either fails with a message naming the input or yields an
 * RGB image within the pixel limit; preprocessing then fails with a message or yields a grid of
 * whole merge blocks within max_pixels whose values are normalised pixels (in [-1, 1] for mean =
 * std = 0.5). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/image.h"

#define LABEL "fuzz-image"
#define MAX_PIXELS (1u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_image img;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_image_decode_limited(data, size, LABEL, MAX_PIXELS, &img, &err)) {
        if (!strstr(err.msg, LABEL) || img.rgb) __builtin_trap();
        return 0;
    }
    if (img.width <= 0 || img.height <= 0 || (uint64_t)img.width * img.height > MAX_PIXELS)
        __builtin_trap();
    volatile uint8_t last = img.rgb[(size_t)img.width * img.height * 3 - 1];
    (void)last;
    qmix_image_prep prep = {.patch = 16, .temporal_patch = 2, .merge = 2, .min_pixels = 4096,
                            .max_pixels = 1 << 18, .mean = {0.5, 0.5, 0.5}, .std = {0.5, 0.5, 0.5}};
    float *values;
    int gh, gw, rh, rw;
    if (qmix_image_patches(&prep, &img, &values, &gh, &gw, &rh, &rw, &err)) {
        if (!err.msg[0]) __builtin_trap();
    } else {
        if (gh <= 0 || gw <= 0 || gh % 2 || gw % 2 || rh != gh * 16 || rw != gw * 16 ||
            (int64_t)rh * rw > prep.max_pixels)
            __builtin_trap();
        for (size_t i = 0; i < (size_t)gh * gw * 1536; i++)
            if (!(values[i] >= -1.0f && values[i] <= 1.0f)) __builtin_trap();
        free(values);
    }
    qmix_image_free(&img);
    return 0;
}

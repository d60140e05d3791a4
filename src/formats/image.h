/* Images in: PNG and JPEG decoded with libpng and libjpeg-turbo into 8-bit RGB the way Hugging
 * Face's image processors see them (Pillow, then transformers' convert_to_rgb: grey replicated,
 * any alpha composited onto white), and Pillow's bicubic resize, bit for bit. Input is untrusted:
 * the header's dimensions are checked against QMIX_IMAGE_MAX_* before any pixel buffer exists. */
#ifndef QMIX_FORMATS_IMAGE_H
#define QMIX_FORMATS_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* Largest image accepted: 32768 pixels a side and 2^27 pixels (384 MiB of RGB) in all. */
#define QMIX_IMAGE_MAX_SIDE 32768
#define QMIX_IMAGE_MAX_PIXELS (1u << 27)
/* Largest encoded file read. */
#define QMIX_IMAGE_MAX_FILE_BYTES (256u << 20)

typedef struct qmix_image {
    int width, height;
    uint8_t *rgb; /* [height][width][3], malloc'd */
} qmix_image;

/* PNG or JPEG, told apart by their signatures; label names the input in errors. */
int qmix_image_decode(const void *data, size_t len, const char *label, qmix_image *out,
                      qmix_err *err);
/* The same with a lower pixel limit (fuzzers, servers). */
int qmix_image_decode_limited(const void *data, size_t len, const char *label, uint64_t max_pixels,
                              qmix_image *out, qmix_err *err);
int qmix_image_load(const char *path, qmix_image *out, qmix_err *err);
void qmix_image_free(qmix_image *img);

/* Pillow's Image.resize((width, height), BICUBIC) on RGB8: separable Keys cubic (a = -0.5),
 * antialiased when shrinking, 22-bit fixed-point weights, horizontal pass first into uint8. */
int qmix_image_resize_bicubic(const qmix_image *in, int width, int height, qmix_image *out,
                              qmix_err *err);

/* The Qwen2-VL image processor's settings (preprocessor_config.json and the vision config). */
typedef struct qmix_image_prep {
    int patch, temporal_patch, merge;   /* ps, tp, m */
    int64_t min_pixels, max_pixels;     /* pixel counts */
    double mean[3], std[3];
} qmix_image_prep;

/* smart_resize: the size an H x W image is stretched to (multiples of ps·m, pixel count within
 * [min_pixels, max_pixels], Python's half-to-even rounding); aspect ratio over 200 is an error. */
int qmix_image_smart_resize(const qmix_image_prep *prep, int height, int width, int *out_h,
                            int *out_w, qmix_err *err);
/* Resize (Pillow bicubic, when the size changes), normalise ((p/255 - mean)/std), repeat over tp
 * frames and cut into patches: *values [gh·gw][3·tp·ps·ps] (malloc'd), rows in merge-block order
 * (m x m blocks in raster order, raster inside), columns (channel, frame, row, column). */
int qmix_image_patches(const qmix_image_prep *prep, const qmix_image *img, float **values, int *gh,
                       int *gw, int *resized_h, int *resized_w, qmix_err *err);

/* transformers' convert_to_rgb for one RGBA pixel: Pillow's alpha_composite over opaque white. */
void qmix_image_rgba_on_white(const uint8_t rgba[4], uint8_t rgb[3]);

#endif

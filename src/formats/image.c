/* PNG / JPEG decoding into RGB8 as Pillow + transformers' convert_to_rgb see it, and Pillow's
 * bicubic resize (the arithmetic of Pillow's Resample.c, 8-bit path). */
#include "formats/image.h"

#include <stdio.h> /* before jpeglib.h, which uses FILE */

#include <jpeglib.h>
#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "util/fileio.h"

void qmix_image_free(qmix_image *img)
{
    if (!img) return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

/* Pillow's ImagingAlphaComposite (7 extra bits of precision, rounded divisions) with an opaque
 * white destination, as transformers' convert_to_rgb composes every non-RGB image. */
void qmix_image_rgba_on_white(const uint8_t rgba[4], uint8_t rgb[3])
{
    uint32_t a = rgba[3];
    if (a == 0) {
        rgb[0] = rgb[1] = rgb[2] = 255;
        return;
    }
    uint32_t blend = 255 * (255 - a), outa255 = a * 255 + blend;
    uint32_t coef1 = a * 255 * 255 * (1u << 7) / outa255, coef2 = 255 * (1u << 7) - coef1;
    for (int ch = 0; ch < 3; ch++) {
        uint32_t tmp = rgba[ch] * coef1 + 255 * coef2 + (0x80u << 7);
        rgb[ch] = (uint8_t)((((tmp >> 8) + tmp) >> 8) >> 7);
    }
}

static int check_dims(const char *label, const char *kind, uint64_t w, uint64_t h,
                      uint64_t max_pixels, qmix_err *err)
{
    if (w == 0 || h == 0) return qmix_errf(err, "%s: %s image has no pixels (%llux%llu)", label, kind,
                                           (unsigned long long)w, (unsigned long long)h);
    if (w > QMIX_IMAGE_MAX_SIDE || h > QMIX_IMAGE_MAX_SIDE || w * h > max_pixels)
        return qmix_errf(err, "%s: %s image of %llux%llu pixels is too large (at most %d a side "
                         "and %llu pixels)", label, kind, (unsigned long long)w,
                         (unsigned long long)h, QMIX_IMAGE_MAX_SIDE, (unsigned long long)max_pixels);
    return 0;
}

/* ---- PNG --------------------------------------------------------------------------------- */

typedef struct png_reader {
    const uint8_t *data;
    size_t len, at;
    char msg[256];
} png_reader;

static void png_on_error(png_structp p, png_const_charp msg)
{
    png_reader *r = png_get_error_ptr(p);
    snprintf(r->msg, sizeof r->msg, "%s", msg);
    png_longjmp(p, 1);
}

static void png_on_warning(png_structp p, png_const_charp msg) { (void)p, (void)msg; }

static void png_read_mem(png_structp p, png_bytep out, size_t n)
{
    png_reader *r = png_get_io_ptr(p);
    if (n > r->len - r->at) png_error(p, "truncated file");
    memcpy(out, r->data + r->at, n);
    r->at += n;
}

static int decode_png(const uint8_t *data, size_t len, const char *label, uint64_t max_pixels,
                      qmix_image *out, qmix_err *err)
{
    png_reader r = {.data = data, .len = len};
    png_structp p = png_create_read_struct(PNG_LIBPNG_VER_STRING, &r, png_on_error, png_on_warning);
    png_infop info = p ? png_create_info_struct(p) : NULL;
    if (!info) {
        png_destroy_read_struct(&p, NULL, NULL);
        return qmix_errf(err, "%s: out of memory", label);
    }
    uint8_t *volatile rgba = NULL;
    png_bytep *volatile rows = NULL;
    if (setjmp(png_jmpbuf(p))) {
        png_destroy_read_struct(&p, &info, NULL);
        free(rgba);
        free(rows);
        return qmix_errf(err, "%s: invalid PNG: %s", label, r.msg[0] ? r.msg : "decoding failed");
    }
    png_set_user_limits(p, QMIX_IMAGE_MAX_SIDE, QMIX_IMAGE_MAX_SIDE);
    png_set_chunk_malloc_max(p, 16u << 20);
    png_set_read_fn(p, &r, png_read_mem);
    png_read_info(p, info);
    png_uint_32 w, h;
    int depth, ctype, interlace;
    png_get_IHDR(p, info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    if (check_dims(label, "PNG", w, h, max_pixels, err)) {
        png_destroy_read_struct(&p, &info, NULL);
        return -1;
    }
    /* palette -> RGB, grey below 8 bits -> 8, tRNS -> alpha; 16 bits keep their high byte (as
     * Pillow's 16-bit unpackers do); always RGBA8 out */
    png_set_expand(p);
    png_set_strip_16(p);
    png_set_gray_to_rgb(p);
    png_set_filler(p, 0xff, PNG_FILLER_AFTER);
    png_set_interlace_handling(p);
    png_read_update_info(p, info);
    if (png_get_rowbytes(p, info) != (size_t)w * 4) png_error(p, "unexpected row layout");
    rgba = malloc((size_t)w * h * 4);
    rows = malloc(sizeof *rows * h);
    if (!rgba || !rows) png_error(p, "out of memory");
    for (png_uint_32 y = 0; y < h; y++) rows[y] = rgba + (size_t)y * w * 4;
    png_read_image(p, rows);
    png_destroy_read_struct(&p, &info, NULL);
    free(rows);
    uint8_t *rgb = malloc((size_t)w * h * 3);
    if (!rgb) {
        free(rgba);
        return qmix_errf(err, "%s: out of memory", label);
    }
    /* convert_to_rgb composes every non-RGB image; for opaque pixels that is the identity */
    for (size_t i = 0; i < (size_t)w * h; i++) qmix_image_rgba_on_white(rgba + 4 * i, rgb + 3 * i);
    free(rgba);
    *out = (qmix_image){.width = (int)w, .height = (int)h, .rgb = rgb};
    return 0;
}

/* ---- JPEG -------------------------------------------------------------------------------- */

typedef struct jpeg_fail {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
} jpeg_fail;

static void jpeg_on_error(j_common_ptr c)
{
    jpeg_fail *f = (jpeg_fail *)c->err;
    f->pub.format_message(c, f->msg);
    longjmp(f->jump, 1);
}

/* Warnings (corrupt or truncated data) are counted, not printed, and refused after decoding. */
static void jpeg_on_message(j_common_ptr c, int level)
{
    if (level < 0) c->err->num_warnings++;
}

static int decode_jpeg(const uint8_t *data, size_t len, const char *label, uint64_t max_pixels,
                       qmix_image *out, qmix_err *err)
{
    struct jpeg_decompress_struct ci;
    jpeg_fail f;
    uint8_t *volatile rgb = NULL;
    memset(&ci, 0, sizeof ci);
    ci.err = jpeg_std_error(&f.pub);
    f.pub.error_exit = jpeg_on_error;
    f.pub.emit_message = jpeg_on_message;
    f.msg[0] = 0;
    if (setjmp(f.jump)) {
        jpeg_destroy_decompress(&ci);
        free(rgb);
        return qmix_errf(err, "%s: invalid JPEG: %s", label, f.msg);
    }
    jpeg_create_decompress(&ci);
    ci.mem->max_memory_to_use = 512L << 20;
    jpeg_mem_src(&ci, data, (unsigned long)len);
    jpeg_read_header(&ci, TRUE);
    if (check_dims(label, "JPEG", ci.image_width, ci.image_height, max_pixels, err)) {
        jpeg_destroy_decompress(&ci);
        return -1;
    }
    if (ci.jpeg_color_space == JCS_CMYK || ci.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&ci);
        return qmix_errf(err, "%s: CMYK JPEG images are not supported (convert to RGB)", label);
    }
    ci.out_color_space = JCS_RGB; /* grey is replicated */
    jpeg_start_decompress(&ci);
    if (ci.output_components != 3) {
        jpeg_destroy_decompress(&ci);
        return qmix_errf(err, "%s: JPEG decodes to %d components, expected 3", label,
                         ci.output_components);
    }
    size_t w = ci.output_width, h = ci.output_height;
    rgb = malloc(w * h * 3);
    if (!rgb) {
        jpeg_destroy_decompress(&ci);
        return qmix_errf(err, "%s: out of memory", label);
    }
    while (ci.output_scanline < ci.output_height) {
        JSAMPROW row = rgb + (size_t)ci.output_scanline * w * 3;
        if (jpeg_read_scanlines(&ci, &row, 1) != 1) break;
    }
    int warnings = (int)ci.err->num_warnings;
    if (ci.output_scanline == ci.output_height) jpeg_finish_decompress(&ci);
    else warnings++;
    jpeg_destroy_decompress(&ci);
    if (warnings) {
        free(rgb);
        return qmix_errf(err, "%s: corrupt or truncated JPEG", label);
    }
    *out = (qmix_image){.width = (int)w, .height = (int)h, .rgb = rgb};
    return 0;
}

int qmix_image_decode_limited(const void *data, size_t len, const char *label, uint64_t max_pixels,
                              qmix_image *out, qmix_err *err)
{
    *out = (qmix_image){0};
    const uint8_t *b = data;
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (max_pixels > QMIX_IMAGE_MAX_PIXELS) max_pixels = QMIX_IMAGE_MAX_PIXELS;
    if (len >= 8 && !memcmp(b, png_sig, 8)) return decode_png(b, len, label, max_pixels, out, err);
    if (len >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff)
        return decode_jpeg(b, len, label, max_pixels, out, err);
    return qmix_errf(err, "%s: not a PNG or JPEG image (%zu bytes)", label, len);
}

int qmix_image_decode(const void *data, size_t len, const char *label, qmix_image *out,
                      qmix_err *err)
{
    return qmix_image_decode_limited(data, len, label, QMIX_IMAGE_MAX_PIXELS, out, err);
}

int qmix_image_load(const char *path, qmix_image *out, qmix_err *err)
{
    char *buf = NULL;
    size_t len = 0;
    *out = (qmix_image){0};
    if (qmix_read_file(path, QMIX_IMAGE_MAX_FILE_BYTES, &buf, &len, err)) return -1;
    int rc = qmix_image_decode(buf, len, path, out, err);
    free(buf);
    return rc;
}

/* ---- Pillow bicubic ---------------------------------------------------------------------- */

#define RS_BITS 22 /* Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2 */

static double bicubic(double x)
{
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* For each output index: first input tap, tap count, and ksize fixed-point weights. */
typedef struct taps { int ksize; int *bounds; int32_t *k; } taps;

static int make_taps(int in_size, int out_size, taps *t)
{
    double scale = (double)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = malloc(sizeof *w * (size_t)ksize);
    t->ksize = ksize;
    t->bounds = malloc(sizeof *t->bounds * 2 * (size_t)out_size);
    t->k = calloc((size_t)out_size * (size_t)ksize, sizeof *t->k);
    if (!w || !t->bounds || !t->k) {
        free(w);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = bicubic((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            double v = ww != 0.0 ? w[x] / ww : w[x];
            t->k[(size_t)xx * ksize + x] =
                (int32_t)(v < 0 ? -0.5 + v * (1 << RS_BITS) : 0.5 + v * (1 << RS_BITS));
        }
        t->bounds[2 * xx] = xmin;
        t->bounds[2 * xx + 1] = xmax;
    }
    free(w);
    return 0;
}

static uint8_t clip8(int32_t v)
{
    if (v >= (1 << RS_BITS << 8)) return 255;
    if (v <= 0) return 0;
    return (uint8_t)(v >> RS_BITS);
}

int qmix_image_resize_bicubic(const qmix_image *in, int width, int height, qmix_image *out,
                              qmix_err *err)
{
    *out = (qmix_image){0};
    if (width <= 0 || height <= 0 || width > QMIX_IMAGE_MAX_SIDE || height > QMIX_IMAGE_MAX_SIDE ||
        (uint64_t)width * (uint64_t)height > QMIX_IMAGE_MAX_PIXELS)
        return qmix_errf(err, "cannot resize to %dx%d", width, height);
    int W = in->width, H = in->height;
    taps th = {0}, tv = {0};
    uint8_t *mid = NULL, *dst = malloc((size_t)width * height * 3);
    int rc = -1;
    if (!dst || make_taps(W, width, &th) || make_taps(H, height, &tv)) goto oom;
    const uint8_t *src = in->rgb;
    int src_w = W;
    if (width != W) { /* horizontal pass over every input row into a uint8 image */
        if (!(mid = malloc((size_t)width * H * 3))) goto oom;
        for (int y = 0; y < H; y++)
            for (int xx = 0; xx < width; xx++) {
                int xmin = th.bounds[2 * xx], n = th.bounds[2 * xx + 1];
                const int32_t *k = th.k + (size_t)xx * th.ksize;
                for (int ch = 0; ch < 3; ch++) {
                    int32_t ss = 1 << (RS_BITS - 1);
                    for (int x = 0; x < n; x++)
                        ss += in->rgb[((size_t)y * W + xmin + x) * 3 + ch] * k[x];
                    mid[((size_t)y * width + xx) * 3 + ch] = clip8(ss);
                }
            }
        src = mid;
        src_w = width;
    }
    if (height != H) {
        for (int yy = 0; yy < height; yy++) {
            int ymin = tv.bounds[2 * yy], n = tv.bounds[2 * yy + 1];
            const int32_t *k = tv.k + (size_t)yy * tv.ksize;
            for (int x = 0; x < src_w * 3; x++) {
                int32_t ss = 1 << (RS_BITS - 1);
                for (int y = 0; y < n; y++) ss += src[(size_t)(ymin + y) * src_w * 3 + x] * k[y];
                dst[(size_t)yy * src_w * 3 + x] = clip8(ss);
            }
        }
    } else {
        memcpy(dst, src, (size_t)src_w * H * 3);
    }
    *out = (qmix_image){.width = width, .height = height, .rgb = dst};
    dst = NULL;
    rc = 0;
oom:
    if (rc) qmix_errf(err, "out of memory resizing a %dx%d image to %dx%d", W, H, width, height);
    free(dst);
    free(mid);
    free(th.bounds);
    free(th.k);
    free(tv.bounds);
    free(tv.k);
    return rc;
}

/* ---- Qwen2-VL preprocessing ------------------------------------------------------------ */

/* Python's round(): half to even. */
static double round_half_even(double x)
{
    double r = nearbyint(x); /* the default rounding mode is to nearest, ties to even */
    return r;
}

int qmix_image_smart_resize(const qmix_image_prep *c, int height, int width, int *out_h,
                            int *out_w, qmix_err *err)
{
    double F = (double)c->patch * c->merge;
    if (height <= 0 || width <= 0) return qmix_errf(err, "image has no pixels");
    double hi = height > width ? height : width, lo = height > width ? width : height;
    if (hi / lo > 200)
        return qmix_errf(err, "image aspect ratio %dx%d is over 200 (the limit of the Qwen image "
                         "processor)", width, height);
    double h = round_half_even(height / F) * F, w = round_half_even(width / F) * F;
    if (h * w > (double)c->max_pixels) {
        double beta = sqrt((double)height * width / (double)c->max_pixels);
        h = fmax(F, floor(height / beta / F) * F);
        w = fmax(F, floor(width / beta / F) * F);
    } else if (h * w < (double)c->min_pixels) {
        double beta = sqrt((double)c->min_pixels / ((double)height * width));
        h = ceil(height * beta / F) * F;
        w = ceil(width * beta / F) * F;
    }
    if (h < F) h = F; /* an image smaller than one merged patch still gets one */
    if (w < F) w = F;
    if (h > QMIX_IMAGE_MAX_SIDE || w > QMIX_IMAGE_MAX_SIDE || h * w > QMIX_IMAGE_MAX_PIXELS)
        return qmix_errf(err, "image of %dx%d would be resized to %.0fx%.0f: too large", width,
                         height, w, h);
    *out_h = (int)h;
    *out_w = (int)w;
    return 0;
}

int qmix_image_patches(const qmix_image_prep *c, const qmix_image *img, float **values, int *out_gh,
                       int *out_gw, int *resized_h, int *resized_w, qmix_err *err)
{
    *values = NULL;
    int H, W;
    if (qmix_image_smart_resize(c, img->height, img->width, &H, &W, err)) return -1;
    qmix_image resized = {0};
    const qmix_image *src = img;
    if (H != img->height || W != img->width) {
        if (qmix_image_resize_bicubic(img, W, H, &resized, err)) return -1;
        src = &resized;
    }
    int ps = c->patch, tp = c->temporal_patch, m = c->merge;
    int gh = H / ps, gw = W / ps;
    int64_t K = 3LL * tp * ps * ps, N = (int64_t)gh * gw;
    float *vals = malloc((size_t)(N * K) * sizeof(float));
    if (!vals) {
        qmix_image_free(&resized);
        return qmix_errf(err, "out of memory for %lld image patches", (long long)N);
    }
    float lut[3][256]; /* (p/255 - mean)/std, computed as the processor does, in double */
    for (int ch = 0; ch < 3; ch++)
        for (int p = 0; p < 256; p++) lut[ch][p] = (float)((p / 255.0 - c->mean[ch]) / c->std[ch]);
    /* rows: merge blocks in raster order, (0,0) (0,1) (1,0) (1,1) inside; columns: channel,
     * frame (the image repeated tp times), pixel row, pixel column */
    int64_t row = 0;
    for (int br = 0; br < gh / m; br++)
        for (int bc = 0; bc < gw / m; bc++)
            for (int mi = 0; mi < m; mi++)
                for (int mj = 0; mj < m; mj++, row++) {
                    int pr = br * m + mi, pc = bc * m + mj;
                    float *o = vals + row * K;
                    for (int ch = 0; ch < 3; ch++)
                        for (int t = 0; t < tp; t++)
                            for (int y = 0; y < ps; y++)
                                for (int x = 0; x < ps; x++) {
                                    size_t at = ((size_t)(pr * ps + y) * W + (size_t)(pc * ps + x)) * 3 + ch;
                                    *o++ = lut[ch][src->rgb[at]];
                                }
                }
    qmix_image_free(&resized);
    *values = vals;
    *out_gh = gh;
    *out_gw = gw;
    *resized_h = H;
    *resized_w = W;
    return 0;
}

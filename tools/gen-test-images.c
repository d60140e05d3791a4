/* Writes the small PNG / JPEG images of testdata/images (and the fuzz seeds in fuzz/corpus/image):
 * every PNG colour type, 2- and 16-bit depths, interlacing, baseline / grey / progressive JPEG,
 * with byte b of row y = (b*37 + y*11) mod 256. cc tools/gen-test-images.c -lpng16 -ljpeg && ./a.out DIR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <png.h>
#include <jpeglib.h>
static void wpng(const char *path, int w, int h, int ctype, int depth, int interlace, int trns) {
    FILE *f = fopen(path, "wb");
    png_structp p = png_create_write_struct(PNG_LIBPNG_VER_STRING, 0, 0, 0);
    png_infop i = png_create_info_struct(p);
    png_init_io(p, f);
    png_set_IHDR(p, i, w, h, depth, ctype, interlace, 0, 0);
    if (ctype == PNG_COLOR_TYPE_PALETTE) {
        png_color pal[4] = {{255,0,0},{0,255,0},{0,0,255},{9,99,199}};
        png_set_PLTE(p, i, pal, 4);
        if (trns) { png_byte t[4] = {255, 0, 128, 255}; png_set_tRNS(p, i, t, 4, NULL); }
    }
    png_write_info(p, i);
    int ch = ctype == PNG_COLOR_TYPE_RGB ? 3 : ctype == PNG_COLOR_TYPE_RGBA ? 4 : ctype == PNG_COLOR_TYPE_GRAY_ALPHA ? 2 : 1;
    int bpr = (w * ch * depth + 7) / 8;
    png_bytep row = malloc(bpr);
    int passes = png_set_interlace_handling(p);
    for (int pass = 0; pass < passes; pass++)
    for (int y = 0; y < h; y++) {
        for (int b = 0; b < bpr; b++) row[b] = (unsigned char)(b * 37 + y * 11);
        if (ctype == PNG_COLOR_TYPE_PALETTE) for (int b = 0; b < bpr; b++) row[b] &= depth == 8 ? 3 : 0x55;
        png_write_row(p, row);
    }
    png_write_end(p, i);
    png_destroy_write_struct(&p, &i);
    fclose(f);
    free(row);
}
static void wjpg(const char *path, int w, int h, int grey, int prog) {
    struct jpeg_compress_struct c; struct jpeg_error_mgr e;
    c.err = jpeg_std_error(&e); jpeg_create_compress(&c);
    FILE *f = fopen(path, "wb"); jpeg_stdio_dest(&c, f);
    c.image_width = w; c.image_height = h; c.input_components = grey ? 1 : 3; c.in_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_set_defaults(&c); jpeg_set_quality(&c, 75, TRUE); if (prog) jpeg_simple_progression(&c);
    jpeg_start_compress(&c, TRUE);
    unsigned char *row = malloc(w * 3);
    while (c.next_scanline < c.image_height) {
        for (int b = 0; b < w * c.input_components; b++) row[b] = (unsigned char)(b * 5 + c.next_scanline * 7);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c); jpeg_destroy_compress(&c); fclose(f); free(row);
}
int main(int argc, char **argv) {
    char p[512]; const char *d = argv[1];
    snprintf(p, sizeof p, "%s/rgb40x24.png", d); wpng(p, 40, 24, PNG_COLOR_TYPE_RGB, 8, 0, 0);
    snprintf(p, sizeof p, "%s/grey17x9.png", d); wpng(p, 17, 9, PNG_COLOR_TYPE_GRAY, 8, 0, 0);
    snprintf(p, sizeof p, "%s/grey2bit.png", d); wpng(p, 13, 5, PNG_COLOR_TYPE_GRAY, 2, 0, 0);
    snprintf(p, sizeof p, "%s/rgba20.png", d); wpng(p, 20, 20, PNG_COLOR_TYPE_RGBA, 8, 0, 0);
    snprintf(p, sizeof p, "%s/greyalpha.png", d); wpng(p, 9, 7, PNG_COLOR_TYPE_GRAY_ALPHA, 8, 0, 0);
    snprintf(p, sizeof p, "%s/pal_trns.png", d); wpng(p, 12, 12, PNG_COLOR_TYPE_PALETTE, 8, 0, 1);
    snprintf(p, sizeof p, "%s/rgb16.png", d); wpng(p, 6, 6, PNG_COLOR_TYPE_RGB, 16, 0, 0);
    snprintf(p, sizeof p, "%s/interlaced.png", d); wpng(p, 33, 17, PNG_COLOR_TYPE_RGB, 8, PNG_INTERLACE_ADAM7, 0);
    snprintf(p, sizeof p, "%s/rgb40x24.jpg", d); wjpg(p, 40, 24, 0, 0);
    snprintf(p, sizeof p, "%s/grey10.jpg", d); wjpg(p, 10, 10, 1, 0);
    snprintf(p, sizeof p, "%s/progressive.jpg", d); wjpg(p, 24, 16, 0, 1);
    return 0;
}

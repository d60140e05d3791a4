/* ggml block formats: type table and scalar dequantization, written from the field layouts of
 * spec/quant-formats.md §5.3 (element j of a block; all multi-byte fields little-endian). These
 * are the references the fused kernels are tested against, so they favour plainness. */
#include "quant/ggml_blocks.h"

#include <math.h>
#include <string.h>


typedef struct gtype {
    const char *name;
    int elems;      /* per block; 0 = geometry unknown to qmix */
    size_t bytes;   /* per block */
    int supported;  /* dequantizable */
} gtype;

/* Ids ggml defines (§5.2). The geometry of the unsupported types is still listed where known so
 * a file holding them opens and the error comes when such a tensor is used. */
static const gtype types[QMIX_GGML_TYPE_LIMIT] = {
    [0] = {"F32", 1, 4, 1},        [1] = {"F16", 1, 2, 1},        [2] = {"Q4_0", 32, 18, 1},
    [3] = {"Q4_1", 32, 20, 1},     [6] = {"Q5_0", 32, 22, 1},     [7] = {"Q5_1", 32, 24, 1},
    [8] = {"Q8_0", 32, 34, 1},     [9] = {"Q8_1", 32, 36, 0},     [10] = {"Q2_K", 256, 84, 1},
    [11] = {"Q3_K", 256, 110, 1},  [12] = {"Q4_K", 256, 144, 1},  [13] = {"Q5_K", 256, 176, 1},
    [14] = {"Q6_K", 256, 210, 1},  [15] = {"Q8_K", 256, 292, 0},  [16] = {"IQ2_XXS", 256, 66, 0},
    [17] = {"IQ2_XS", 256, 74, 0}, [18] = {"IQ3_XXS", 256, 98, 0}, [19] = {"IQ1_S", 256, 50, 0},
    [20] = {"IQ4_NL", 32, 18, 1},  [21] = {"IQ3_S", 256, 110, 0}, [22] = {"IQ2_S", 256, 82, 0},
    [23] = {"IQ4_XS", 256, 136, 1}, [24] = {"I8", 1, 1, 0},       [25] = {"I16", 1, 2, 0},
    [26] = {"I32", 1, 4, 0},       [27] = {"I64", 1, 8, 0},       [28] = {"F64", 1, 8, 0},
    [29] = {"IQ1_M", 256, 56, 0},  [30] = {"BF16", 1, 2, 1},      [34] = {"TQ1_0", 256, 54, 0},
    [35] = {"TQ2_0", 256, 66, 0},  [39] = {"MXFP4", 32, 17, 0},   [40] = {"NVFP4", 0, 0, 0},
    [41] = {"Q1_0", 0, 0, 0},      [42] = {"Q2_0", 0, 0, 0},
};

const int8_t qmix_ggml_iq4_table[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                        1,    13,   25,  38,  53,  69,  89,  113};

const char *qmix_ggml_type_name(int type)
{
    return type >= 0 && type < QMIX_GGML_TYPE_LIMIT ? types[type].name : NULL;
}

int qmix_ggml_block_elems(int type)
{
    return type >= 0 && type < QMIX_GGML_TYPE_LIMIT ? types[type].elems : 0;
}

size_t qmix_ggml_block_bytes(int type)
{
    return type >= 0 && type < QMIX_GGML_TYPE_LIMIT ? types[type].bytes : 0;
}

int qmix_ggml_type_supported(int type)
{
    return type >= 0 && type < QMIX_GGML_TYPE_LIMIT && types[type].supported;
}

size_t qmix_ggml_row_bytes(int type, int64_t cols)
{
    int be = qmix_ggml_block_elems(type);
    if (!be || cols < 0 || cols % be) return 0;
    return (size_t)(cols / be) * qmix_ggml_block_bytes(type);
}

/* IEEE half -> float, exact. Local (not kernels/convert.c) so the GGUF parser and its fuzzer
 * need nothing beyond src/formats and this file. */
static float f16_at(const uint8_t *p)
{
    unsigned h = (unsigned)(p[0] | p[1] << 8), e = (h >> 10) & 31, mant = h & 1023;
    float v = e == 31 ? (mant ? NAN : INFINITY)
              : e     ? ldexpf((float)(mant | 1024), (int)e - 25)
                      : ldexpf((float)mant, -24);
    return h & 0x8000 ? -v : v;
}

static float bf16_at(const uint8_t *p)
{
    uint32_t bits = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The 6-bit scale and min of sub-block s of a Q4_K/Q5_K block's 12-byte field. */
static void scale_min_k4(const uint8_t *sc, int s, int *scale, int *min)
{
    if (s < 4) {
        *scale = sc[s] & 63;
        *min = sc[s + 4] & 63;
    } else {
        *scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
        *min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
}

static void dq_q4_0(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b[2 + j] & 15) - 8);
        y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void dq_q4_1(const uint8_t *b, float *y)
{
    float d = f16_at(b), m = f16_at(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(b[4 + j] & 15) + m;
        y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

static uint32_t u32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void dq_q5_0(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    uint32_t qh = u32_at(b + 2);
    for (int j = 0; j < 16; j++) {
        int lo = (b[6 + j] & 15) | (int)((qh >> j) & 1) << 4;
        int hi = (b[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void dq_q5_1(const uint8_t *b, float *y)
{
    float d = f16_at(b), m = f16_at(b + 2);
    uint32_t qh = u32_at(b + 4);
    for (int j = 0; j < 16; j++) {
        int lo = (b[8 + j] & 15) | (int)((qh >> j) & 1) << 4;
        int hi = (b[8 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static void dq_q8_0(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)b[2 + j];
}

static void dq_q2_k(const uint8_t *b, float *y)
{
    const uint8_t *scales = b, *qs = b + 16;
    float d = f16_at(b + 80), dmin = f16_at(b + 82);
    for (int j = 0; j < 256; j++) {
        int h = j / 128, t = (j % 128) / 32, l = j % 32, s = j / 16;
        int q = (qs[32 * h + l] >> (2 * t)) & 3;
        y[j] = d * (float)(scales[s] & 15) * (float)q - dmin * (float)(scales[s] >> 4);
    }
}

static void dq_q3_k(const uint8_t *b, float *y)
{
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    float d = f16_at(b + 108);
    for (int j = 0; j < 256; j++) {
        int h = j / 128, t = (j % 128) / 32, l = j % 32, s = j / 16;
        int low = (qs[32 * h + l] >> (2 * t)) & 3;
        int hb = (hmask[j % 32] >> (j / 32)) & 1;
        int q = low - (hb ? 0 : 4);
        int lo4 = s < 8 ? sc[s] & 15 : sc[s - 8] >> 4;
        int hi2 = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
        y[j] = d * (float)((lo4 | hi2 << 4) - 32) * (float)q;
    }
}

static void dq_q4_k(const uint8_t *b, float *y)
{
    float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *sc = b + 4, *qs = b + 16;
    for (int s = 0; s < 8; s++) {
        int scale, min;
        scale_min_k4(sc, s, &scale, &min);
        float ds = d * (float)scale, dm = dmin * (float)min;
        const uint8_t *q = qs + 32 * (s / 2);
        for (int l = 0; l < 32; l++)
            y[32 * s + l] = ds * (float)(s % 2 ? q[l] >> 4 : q[l] & 15) - dm;
    }
}

static void dq_q5_k(const uint8_t *b, float *y)
{
    float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + 48;
    for (int s = 0; s < 8; s++) {
        int scale, min;
        scale_min_k4(sc, s, &scale, &min);
        float ds = d * (float)scale, dm = dmin * (float)min;
        const uint8_t *q = qs + 32 * (s / 2);
        for (int l = 0; l < 32; l++) {
            int v = (s % 2 ? q[l] >> 4 : q[l] & 15) | ((qh[l] >> s) & 1) << 4;
            y[32 * s + l] = ds * (float)v - dm;
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    for (int j = 0; j < 256; j++) {
        int h = j / 128, t = (j % 128) / 32, l = j % 32;
        int lb = ql[64 * h + 32 * (t & 1) + l];
        int low = t < 2 ? lb & 15 : lb >> 4;
        int high = (qh[32 * h + l] >> (2 * t)) & 3;
        y[j] = d * (float)sc[j / 16] * (float)((low | high << 4) - 32);
    }
}

static void dq_iq4_nl(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)qmix_ggml_iq4_table[b[2 + j] & 15];
        y[j + 16] = d * (float)qmix_ggml_iq4_table[b[2 + j] >> 4];
    }
}

static void dq_iq4_xs(const uint8_t *b, float *y)
{
    float d = f16_at(b);
    unsigned scales_h = (unsigned)(b[2] | b[3] << 8);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int s = 0; s < 8; s++) {
        int ls = ((scales_l[s / 2] >> (4 * (s % 2))) & 15) | (int)((scales_h >> (2 * s)) & 3) << 4;
        float dl = d * (float)(ls - 32);
        for (int l = 0; l < 32; l++) {
            int nib = l < 16 ? qs[16 * s + l] & 15 : qs[16 * s + l - 16] >> 4;
            y[32 * s + l] = dl * (float)qmix_ggml_iq4_table[nib];
        }
    }
}

void qmix_ggml_dequant_block(int type, const uint8_t *b, float *y)
{
    switch (type) {
    case QMIX_GGML_F32: memcpy(y, b, 4); break;
    case QMIX_GGML_F16: y[0] = f16_at(b); break;
    case QMIX_GGML_BF16: y[0] = bf16_at(b); break;
    case QMIX_GGML_Q4_0: dq_q4_0(b, y); break;
    case QMIX_GGML_Q4_1: dq_q4_1(b, y); break;
    case QMIX_GGML_Q5_0: dq_q5_0(b, y); break;
    case QMIX_GGML_Q5_1: dq_q5_1(b, y); break;
    case QMIX_GGML_Q8_0: dq_q8_0(b, y); break;
    case QMIX_GGML_Q2_K: dq_q2_k(b, y); break;
    case QMIX_GGML_Q3_K: dq_q3_k(b, y); break;
    case QMIX_GGML_Q4_K: dq_q4_k(b, y); break;
    case QMIX_GGML_Q5_K: dq_q5_k(b, y); break;
    case QMIX_GGML_Q6_K: dq_q6_k(b, y); break;
    case QMIX_GGML_IQ4_NL: dq_iq4_nl(b, y); break;
    case QMIX_GGML_IQ4_XS: dq_iq4_xs(b, y); break;
    default: {
        int n = qmix_ggml_block_elems(type);
        for (int j = 0; j < (n ? n : 1); j++) y[j] = NAN;
    }
    }
}

void qmix_ggml_dequant_row(int type, const void *row, int64_t cols, float *out)
{
    int be = qmix_ggml_block_elems(type);
    size_t bb = qmix_ggml_block_bytes(type);
    if (!be || !qmix_ggml_type_supported(type)) {
        for (int64_t i = 0; i < cols; i++) out[i] = NAN;
        return;
    }
    const uint8_t *p = row;
    for (int64_t k = 0; k < cols; k += be, p += bb) qmix_ggml_dequant_block(type, p, out + k);
}

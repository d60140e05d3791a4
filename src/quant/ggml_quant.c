/* ggml block quantization (writers): so far the Q8_0 reference of spec/quant-formats.md §5.3. */
#include <math.h>

#include "kernels/kernels.h"
#include "quant/ggml_blocks.h"

void qmix_ggml_quantize_row_q8_0(const float *x, int64_t cols, void *out)
{
    uint8_t *b = out;
    for (int64_t k = 0; k < cols; k += 32, b += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[k + j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h = qk_f32_to_f16(d);
        b[0] = (uint8_t)h;
        b[1] = (uint8_t)(h >> 8);
        for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)roundf(x[k + j] * id);
    }
}

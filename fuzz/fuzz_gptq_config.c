/* libFuzzer harness: a GPTQ checkpoint's quantization_config (config.json of a GPTQ model): the
 * bytes as the object, as a whole config.json (read from a file, as qmix reads it), and the
 * quantization_config as the MLX/qmix per-module reader sees it. A parse fails with a message or
 * yields bits and groups qmix can use. */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "quant/gptq_format.h"

#define LABEL "fuzz-config.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int r, const qmix_gptq_info *info, const qmix_err *err)
{
    if (r < 0 && !err->msg[0]) __builtin_trap();
    if (r == 1 && (!qmix_gptq_bits_valid(info->bits) || (info->group != -1 && info->group <= 0)))
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t je;
    json_t *v = json_loadb((const char *)data, size, 0, &je);
    qmix_gptq_info info;
    qmix_err err;
    if (json_is_object(v)) {
        err.msg[0] = 0;
        check(qmix_gptq_info_parse(v, LABEL, &info, &err), &info, &err);
    }
    json_decref(v);
    err.msg[0] = 0;
    check(qmix_gptq_info_load(fuzz_file("config.json", data, size), &info, &err), &info, &err);
    return 0;
}

/* libFuzzer harness: importance matrices (--imatrix FILE): llama.cpp's legacy .dat, or its GGUF
 * form (input starting with "GGUF", read from a file as qmix reads it). A load fails with a
 * message or yields entries whose lookups stay inside them. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "formats/config.h"
#include "quant/imatrix.h"

#define LABEL "fuzz-imatrix.dat"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static qmix_config cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    qmix_err err;
    if (qmix_config_load("testdata/fixtures/tiny-a/config.json", &cfg, &err)) __builtin_trap();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_imatrix *im = NULL;
    qmix_err err;
    err.msg[0] = 0;
    int rc;
    if (size >= 4 && !memcmp(data, "GGUF", 4))
        rc = qmix_imatrix_load(fuzz_file("imatrix.gguf", data, size), &im, &err);
    else
        rc = qmix_imatrix_load_dat_memory(data, size, LABEL, &im, &err);
    if (rc) {
        if (!err.msg[0] || im) __builtin_trap();
        return 0;
    }
    /* lookups of the fixture's linears: found values are written in full, absent ones say so */
    static const char *const names[] = {"model.language_model.layers.0.mlp.experts.down_proj",
                                        "model.language_model.layers.0.linear_attn.in_proj_qkv",
                                        "model.language_model.layers.3.self_attn.q_proj",
                                        "model.language_model.layers.0.mlp.shared_expert.up_proj"};
    float out[4096];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        for (int64_t k = 16; k <= 4096; k *= 4) {
            int64_t count;
            qmix_err e2;
            qmix_imatrix_lookup(im, names[i], 0, k, &cfg, out, &count, &e2);
        }
    qmix_imatrix_free(im);
    return 0;
}

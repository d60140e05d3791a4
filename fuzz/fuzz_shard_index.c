/* libFuzzer harness: model.safetensors.index.json, the shard index of a sharded checkpoint. The
 * bytes are the index of a directory that holds two small, valid shards (tensors a and b in
 * model-00001-of-00002.safetensors, c in model-00002-of-00002.safetensors). Opening fails with a
 * message, or every tensor it lists is one of the shards' and readable. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "formats/safetensors.h"
#include "formats/safetensors_write.h"
#include "fuzz_util.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void write_shard(const char *name, const char *const *tensors, int n)
{
    qmix_stw_tensor t[4];
    for (int i = 0; i < n; i++)
        t[i] = (qmix_stw_tensor){.name = tensors[i], .dtype = QMIX_F32, .ndim = 2,
                                 .shape = {2, 3}};
    qmix_stw *w;
    qmix_err err;
    static const float v[6] = {1, 2, 3, 4, 5, 6};
    if (qmix_stw_open(fuzz_file(name, NULL, 0), t, (size_t)n, NULL, 0, &w, &err))
        __builtin_trap();
    for (int i = 0; i < n; i++)
        if (qmix_stw_begin(w, tensors[i], &err) || qmix_stw_write(w, v, sizeof v, &err))
            __builtin_trap();
    if (qmix_stw_close(w, &err)) __builtin_trap();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    static const char *const first[] = {"a", "b"}, *const second[] = {"c"};
    write_shard("model-00001-of-00002.safetensors", first, 2);
    write_shard("model-00002-of-00002.safetensors", second, 1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_file("model.safetensors.index.json", data, size);
    qmix_st_store *st;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_st_open(fuzz_dir(), &st, &err)) {
        if (!err.msg[0]) __builtin_trap();
        return 0;
    }
    for (uint64_t i = 0; i < qmix_st_count(st); i++) {
        const qmix_tensor *t = qmix_st_at(st, i);
        if (qmix_st_find(st, t->name) != t) __builtin_trap();
        if (strcmp(t->name, "a") && strcmp(t->name, "b") && strcmp(t->name, "c"))
            __builtin_trap();
        volatile float sum = 0;
        for (int k = 0; k < 6; k++) sum += ((const float *)t->data)[k];
        (void)sum;
    }
    qmix_st_close(st);
    return 0;
}

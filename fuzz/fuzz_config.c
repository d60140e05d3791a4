/* libFuzzer harness: arbitrary bytes as config.json. A parse either fails with a message naming the
 * input, or yields a geometry that respects every invariant the loader relies on. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "formats/config.h"

#define LABEL "fuzz-config.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qmix_config c;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_config_parse((const char *)data, size, LABEL, &c, &err)) {
        if (!strstr(err.msg, LABEL)) __builtin_trap();
        return 0;
    }
    const int dims[] = {c.hidden_size,     c.n_layers,       c.vocab_size,     c.n_heads,
                        c.n_kv_heads,      c.head_dim,       c.lin_n_k_heads,  c.lin_n_v_heads,
                        c.lin_k_head_dim,  c.lin_v_head_dim, c.conv_kernel,    c.n_experts,
                        c.n_experts_used,  c.moe_ffn,        c.shared_ffn};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i] <= 0 || dims[i] > (1 << 24)) __builtin_trap();
    if (c.n_layers > QMIX_MAX_LAYERS) __builtin_trap();
    if (c.n_heads % c.n_kv_heads || c.lin_n_v_heads % c.lin_n_k_heads) __builtin_trap();
    if (c.n_experts_used > c.n_experts) __builtin_trap();
    if (c.rot_dim <= 0 || c.rot_dim > c.head_dim || c.rot_dim % 2) __builtin_trap();
    if (!(c.rope_theta > 0) || !(c.rms_eps > 0)) __builtin_trap();
    if (c.tie_embeddings != 0 && c.tie_embeddings != 1) __builtin_trap();
    if (c.mtp_layers < 0 || c.max_position_embeddings < 0) __builtin_trap();
    for (int i = 0; i < c.n_layers; i++)
        if (c.layer_is_full[i] > 1) __builtin_trap();
    return 0;
}

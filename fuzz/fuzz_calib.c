/* libFuzzer harness: arbitrary bytes as a .qcal calibration-statistics file (src/quant/calib.h).
 * A parse either fails with a message naming the input, or every entry it hands out lies inside
 * the input, is found again by its own (layer, kind, expert), has in-range fields, and holds
 * finite, non-negative sums of squares.
 *
 * Seeds (fuzz/corpus/calib/): cut from real files of the tiny-b fixture (qmix calibrate
 * testdata/fixtures/tiny-b --tokens testdata/fixtures/tiny-b/golden/tokens.txt --ctx 16), kept
 * under the 16 KiB -max_len of fuzz/run.sh by keeping a few records and fixing n_entries:
 * importance only (--no-hessian), with Hessians (the small expert down_proj inputs), and a
 * --sequential one (flag bit 1). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant/calib.h"
#include "util/err.h"

#define LABEL "fuzz-input.qcal"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_entry(const qmix_calib *c, const qmix_calib_entry *e, const uint8_t *buf,
                        size_t size)
{
    if (qmix_calib_get(c, e->layer, e->kind, e->expert) != e) __builtin_trap();
    if (e->kind < 0 || e->kind >= QMIX_CIN_COUNT) __builtin_trap();
    if (e->layer < -1 || e->layer >= qmix_calib_layers(c)) __builtin_trap();
    if (qmix_calib_kind_per_expert(e->kind) ? e->expert < 0 || e->expert >= qmix_calib_experts(c)
                                            : e->expert != -1)
        __builtin_trap();
    if (e->k <= 0) __builtin_trap();
    if ((e->xtx != NULL) != (qmix_calib_has_hessian(c) != 0)) __builtin_trap();
    uint64_t bytes = qmix_calib_record_bytes(e->k, qmix_calib_has_hessian(c));
    const uint8_t *p = (const uint8_t *)e->sumsq;
    if (p < buf || bytes > size || (size_t)(p - buf) > size - bytes) __builtin_trap();
    for (int64_t j = 0; j < e->k; j++)
        if (!(e->sumsq[j] >= 0)) __builtin_trap(); /* also rejects NaN */
    if (e->xtx) {
        /* touch the triangle's last value: ASan reports any read outside the input */
        volatile double last = e->xtx[e->k * (e->k + 1) / 2 - 1];
        (void)last;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the reader wants 8-byte alignment (the float64 arrays are used in place); malloc gives it,
       and an exact-size copy lets ASan see reads past the end */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    qmix_calib *c = NULL;
    qmix_err err;
    err.msg[0] = 0;
    if (qmix_calib_open_memory(buf, size, LABEL, &c, &err)) {
        if (c || !strstr(err.msg, LABEL)) __builtin_trap();
        free(buf);
        return 0;
    }
    if (qmix_calib_layers(c) < 1) __builtin_trap();
    if (strlen(qmix_calib_dataset(c)) > 4096) __builtin_trap();
    if (qmix_calib_sequential(c) != 0 && qmix_calib_sequential(c) != 1) __builtin_trap();
    for (int i = 0; i < qmix_calib_count(c); i++) check_entry(c, qmix_calib_at(c, i), buf, size);
    /* lookups outside the ranges answer NULL, never index out of the table */
    if (qmix_calib_get(c, qmix_calib_layers(c), QMIX_CIN_ATTN, -1) ||
        qmix_calib_get(c, -2, QMIX_CIN_HEAD, -1) ||
        qmix_calib_get(c, 0, QMIX_CIN_EXPERT, qmix_calib_experts(c)) ||
        qmix_calib_get(c, 0, QMIX_CIN_COUNT, -1))
        __builtin_trap();
    qmix_calib_close(c);
    free(buf);
    return 0;
}

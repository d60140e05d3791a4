#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernels/kernels_impl.h"

static const char *isa_names[QK_ISA_COUNT] = {"scalar", "avx2", "avx512"};

const char *qk_isa_name(qk_isa isa) { return (unsigned)isa < QK_ISA_COUNT ? isa_names[isa] : "?"; }

int qk_isa_supported(qk_isa isa)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
    case QK_ISA_SCALAR: return 1;
    case QK_ISA_AVX2: {
        /* F16C straight from CPUID leaf 1 (ECX bit 29): clang's builtin does not know it */
        unsigned a, b, c, d;
        int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    }
    case QK_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default: return 0;
    }
#else
    return isa == QK_ISA_SCALAR;
#endif
}

qk_matmul_fn qk_matmul_for(qk_isa isa)
{
    switch (isa) {
    case QK_ISA_SCALAR: return qk_matmul_scalar;
    case QK_ISA_AVX2: return qk_matmul_avx2;
    case QK_ISA_AVX512: return qk_matmul_avx512;
    default: return NULL;
    }
}

static qk_isa detect(void)
{
    qk_isa best = QK_ISA_SCALAR;
    for (int i = QK_ISA_COUNT - 1; i > 0; i--)
        if (qk_isa_supported((qk_isa)i)) {
            best = (qk_isa)i;
            break;
        }
    const char *want = getenv("QMIX_ISA");
    if (want)
        for (int i = 0; i < QK_ISA_COUNT; i++)
            if (!strcmp(want, isa_names[i]) && i <= (int)best) return (qk_isa)i;
    return best;
}

qk_attend_kv_fn qk_attend_kv_for(qk_isa isa)
{
    switch (isa) {
    case QK_ISA_SCALAR: return qk_attend_kv_scalar;
    case QK_ISA_AVX2: return qk_attend_kv_avx2;
    case QK_ISA_AVX512: return qk_attend_kv_avx512;
    default: return NULL;
    }
}

static qk_isa active = QK_ISA_COUNT;
static qk_matmul_fn active_matmul;
static qk_attend_kv_fn active_attend;

qk_isa qk_isa_active(void)
{
    /* Racy but idempotent: every thread computes the same answer. */
    if (active == QK_ISA_COUNT) {
        qk_isa isa = detect();
        active_matmul = qk_matmul_for(isa);
        active_attend = qk_attend_kv_for(isa);
        __atomic_store_n(&active, isa, __ATOMIC_RELEASE);
    }
    return active;
}

void qk_matmul(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
               int64_t ldx, float *y, int64_t ldy)
{
    if (__atomic_load_n(&active, __ATOMIC_ACQUIRE) == QK_ISA_COUNT) qk_isa_active();
    active_matmul(w, row_begin, row_end, x, n, ldx, y, ldy);
}

void qk_attend_kv(qmix_kv_type kv, int nq, const float *const *q, float *const *out,
                  const int64_t *n, const void *keys, const void *values, size_t ld, int64_t dim,
                  float scale, float *scratch)
{
    if (__atomic_load_n(&active, __ATOMIC_ACQUIRE) == QK_ISA_COUNT) qk_isa_active();
    active_attend(kv, nq, q, out, n, keys, values, ld, dim, scale, scratch);
}

static int act_int8 = -1;

int qk_act_int8(void)
{
    int v = __atomic_load_n(&act_int8, __ATOMIC_ACQUIRE);
    if (v < 0) { /* racy but idempotent, as above */
        const char *env = getenv("QMIX_ACT_INT8");
        v = qk_isa_active() >= QK_ISA_AVX512 && __builtin_cpu_supports("avx512vnni") &&
            !(env && !strcmp(env, "0"));
        __atomic_store_n(&act_int8, v, __ATOMIC_RELEASE);
    }
    return v;
}

void qk_set_act_int8(int on)
{
    int v = on && qk_isa_supported(QK_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
    __atomic_store_n(&act_int8, v, __ATOMIC_RELEASE);
}

int qk_act_int8_vbmi(void)
{
    static int vbmi = -1;
    if (vbmi < 0) vbmi = __builtin_cpu_supports("avx512vbmi");
    return qk_act_int8() && vbmi;
}

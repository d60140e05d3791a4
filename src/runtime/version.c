/* The build's identity and what it detected on this CPU, for `qmix --version` and bug reports. */
#include <stdio.h>

#include "kernels/kernels.h"
#include "qmix.h"

#ifndef QMIX_GIT_REV
#define QMIX_GIT_REV "unknown"
#endif

const char *qmix_version(void) { return QMIX_VERSION; }

int qmix_build_info(char *buf, size_t len)
{
    char simd[128] = "";
    int off = 0;
    for (int i = 0; i < QK_ISA_COUNT; i++)
        off += snprintf(simd + off, sizeof simd - (size_t)off, "%s%s%s", i ? " " : "",
                        qk_isa_name((qk_isa)i), qk_isa_supported((qk_isa)i) ? "" : "(no)");
    return snprintf(buf, len,
                    "version: %s\n"
                    "revision: %s\n"
                    "compiler: %s\n"
                    "simd: %s\n"
                    "simd used: %s%s%s\n",
                    QMIX_VERSION, QMIX_GIT_REV,
#if defined(__clang__)
                    "clang " __clang_version__,
#elif defined(__GNUC__)
                    "gcc " __VERSION__,
#else
                    "unknown",
#endif
                    simd, qk_isa_name(qk_isa_active()),
                    qk_act_int8() ? ", int8 decode (VNNI)" : "",
                    qk_act_int8_vbmi() ? " with VBMI" : "");
}

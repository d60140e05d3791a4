/* QMIX_HOT_LOOP marks the few loops outside src/kernels that hold almost all of a tool's flops
 * (GPTQ's factorisation and column loop, calibration's Hessian accumulation): they are compiled
 * for AVX-512 and AVX2 as well as the baseline and the variant is chosen when the program loads
 * (GCC/Clang function multiversioning) — the baseline's SSE2 runs these double/float
 * multiply-adds 3-4x slower. No -ffast-math: every variant computes the same floats. */
#ifndef QMIX_UTIL_HOT_H
#define QMIX_UTIL_HOT_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QMIX_NO_CLONES)
#define QMIX_HOT_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QMIX_HOT_LOOP
#endif

#endif

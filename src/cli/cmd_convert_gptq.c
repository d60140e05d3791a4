#include "cli/convert_gptq.h"

#include <stdio.h>

int convert_is_gptq(const char *in)
{
    (void)in;
    return 0;
}

int convert_gptq(const char *in, const char *out, const char *to, int progress)
{
    (void)in, (void)out, (void)progress;
    fprintf(stderr, "qmix convert: --to %s from/to GPTQ is not implemented yet\n", to);
    return 1;
}

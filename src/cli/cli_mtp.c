/* The MTP speculative decoding flags shared by generate, chat and bench. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "runtime/speculative.h"

#define STR_(x) #x
#define STR(x) STR_(x)

const char cli_mtp_help[] =
    "  --mtp               speculative decoding with the model's own MTP block: it drafts\n"
    "                      tokens, the model checks them in one batched pass; the same tokens\n"
    "                      as without (greedy), the same distribution (sampling), faster\n"
    "  --draft N           tokens drafted per step, 1.." STR(QMIX_SPEC_MAX_DRAFT)
    " (default " STR(QMIX_SPEC_DEFAULT_DRAFT) "; implies --mtp)\n";

int cli_mtp_option(const char *cmd, int argc, char **argv, int *i, int *draft)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--mtp")) {
        if (!*draft) *draft = QMIX_SPEC_DEFAULT_DRAFT;
        return 1;
    }
    if (strcmp(a, "--draft")) return 0;
    const char *v = cli_value(cmd, argc, argv, i);
    long n;
    if (!v || cli_int(cmd, a, v, 1, QMIX_SPEC_MAX_DRAFT, &n)) return -1;
    *draft = (int)n;
    return 1;
}

void cli_mtp_report(FILE *out, const struct qmix_spec *spec)
{
    const qmix_spec_stats *st = qmix_spec_get_stats(spec);
    fprintf(out, "mtp: draft %d, %lld verification passes, acceptance %.1f %% (%lld of %lld "
            "drafted), %.2f tokens per verification; draft %.3f s, verify %.3f s, accept and "
            "rollback %.3f s\n", qmix_spec_draft(spec), (long long)st->steps,
            st->drafted ? 100.0 * (double)st->accepted / (double)st->drafted : 0.0,
            (long long)st->accepted, (long long)st->drafted,
            st->steps ? (double)st->kept / (double)st->steps : 0.0, st->draft_s, st->verify_s,
            st->accept_s);
}

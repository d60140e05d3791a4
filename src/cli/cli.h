/* Small helpers shared by the subcommands: flag values, token lists, opening a model. */
#ifndef QMIX_CLI_CLI_H
#define QMIX_CLI_CLI_H

#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "qmix.h"

/* Parses an integer flag value in [lo, hi]; prints "qmix CMD: --flag ..." and returns -1 on error. */
int cli_int(const char *cmd, const char *flag, const char *value, long lo, long hi, long *out);
int cli_double(const char *cmd, const char *flag, const char *value, double *out);
/* Token ids separated by spaces, commas or newlines; "@FILE" reads them from a file. */
int cli_tokens(const char *cmd, const char *spec, int32_t **tokens, int *n);
/* Fetches the value after argv[*i] for flag, advancing *i; prints an error if missing. */
const char *cli_value(const char *cmd, int argc, char **argv, int *i);
/* Sampling flags shared by generate and chat (--temp, --top-k, --top-p, --min-p, penalties,
 * --profile): 1 if argv[*i] was one (value consumed), 0 if not, -1 after printing an error. */
struct qmix_sampling;
int cli_sampling_option(const char *cmd, int argc, char **argv, int *i, struct qmix_sampling *sp);
extern const char cli_sampling_help[];
/* --kv-bits 32|16|8|4 or --kv-type f32|f16|q8_0|q4_0 (the KV cache's storage): 1 if argv[*i] was
 * one (value consumed, *kv set), 0 if not, -1 after printing an error. cli_kv_help: its --help
 * lines. */
int cli_kv_option(const char *cmd, int argc, char **argv, int *i, qmix_kv_type *kv);
extern const char cli_kv_help[];
/* --mtp and --draft N (cli_mtp.c): 1 if argv[*i] was one (value consumed), 0 if not, -1 after
 * printing an error. *draft is 0 until --mtp or --draft turns MTP speculative decoding on. */
int cli_mtp_option(const char *cmd, int argc, char **argv, int *i, int *draft);
extern const char cli_mtp_help[];
/* One line of speculative decoding statistics (acceptance, tokens per verification, times). */
struct qmix_spec;
void cli_mtp_report(FILE *out, const struct qmix_spec *spec);
/* The checkpoint directory of a model path (the path itself, or a weights file's directory; a
 * .gguf file stands for itself, the tokenizer and template loaders read it); prints an error and
 * returns -1 if it does not exist. */
int cli_model_dir(const char *model_path, char *dir, size_t len);
/* The token stream a measuring command evaluates: text_path tokenized with the model's own
 * tokenizer.json (no special tokens parsed), or token_path (whitespace-separated ids) when given.
 * Prints an error and returns -1 on failure; *tokens is malloc'd. */
int cli_eval_tokens(const char *cmd, const char *model_path, const char *text_path,
                    const char *token_path, int32_t **tokens, int64_t *n);
/* The flags every measuring command shares: --text, --tokens, --ctx, --windows, --threads, --json
 * (windows 0: all). cli_eval_option: 1 if argv[*i] was one of them (its value consumed), 0 if not,
 * -1 after printing an error. */
typedef struct cli_eval_args {
    const char *text, *tokens;
    long ctx, windows, threads;
    int json;
} cli_eval_args;
int cli_eval_option(const char *cmd, int argc, char **argv, int *i, cli_eval_args *a);

/* Ctrl-C during a long measurement: the first SIGINT sets cli_stop (the command prints what it
 * has so far); a second one ends the process. */
extern volatile sig_atomic_t cli_stop;
void cli_catch_sigint(void);
/* A one-line progress bar with ETA on stderr (only when stderr is a terminal);
 * cli_progress_end finishes the line. */
void cli_progress(const char *label, int64_t done, int64_t total, double t_start);
void cli_progress_end(void);
double cli_now(void);
/* A missing argument: one line naming what is missing and where the options are, instead of the
 * whole usage text. Returns 2 (a usage error), for `return cli_missing(...)`. */
int cli_missing(const char *cmd, const char *what);

/* "1.50 GiB": bytes in binary units. */
void cli_human_bytes(double bytes, char *buf, size_t len);
/* Peak resident set size of this process, in bytes. */
uint64_t cli_peak_rss(void);

#endif

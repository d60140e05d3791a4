#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "text/tokenizer.h"
#include "util/fileio.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix tokenize MODEL_DIR (-p TEXT | --file F | --decode IDS) [--tokens] [--no-special]\n\n"
            "Encodes text with the model's tokenizer.json (MODEL_DIR may also name the file itself)\n"
            "and prints the ids space-separated on one line. Like Hugging Face's encode: added-token\n"
            "strings such as <|im_start|> become their ids, and no BOS is added.\n\n"
            "  -p, --prompt TEXT  the text to encode\n"
            "  --file F           encode the contents of file F (bytes as they are)\n"
            "  --decode IDS       the reverse: ids (spaces/commas, or @FILE) to text, written exactly\n"
            "                     (no newline added; invalid UTF-8 shown as U+FFFD, as HF's decode)\n"
            "  --tokens           one line per token instead: id, tokenizer.json spelling, bytes\n"
            "  --no-special       treat added-token strings in the text as plain text\n");
}

static void print_escaped(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c == '\r') fputs("\\r", stdout);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('"');
}

static void print_pieces(const qmix_tokenizer *tok, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = 0;
        const char *bytes = qmix_tok_id_bytes(tok, ids[i], &len);
        const char *sp = qmix_tok_id_to_token(tok, ids[i]);
        printf("%d\t%s\t", (int)ids[i], sp ? sp : "?");
        print_escaped(bytes ? bytes : "", bytes ? len : 0);
        putchar('\n');
    }
}

int qmix_cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *prompt = NULL, *file = NULL, *decode = NULL;
    int show_tokens = 0, allow_special = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(prompt = cli_value("tokenize", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--file")) {
            if (!(file = cli_value("tokenize", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--decode")) {
            if (!(decode = cli_value("tokenize", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--tokens")) {
            show_tokens = 1;
        } else if (!strcmp(a, "--no-special")) {
            allow_special = 0;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "qmix tokenize: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model) {
            model = a;
        } else {
            fprintf(stderr, "qmix tokenize: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model || (!!prompt + !!file + !!decode) != 1) {
        if (model) fprintf(stderr, "qmix tokenize: give exactly one of -p, --file, --decode\n");
        else cli_missing("tokenize", "MODEL_DIR");
        return 2;
    }
    qmix_err err;
    qmix_tokenizer *tok;
    if (qmix_tok_load(model, &tok, &err)) {
        fprintf(stderr, "qmix tokenize: %s\n", err.msg);
        return 1;
    }
    int rc = 0;
    if (decode) {
        int32_t *ids;
        int n;
        if (cli_tokens("tokenize", decode, &ids, &n)) {
            qmix_tok_free(tok);
            return 2;
        }
        char *text;
        size_t len;
        if (qmix_tok_decode(tok, ids, (size_t)n, 0, &text, &len, &err)) {
            fprintf(stderr, "qmix tokenize: %s\n", err.msg);
            rc = 1;
        } else {
            if (show_tokens) print_pieces(tok, ids, (size_t)n);
            else fwrite(text, 1, len, stdout);
            free(text);
        }
        free(ids);
    } else {
        char *owned = NULL;
        size_t len;
        if (file) {
            if (qmix_read_file(file, (size_t)1 << 31, &owned, &len, &err)) {
                fprintf(stderr, "qmix tokenize: %s\n", err.msg);
                qmix_tok_free(tok);
                return 1;
            }
            prompt = owned;
        } else {
            len = strlen(prompt);
        }
        int32_t *ids;
        size_t n;
        if (qmix_tok_encode(tok, prompt, len, allow_special, &ids, &n, &err)) {
            fprintf(stderr, "qmix tokenize: %s\n", err.msg);
            rc = 1;
        } else if (show_tokens) {
            print_pieces(tok, ids, n);
        } else {
            for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
            putchar('\n');
        }
        free(ids);
        free(owned);
    }
    qmix_tok_free(tok);
    if (fflush(stdout)) rc = 1;
    return rc;
}

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "text/chat.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix template MODEL_DIR --messages CONV.json [--tools TOOLS.json]\n"
            "                     [--enable-thinking true|false] [--no-generation-prompt]\n"
            "                     [--add-vision-id] [--assume-qwen35]\n\n"
            "Prints the chat prompt for an OpenAI-style conversation (a JSON array of messages)\n"
            "exactly as the model's chat template renders it, with no newline added.\n\n"
            "The template is MODEL_DIR/chat_template.jinja, else tokenizer_config.json's\n"
            "chat_template. qmix implements the official Qwen3.5 template; any other template is\n"
            "refused unless --assume-qwen35 (render the Qwen3.5 format anyway).\n\n"
            "  --tools FILE            a JSON array of tool definitions (in the system part)\n"
            "  --enable-thinking B     true (default): the prompt ends with \"<think>\\n\";\n"
            "                          false: with an empty think block\n"
            "  --no-generation-prompt  stop after the last message\n"
            "  --add-vision-id         number images and videos (\"Picture 1: \")\n");
}

static json_t *load(const char *flag, const char *path)
{
    json_error_t jerr;
    json_t *v = json_load_file(path, JSON_DECODE_ANY, &jerr);
    if (!v && jerr.line > 0)
        fprintf(stderr, "qmix template: %s %s: %s (line %d)\n", flag, path, jerr.text,
                jerr.line);
    else if (!v)
        fprintf(stderr, "qmix template: %s %s\n", flag, jerr.text);
    return v;
}

int qmix_cmd_template(int argc, char **argv)
{
    const char *model_dir = NULL, *messages_path = NULL, *tools_path = NULL;
    int assume = 0;
    qmix_chat_opts opts;
    qmix_chat_opts_default(&opts);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--messages")) {
            if (!(messages_path = cli_value("template", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--tools")) {
            if (!(tools_path = cli_value("template", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--enable-thinking")) {
            if (!(v = cli_value("template", argc, argv, &i))) return 2;
            if (!strcmp(v, "true")) opts.enable_thinking = true;
            else if (!strcmp(v, "false")) opts.enable_thinking = false;
            else {
                fprintf(stderr, "qmix template: --enable-thinking takes true or false, not '%s'\n",
                        v);
                return 2;
            }
        } else if (!strcmp(a, "--no-generation-prompt")) {
            opts.add_generation_prompt = false;
        } else if (!strcmp(a, "--add-vision-id")) {
            opts.add_vision_id = true;
        } else if (!strcmp(a, "--assume-qwen35")) {
            assume = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix template: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_dir) {
            model_dir = a;
        } else {
            fprintf(stderr, "qmix template: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_dir || !messages_path)
        return cli_missing("template", !model_dir ? "MODEL_DIR" : "--messages FILE");
    qmix_err err;
    char *tmpl, source[4200];
    size_t tlen;
    if (qmix_chat_template_load(model_dir, tools_path != NULL, &tmpl, &tlen, source, sizeof source,
                                &err)) {
        fprintf(stderr, "qmix template: %s\n", err.msg);
        return 1;
    }
    int official = qmix_chat_template_is_qwen35(tmpl, tlen);
    free(tmpl);
    if (!official) {
        fprintf(stderr, "qmix template: %s is not the official Qwen3.5 chat template (qmix renders "
                        "only that template family)%s\n", source,
                assume ? "; rendering the Qwen3.5 format anyway (--assume-qwen35)"
                       : "; pass --assume-qwen35 to render the Qwen3.5 format anyway");
        if (!assume) return 1;
    }
    json_t *messages = load("--messages", messages_path), *tools = NULL;
    if (!messages) return 1;
    if (tools_path && !(tools = load("--tools", tools_path))) {
        json_decref(messages);
        return 1;
    }
    char *out;
    size_t len;
    int rc = qmix_chat_render(messages, tools, &opts, &out, &len, &err);
    json_decref(messages);
    json_decref(tools);
    if (rc) {
        fprintf(stderr, "qmix template: %s\n", err.msg);
        return 1;
    }
    int ok = fwrite(out, 1, len, stdout) == len && fflush(stdout) == 0;
    free(out);
    if (!ok) {
        fprintf(stderr, "qmix template: write error\n");
        return 1;
    }
    return 0;
}

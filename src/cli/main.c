#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"info", qmix_cmd_info, "architecture, layer pattern, parameters and bytes by tensor role"},
    {"generate", qmix_cmd_generate, "continue a token sequence (greedy or sampled), print ids and tok/s"},
    {"chat", qmix_cmd_chat, "talk to the model: streaming, thinking on/off, Ctrl-C stops the answer"},
    {"serve", qmix_cmd_serve, "OpenAI-compatible HTTP server: chat and completions, streaming, tools"},
    {"logits", qmix_cmd_logits, "write raw float32 logits [n_tokens, vocab] for a token sequence"},
    {"bench", qmix_cmd_bench, "prefill/decode tok/s, peak RSS and memory-bandwidth fraction"},
    {"ppl", qmix_cmd_ppl, "perplexity over a text (WikiText-2 protocol): mean, median, trimmed mean"},
    {"kld", qmix_cmd_kld, "KL divergence of a quantized model from its base, top-1 agreement"},
    {"sensitivity", qmix_cmd_sensitivity, "error each tensor role adds when quantized alone, sorted"},
    {"calibrate", qmix_cmd_calibrate, "activation statistics (GPTQ Hessians, importance matrix) for calibrated quantization"},
    {"plan", qmix_cmd_plan, "predict memory for a model + recipe + context; the longest context that fits"},
    {"compare", qmix_cmd_compare, "structural comparison of two checkpoints (any formats): cosine by role"},
    {"tokenize", qmix_cmd_tokenize, "text to token ids and back with the model's tokenizer.json"},
    {"template", qmix_cmd_template, "render a conversation with the model's chat template"},
    {"convert", qmix_cmd_convert, "write a checkpoint as a GGUF llama.cpp loads (f32/f16/bf16/q8_0)"},
    {"quantize", qmix_cmd_quantize, "quantize a bf16 checkpoint with a role recipe into an MLX checkpoint"},
    {"presets", qmix_cmd_presets, "the built-in quantization recipes with their bits per weight"},
    {"synth", qmix_cmd_synth, "write a random checkpoint in the real HF layout and geometry"},
};

static void usage(FILE *out)
{
    fprintf(out, "qmix — quantize and run Qwen3.5 hybrid MoE models on the CPU\n\n"
                 "usage: qmix COMMAND [options]   (qmix COMMAND --help for its options)\n\n"
                 "commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "qmix: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}

#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "qmix.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"info", qmix_cmd_info, "architecture, layer pattern; parameters, bits and bytes by tensor role"},
    {"generate", qmix_cmd_generate, "continue a prompt (text or token ids), greedy or sampled; tok/s on stderr"},
    {"chat", qmix_cmd_chat, "talk to the model in the terminal: streaming, thinking on/off, Ctrl-C stops the answer"},
    {"serve", qmix_cmd_serve, "OpenAI-compatible HTTP server: chat and completions, streaming, tools, continuous batching"},
    {"logits", qmix_cmd_logits, "write raw float32 logits [n_tokens, vocab] for a token sequence"},
    {"bench", qmix_cmd_bench, "prefill and decode tok/s per context and thread count, peak RSS, share of bandwidth"},
    {"ppl", qmix_cmd_ppl, "perplexity over a text in windows: mean, median, trimmed mean"},
    {"kld", qmix_cmd_kld, "KL divergence of a quantized model from its base, per token; top-1 agreement"},
    {"sensitivity", qmix_cmd_sensitivity, "the error each tensor role adds when quantized alone, most sensitive first"},
    {"calibrate", qmix_cmd_calibrate, "activation statistics (GPTQ Hessians, importance matrix) for calibrated quantization"},
    {"plan", qmix_cmd_plan, "predict memory for a model, recipe and context; the longest context that fits"},
    {"compare", qmix_cmd_compare, "compare two checkpoints of one model (any formats): cosine and error by role"},
    {"tokenize", qmix_cmd_tokenize, "text to token ids and back with the model's tokenizer.json"},
    {"template", qmix_cmd_template, "render a conversation with the model's chat template"},
    {"convert", qmix_cmd_convert, "between formats: to GGUF (f32 … q2_k), to Hugging Face bf16, to MLX, to/from GPTQ"},
    {"quantize", qmix_cmd_quantize, "quantize by recipe or for a memory budget into MLX, GGUF or GPTQ (RTN, GPTQ, AWQ)"},
    {"presets", qmix_cmd_presets, "the built-in quantization recipes with their bits per weight"},
    {"synth", qmix_cmd_synth, "write a random checkpoint in the real HF layout and geometry"},
};

static void usage(FILE *out)
{
    fprintf(out, "qmix — quantize and run Qwen3.5 hybrid MoE models on the CPU\n\n"
                 "usage: qmix COMMAND [options]   (qmix COMMAND --help for its options)\n"
                 "       qmix --version           version, revision, compiler, SIMD paths\n\n"
                 "commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-12s %s\n", commands[i].name, commands[i].summary);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V") || !strcmp(argv[1], "version")) {
        char info[1024];
        qmix_build_info(info, sizeof info);
        fputs(info, stdout);
        return 0;
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

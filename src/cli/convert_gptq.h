/* `qmix convert` between GPTQ (GPTQModel/vLLM, spec/quant-formats.md §2) and MLX (§2.9). */
#ifndef QMIX_CLI_CONVERT_GPTQ_H
#define QMIX_CLI_CONVERT_GPTQ_H

/* Whether the checkpoint directory in holds a GPTQ checkpoint (quantization_config.quant_method
 * "gptq"). */
int convert_is_gptq(const char *in);
/* to: "gptq" (from MLX) or "mlx" (from GPTQ). Prints its own errors; returns the exit status. */
int convert_gptq(const char *in, const char *out, const char *to, int progress);

#endif

/* One entry point per subcommand; each parses its own flags, prints --help, returns the exit code. */
#ifndef QMIX_CLI_COMMANDS_H
#define QMIX_CLI_COMMANDS_H

int qmix_cmd_info(int argc, char **argv);
int qmix_cmd_generate(int argc, char **argv);
int qmix_cmd_chat(int argc, char **argv);
int qmix_cmd_logits(int argc, char **argv);
int qmix_cmd_synth(int argc, char **argv);
int qmix_cmd_bench(int argc, char **argv);
int qmix_cmd_quantize(int argc, char **argv);
int qmix_cmd_presets(int argc, char **argv);
int qmix_cmd_template(int argc, char **argv);
int qmix_cmd_tokenize(int argc, char **argv);
int qmix_cmd_ppl(int argc, char **argv);
int qmix_cmd_kld(int argc, char **argv);
int qmix_cmd_kld_images(int argc, char **argv); /* qmix kld ... --images DIR */
int qmix_cmd_convert(int argc, char **argv);
int qmix_cmd_serve(int argc, char **argv);
int qmix_cmd_sensitivity(int argc, char **argv);
int qmix_cmd_plan(int argc, char **argv);
int qmix_cmd_calibrate(int argc, char **argv);

int qmix_cmd_compare(int argc, char **argv);

#endif

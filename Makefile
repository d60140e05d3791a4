# qmix — plain make. `make` builds build/qmix and build/libqmix.a; `make test` runs the tests;
# `make SAN=1 test` builds into build-san/ with AddressSanitizer + UBSan.
CC      ?= cc
SAN     ?= 0
WERROR  ?= 0
OPT     ?= -O2

ifeq ($(SAN),1)
BUILD   := build-san
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
OPT     := -O1 -g
else
BUILD   := build
SANFLAGS :=
endif

PKGS    := jansson libpcre2-8 libutf8proc libmicrohttpd libpng libjpeg
CFLAGS_BASE := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wno-unused-parameter \
               -Wstrict-prototypes -Wmissing-prototypes -pthread $(OPT) -g $(SANFLAGS) \
               -Iinclude -Isrc $(shell pkg-config --cflags $(PKGS))
ifeq ($(WERROR),1)
CFLAGS_BASE += -Werror
endif
LDLIBS  := $(shell pkg-config --libs $(PKGS)) -lutil -lm -pthread
LDFLAGS += $(SANFLAGS)

# Kernels compiled for wider SIMD than the baseline; chosen at run time (src/kernels/dispatch.c).
AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c

LIB_SRC := $(sort $(wildcard src/util/*.c src/formats/*.c src/kernels/*.c src/model/*.c src/runtime/*.c src/eval/*.c src/quant/*.c src/text/*.c src/server/*.c))
CLI_SRC := $(sort $(wildcard src/cli/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/%.o)

TEST_SRC := $(sort $(wildcard tests/test_*.c))
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

.PHONY: all test demo clean bench fuzz
all: $(BUILD)/qmix $(BUILD)/libqmix.a $(BENCH_BIN)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(KERNEL_OPT) $(CFLAGS) -MMD -MP -c $< -o $@

# Kernels are hot loops written for the auto-vectoriser; -O3 lets it unroll and vectorise them.
ifeq ($(SAN),0)
$(BUILD)/src/kernels/%.o: KERNEL_OPT := -O3
$(BUILD)/src/quant/linalg.o $(BUILD)/src/quant/gptq.o $(BUILD)/src/quant/calib.o: KERNEL_OPT := -O3
endif

$(BUILD)/src/kernels/%_avx2.o: src/kernels/%_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(KERNEL_OPT) $(CFLAGS) $(AVX2_FLAGS) -MMD -MP -c $< -o $@

$(BUILD)/src/kernels/%_avx512.o: src/kernels/%_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(KERNEL_OPT) $(CFLAGS) $(AVX512_FLAGS) -MMD -MP -c $< -o $@

$(BUILD)/src/kernels/%_vnni.o: src/kernels/%_vnni.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(KERNEL_OPT) $(CFLAGS) $(AVX512_FLAGS) -mavx512vnni -MMD -MP -c $< -o $@

$(BUILD)/src/kernels/%_vbmi.o: src/kernels/%_vbmi.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(KERNEL_OPT) $(CFLAGS) $(AVX512_FLAGS) -mavx512vnni -mavx512vbmi -MMD -MP -c $< -o $@

# The git revision is compiled into one object; a stamp file rebuilds it when HEAD moves.
GIT_REV := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
.PHONY: FORCE
$(BUILD)/git-rev: FORCE
	@mkdir -p $(BUILD); echo '$(GIT_REV)' | cmp -s - $@ || echo '$(GIT_REV)' > $@
$(BUILD)/src/runtime/version.o: $(BUILD)/git-rev
$(BUILD)/src/runtime/version.o: CFLAGS += -DQMIX_GIT_REV='"$(GIT_REV)"'

$(BUILD)/libqmix.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/qmix: $(CLI_OBJ) $(BUILD)/libqmix.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c tests/testutil.h tests/serverutil.h $(BUILD)/libqmix.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(CFLAGS) $(shell pkg-config --cflags check) -o $@ $< $(BUILD)/libqmix.a \
	    $(LDFLAGS) $(shell pkg-config --libs check) $(LDLIBS)

$(BUILD)/bench/%: bench/%.c bench/benchutil.h $(BUILD)/libqmix.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(CFLAGS) -o $@ $< $(BUILD)/libqmix.a $(LDFLAGS) $(LDLIBS)

# Tests run from the repo root so they find testdata/; QMIX_BIN lets CLI tests run the binary.
test: $(BUILD)/qmix $(TEST_BIN)
	@QMIX_BIN=$(BUILD)/qmix QMIX_TEST_LIGHT=$(SAN) tools/run-tests.sh $(TEST_BIN)

# The bundled trained model (testdata/demo): quantized with the 16 GB dynamic 2/3-bit preset, then
# what it cost (bpw and size by role, perplexity of both, KLD) and what it writes; then the same
# model with its small trained vision tower (testdata/demo-vl) describing an image.
DEMO_Q := $(BUILD)/demo-dynamic-2.6
DEMO_EVAL := --text testdata/demo/heldout.txt --ctx 512 --windows 16
demo: $(BUILD)/qmix
	$(BUILD)/qmix info testdata/demo
	$(BUILD)/qmix quantize testdata/demo $(DEMO_Q) --recipe dynamic-2.6 --force --quiet
	$(BUILD)/qmix ppl testdata/demo $(DEMO_EVAL)
	$(BUILD)/qmix ppl $(DEMO_Q) $(DEMO_EVAL)
	$(BUILD)/qmix kld testdata/demo $(DEMO_Q) $(DEMO_EVAL)
	$(BUILD)/qmix generate $(DEMO_Q) -p "The package manager" -n 40 --temp 0
	$(BUILD)/qmix generate testdata/demo-vl --image testdata/demo-vl/images/shapes_128x128.png \
	    -p "Describe this image." -n 40 --temp 0

# libFuzzer harnesses (clang, ASan + UBSan, into build-fuzz/), FUZZ_TIME seconds per fuzzer.
FUZZ_TIME ?= 30
fuzz:
	fuzz/run.sh $(FUZZ_TIME)

clean:
	rm -rf build build-san build-fuzz

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)

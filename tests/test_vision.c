/* The image path against tiny-vl-a's goldens (an independent float64 reference of the Hugging
 * Face semantics): pixel values (the resize case included), image embeddings, prompt ids and
 * M-RoPE positions, prompt logits and the greedy continuation; batched = alone and a resumed
 * snapshot = cold with images; hostile and unsupported input refused with clear errors. */
#include <math.h>

#include "formats/image.h"
#include "formats/safetensors_write.h"
#include "model/forward.h"
#include "model/model.h"
#include "model/vision.h"
#include "runtime/session.h"
#include "text/chat.h"
#include "text/tokenizer.h"
#include "testutil.h"

#define FIX "testdata/fixtures/tiny-vl-a"
#define PIXEL_TOL 1e-6
#define EMBED_TOL 1e-4
#define LOGIT_TOL 1e-3
#define N_GREEDY 8
#define CLI_IMAGES_OVER 65 /* the command line takes 64 images per prompt */

static const char *const images[3] = {"img_64x96", "img_128x128", "img_150x200"};

static float *read_f32(const char *name, const char *file, size_t want_floats)
{
    char path[512];
    size_t size;
    snprintf(path, sizeof path, FIX "/golden/%s/%s", name, file);
    float *v = tu_read(path, &size);
    ck_assert_msg(size == want_floats * sizeof(float), "%s: %zu bytes, expected %zu floats", path,
                  size, want_floats);
    return v;
}

static double max_diff(const float *a, const float *b, size_t n)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= worst)) worst = d; /* NaN counts as worst */
    }
    return worst;
}

static qmix_model *model;
static qmix_vision *vision;
static qmix_session *sess;

static void setup(void)
{
    qmix_err err;
    ck_assert_msg(!qmix_model_open(FIX, &model, &err), "%s", err.msg);
    ck_assert_msg(!qmix_vision_open(model, &vision, &err), "%s", err.msg);
    qmix_session_opts o = {.max_ctx = 256, .n_threads = 2};
    ck_assert_msg(!qmix_session_new(model, &o, &sess, &err), "%s", err.msg);
}

static void teardown(void)
{
    qmix_session_free(sess);
    qmix_vision_free(vision);
    qmix_model_close(model);
}

static void load_image(const char *name, qmix_image *img)
{
    char path[512];
    qmix_err err;
    snprintf(path, sizeof path, FIX "/images/%s.png", name);
    ck_assert_msg(!qmix_image_load(path, img, &err), "%s", err.msg);
}

START_TEST(config_and_pixels)
{
    const qmix_vision_config *c = &vision->cfg;
    ck_assert_int_eq(c->hidden, 64);
    ck_assert_int_eq(c->depth, 2);
    ck_assert_int_eq(c->image_token_id, 840);
    ck_assert_int_eq(c->min_pixels, 4096);
    ck_assert_int_eq(c->max_pixels, 1048576);
    const int *sec = qmix_model_config(model)->mrope_section;
    ck_assert(sec[0] == 11 && sec[1] == 11 && sec[2] == 10);
    for (int i = 0; i < 3; i++) {
        qmix_image img;
        qmix_vision_pixels px;
        qmix_err err;
        load_image(images[i], &img);
        ck_assert_msg(!qmix_vision_preprocess(c, &img, &px, &err), "%s", err.msg);
        char path[512];
        snprintf(path, sizeof path, FIX "/golden/%s/grid_thw.txt", images[i]);
        int n;
        int32_t *grid = tu_read_ids(path, &n);
        ck_assert_int_eq(n, 3);
        ck_assert_int_eq(grid[0], 1);
        ck_assert_int_eq(px.gh, grid[1]);
        ck_assert_int_eq(px.gw, grid[2]);
        size_t count = (size_t)px.gh * px.gw * 1536;
        float *want = read_f32(images[i], "pixel_values.f32", count);
        double d = max_diff(px.values, want, count);
        printf("%s: grid %dx%d (from %dx%d), pixel max |diff| %.3g\n", images[i], px.gh, px.gw,
               img.height, img.width, d);
        ck_assert_msg(d <= PIXEL_TOL, "%s: pixel values differ by %g", images[i], d);
        /* the resized image itself: the golden's RGB after Pillow's bicubic */
        qmix_image ref;
        snprintf(path, sizeof path, FIX "/golden/%s/resized.png", images[i]);
        ck_assert_msg(!qmix_image_load(path, &ref, &err), "%s", err.msg);
        ck_assert_int_eq(ref.height, px.resized_h);
        ck_assert_int_eq(ref.width, px.resized_w);
        free(grid);
        free(want);
        qmix_image_free(&ref);
        qmix_image_free(&img);
        qmix_vision_pixels_free(&px);
    }
}
END_TEST

START_TEST(smart_resize_rules)
{
    qmix_vision_config c = vision->cfg; /* factor 32, [4096, 1048576] pixels */
    int h, w;
    qmix_err err;
    ck_assert(!qmix_vision_smart_resize(&c, 80, 112, &h, &w, &err));
    ck_assert_int_eq(h, 64);  /* 2.5 rounds to even: 2 */
    ck_assert_int_eq(w, 128); /* 3.5 rounds to even: 4 */
    ck_assert(!qmix_vision_smart_resize(&c, 20, 20, &h, &w, &err)); /* below min_pixels */
    ck_assert_int_eq(h, 64);
    ck_assert_int_eq(w, 64);
    ck_assert(!qmix_vision_smart_resize(&c, 4000, 3000, &h, &w, &err)); /* above max_pixels */
    ck_assert(h * w <= 1048576 && h % 32 == 0 && w % 32 == 0);
    ck_assert_int_eq(h, 1152);
    ck_assert_int_eq(w, 864);
    ck_assert(qmix_vision_smart_resize(&c, 10, 2100, &h, &w, &err));
    ck_assert_msg(strstr(err.msg, "aspect ratio"), "%s", err.msg);
}
END_TEST

/* The rendered prompt for one image, pads expanded, and the image's embeddings. */
static void golden_prompt(int i, qmix_prompt_image *pim, qmix_mm_prompt *mp)
{
    qmix_err err;
    char path[512];
    snprintf(path, sizeof path, FIX "/images/%s.png", images[i]);
    size_t len;
    void *bytes = tu_read(path, &len);
    ck_assert_msg(!qmix_vision_prompt_image(vision, sess->pool, bytes, len, path, pim, &err), "%s",
                  err.msg);
    free(bytes);
    qmix_tokenizer *tok;
    ck_assert_msg(!qmix_tok_load(FIX, &tok, &err), "%s", err.msg);
    json_t *msgs = tu_json("[{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, "
                           "{\"type\": \"text\", \"text\": \"Describe this image in one sentence.\"}]}]");
    qmix_chat_opts co;
    qmix_chat_opts_default(&co);
    char *text;
    size_t tlen, n_ids;
    int32_t *ids;
    ck_assert_msg(!qmix_chat_render(msgs, NULL, &co, &text, &tlen, &err), "%s", err.msg);
    ck_assert_msg(!qmix_chat_encode(tok, text, tlen, msgs, &ids, &n_ids, &err), "%s", err.msg);
    ck_assert_msg(!qmix_mm_prompt_build(ids, (int)n_ids, vision->cfg.image_token_id, pim, 1,
                                        qmix_model_config(model)->hidden_size, mp, &err),
                  "%s", err.msg);
    free(ids);
    free(text);
    json_decref(msgs);
    qmix_tok_free(tok);
}

START_TEST(embeddings_prompt_logits_greedy)
{
    int i = _i;
    qmix_prompt_image pim;
    qmix_mm_prompt mp;
    golden_prompt(i, &pim, &mp);
    int D = qmix_model_config(model)->hidden_size, V = qmix_model_config(model)->vocab_size;
    size_t n_emb = (size_t)pim.lh * pim.lw * D;
    float *want_emb = read_f32(images[i], "image_embeds.f32", n_emb);
    double d = max_diff(pim.embeds, want_emb, n_emb);
    printf("%s: embeddings max |diff| %.3g\n", images[i], d);
    ck_assert_msg(d <= EMBED_TOL, "%s: image embeddings differ by %g", images[i], d);

    char path[512];
    int n_tok, n_pos;
    snprintf(path, sizeof path, FIX "/golden/%s/tokens.txt", images[i]);
    int32_t *want_tok = tu_read_ids(path, &n_tok);
    ck_assert_int_eq(mp.n, n_tok);
    for (int t = 0; t < n_tok; t++) ck_assert_int_eq(mp.tokens[t], want_tok[t]);
    snprintf(path, sizeof path, FIX "/golden/%s/positions.txt", images[i]);
    int32_t *want_pos = tu_read_ids(path, &n_pos);
    ck_assert_int_eq(n_pos, 3 * n_tok);
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < 3; k++)
            ck_assert_msg(mp.pos3[3 * t + k] == want_pos[k * n_tok + t],
                          "%s: position %d of token %d is %d, expected %d", images[i], k, t,
                          mp.pos3[3 * t + k], want_pos[k * n_tok + t]);

    qmix_err err;
    float *logits = malloc(sizeof *logits * (size_t)n_tok * V);
    qmix_session_reset(sess);
    ck_assert_msg(!qmix_session_prefill_mm(sess, mp.tokens, mp.n, mp.embeds, mp.pos3, logits, &err),
                  "%s", err.msg);
    float *want_logits = read_f32(images[i], "logits_prefill.f32", (size_t)n_tok * V);
    d = max_diff(logits, want_logits, (size_t)n_tok * V);
    printf("%s: prompt logits max |diff| %.3g\n", images[i], d);
    ck_assert_msg(d <= LOGIT_TOL, "%s: prompt logits differ by %g", images[i], d);

    snprintf(path, sizeof path, FIX "/golden/%s/greedy.txt", images[i]);
    int n_greedy;
    int32_t *want_greedy = tu_read_ids(path, &n_greedy);
    ck_assert_int_eq(n_greedy, N_GREEDY);
    float *want_gl = read_f32(images[i], "logits_greedy.f32", (size_t)N_GREEDY * V);
    double dg = 0;
    for (int g = 0; g < N_GREEDY; g++) {
        const float *l = qmix_session_logits(sess);
        double dd = max_diff(l, want_gl + (size_t)g * V, (size_t)V);
        if (dd > dg) dg = dd;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (l[v] > l[best]) best = v;
        ck_assert_msg(best == want_greedy[g], "%s: greedy token %d is %d, expected %d", images[i],
                      g, best, want_greedy[g]);
        if (g + 1 < N_GREEDY) ck_assert_msg(!qmix_session_decode(sess, best, &err), "%s", err.msg);
    }
    printf("%s: greedy logits max |diff| %.3g, tokens exact\n", images[i], dg);
    ck_assert_msg(dg <= LOGIT_TOL, "%s: greedy logits differ by %g", images[i], dg);
    free(want_emb), free(want_tok), free(want_pos), free(logits), free(want_logits);
    free(want_greedy), free(want_gl);
    qmix_mm_prompt_free(&mp);
    qmix_prompt_image_free(&pim);
}
END_TEST

/* Two image prompts and a text decode in one qmix_forward_batch_mm give each sequence's logits
 * alone; a sequence restored from a snapshot taken inside the image continues as the cold run. */
START_TEST(batched_and_resumed)
{
    qmix_err err;
    const qmix_config *cfg = qmix_model_config(model);
    int V = cfg->vocab_size;
    qmix_prompt_image pim[2];
    qmix_mm_prompt mp[2];
    golden_prompt(0, &pim[0], &mp[0]);
    golden_prompt(2, &pim[1], &mp[1]);
    /* alone: last-token logits of each whole prompt, then of one decoded token */
    float *alone = malloc(sizeof *alone * 4 * V);
    for (int k = 0; k < 2; k++) {
        qmix_session_reset(sess);
        ck_assert(!qmix_session_prefill_mm(sess, mp[k].tokens, mp[k].n, mp[k].embeds, mp[k].pos3,
                                           NULL, &err));
        memcpy(alone + (2 * k) * V, qmix_session_logits(sess), sizeof(float) * V);
        ck_assert(!qmix_session_decode(sess, 42, &err));
        memcpy(alone + (2 * k + 1) * V, qmix_session_logits(sess), sizeof(float) * V);
    }
    /* batched: both prompts in one pass (rows of both, positions per row), then both decodes */
    qmix_session *shared;
    qmix_session_opts o = {.max_ctx = 256, .n_threads = 2};
    ck_assert(!qmix_session_new_shared(model, &o, &shared, &err));
    qmix_seq *seqs[2];
    for (int k = 0; k < 2; k++) ck_assert(!qmix_seq_new(cfg, 256, QMIX_KV_DEFAULT, &seqs[k], &err));
    int n_tokens[2] = {mp[0].n, mp[1].n}, rows = mp[0].n + mp[1].n;
    int32_t *tokens = malloc(sizeof *tokens * rows), *pos3 = malloc(sizeof *pos3 * 3 * rows);
    const float **emb = malloc(sizeof *emb * rows);
    for (int k = 0, at = 0; k < 2; at += mp[k].n, k++) {
        memcpy(tokens + at, mp[k].tokens, sizeof *tokens * mp[k].n);
        memcpy(pos3 + 3 * at, mp[k].pos3, sizeof *pos3 * 3 * mp[k].n);
        memcpy(emb + at, mp[k].embeds, sizeof *emb * mp[k].n);
    }
    float *out = malloc(sizeof *out * 2 * V);
    qmix_forward_batch_mm(shared, seqs, n_tokens, 2, tokens, emb, pos3, out, NULL);
    for (int k = 0; k < 2; k++)
        ck_assert_msg(max_diff(out + k * V, alone + 2 * k * V, V) <= 1e-4,
                      "batched prompt %d differs from alone by %g", k,
                      max_diff(out + k * V, alone + 2 * k * V, V));
    int ones[2] = {1, 1};
    int32_t next[2] = {42, 42};
    qmix_forward_batch(shared, seqs, ones, 2, next, out, NULL);
    for (int k = 0; k < 2; k++)
        ck_assert_msg(max_diff(out + k * V, alone + (2 * k + 1) * V, V) <= 1e-4,
                      "batched decode %d differs from alone", k);

    /* resumed: snapshot of prompt 1 after its first 20 tokens (inside the image), restored into
     * a fresh sequence, rest of the prompt prefilled from its positions */
    qmix_seq *cold = seqs[1], *warm;
    ck_assert(!qmix_seq_new(cfg, 256, QMIX_KV_DEFAULT, &warm, &err));
    qmix_seq_reset(cold, cfg);
    int cut = 20;
    ck_assert(mp[1].tokens[cut] == vision->cfg.image_token_id);
    qmix_forward_batch_mm(shared, &cold, &cut, 1, mp[1].tokens, mp[1].embeds, mp[1].pos3, out, NULL);
    float *snap = malloc(qmix_seq_snapshot_bytes(cfg, QMIX_KV_DEFAULT, cut));
    qmix_seq_save(cold, cfg, snap);
    qmix_seq_restore(warm, cfg, snap, cut);
    int rest = mp[1].n - cut;
    qmix_forward_batch_mm(shared, &warm, &rest, 1, mp[1].tokens + cut, mp[1].embeds + cut,
                          mp[1].pos3 + 3 * cut, out, NULL);
    ck_assert_msg(max_diff(out, alone + 2 * V, V) <= 1e-4, "resumed prompt differs from cold");
    qmix_forward_batch(shared, &warm, ones, 1, next, out, NULL);
    ck_assert_msg(max_diff(out, alone + 3 * V, V) <= 1e-4, "resumed decode differs from cold");

    free(snap), free(out), free(tokens), free(pos3), free(emb), free(alone);
    qmix_seq_free(warm);
    for (int k = 0; k < 2; k++) {
        qmix_seq_free(seqs[k]);
        qmix_mm_prompt_free(&mp[k]);
        qmix_prompt_image_free(&pim[k]);
    }
    qmix_session_free(shared);
}
END_TEST

START_TEST(bad_images)
{
    qmix_err err;
    qmix_image img;
    size_t len;
    uint8_t *png = tu_read(FIX "/images/img_64x96.png", &len);
    /* truncated at every length up to the first pixels, and then in the middle */
    for (size_t cut = 0; cut < len; cut += cut < 64 ? 1 : 997) {
        int rc = qmix_image_decode(png, cut, "cut.png", &img, &err);
        ck_assert_msg(rc == -1, "a PNG cut at %zu bytes decoded", cut);
        ck_assert(strstr(err.msg, "cut.png") != NULL);
    }
    /* a header claiming a huge image: refused by dimensions, before pixels are read */
    uint8_t *big = malloc(len);
    memcpy(big, png, len);
    big[16] = 0x7f; /* IHDR width = 0x7f000060 */
    ck_assert(qmix_image_decode(big, len, "big.png", &img, &err) == -1);
    ck_assert_msg(strstr(err.msg, "big.png"), "%s", err.msg);
    ck_assert(qmix_image_decode("GIF89a....", 10, "x.gif", &img, &err) == -1);
    ck_assert_msg(strstr(err.msg, "not a PNG or JPEG"), "%s", err.msg);
    static const uint8_t jpeg_head[] = {0xff, 0xd8, 0xff, 0xe0, 0, 16, 'J', 'F', 'I', 'F', 0};
    ck_assert(qmix_image_decode(jpeg_head, sizeof jpeg_head, "t.jpg", &img, &err) == -1);
    ck_assert_msg(strstr(err.msg, "JPEG"), "%s", err.msg);
    free(big);
    free(png);

    /* a model without a tower */
    qmix_model *text_only;
    qmix_vision *v;
    ck_assert(!qmix_model_open("testdata/fixtures/tiny-a", &text_only, &err));
    ck_assert(qmix_vision_open(text_only, &v, &err) == -1);
    ck_assert_msg(strstr(err.msg, "no vision tower"), "%s", err.msg);
    qmix_model_close(text_only);

    /* placeholders and images that do not match */
    int32_t ids[3] = {1, 840, 2};
    qmix_mm_prompt mp;
    ck_assert(qmix_mm_prompt_build(ids, 3, 840, NULL, 0, 64, &mp, &err) == -1);
    ck_assert_msg(strstr(err.msg, "1 image placeholders but 0 images"), "%s", err.msg);
}
END_TEST

/* Sample value at (x, y) of the images in testdata/images: byte b of row y is (b·37 + y·11) mod 256 as
 * written by tools/gen-test-images.c. */
static uint8_t pattern(int b, int y) { return (uint8_t)(b * 37 + y * 11); }

/* Every PNG colour type and the JPEG variants decode to RGB as Pillow + convert_to_rgb give it. */
START_TEST(decoder_modes)
{
    qmix_err err;
    qmix_image img;
    ck_assert_msg(!qmix_image_load("testdata/images/grey17x9.png", &img, &err), "%s", err.msg);
    ck_assert(img.width == 17 && img.height == 9);
    for (int y = 0; y < 9; y++)
        for (int x = 0; x < 17; x++)
            for (int c = 0; c < 3; c++)
                ck_assert_int_eq(img.rgb[(y * 17 + x) * 3 + c], pattern(x, y));
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/rgba20.png", &img, &err));
    for (int y = 0; y < 20; y++)
        for (int x = 0; x < 20; x++) {
            uint8_t px[4] = {pattern(4 * x, y), pattern(4 * x + 1, y), pattern(4 * x + 2, y),
                             pattern(4 * x + 3, y)}, want[3];
            qmix_image_rgba_on_white(px, want);
            ck_assert(!memcmp(img.rgb + (y * 20 + x) * 3, want, 3));
        }
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/greyalpha.png", &img, &err));
    for (int y = 0; y < 7; y++)
        for (int x = 0; x < 9; x++) {
            uint8_t g = pattern(2 * x, y), px[4] = {g, g, g, pattern(2 * x + 1, y)}, want[3];
            qmix_image_rgba_on_white(px, want);
            ck_assert(!memcmp(img.rgb + (y * 9 + x) * 3, want, 3));
        }
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/pal_trns.png", &img, &err));
    static const uint8_t pal[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {9, 99, 199}};
    static const uint8_t trns[4] = {255, 0, 128, 255};
    for (int y = 0; y < 12; y++)
        for (int x = 0; x < 12; x++) {
            int k = pattern(x, y) & 3;
            uint8_t px[4] = {pal[k][0], pal[k][1], pal[k][2], trns[k]}, want[3];
            qmix_image_rgba_on_white(px, want);
            ck_assert(!memcmp(img.rgb + (y * 12 + x) * 3, want, 3));
        }
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/rgb16.png", &img, &err)); /* high bytes */
    for (int y = 0; y < 6; y++)
        for (int i = 0; i < 18; i++) ck_assert_int_eq(img.rgb[y * 18 + i], pattern(2 * i, y));
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/interlaced.png", &img, &err));
    for (int y = 0; y < 17; y++)
        for (int i = 0; i < 33 * 3; i++) ck_assert_int_eq(img.rgb[y * 99 + i], pattern(i, y));
    qmix_image_free(&img);
    ck_assert(!qmix_image_load("testdata/images/grey2bit.png", &img, &err));
    ck_assert(img.width == 13 && img.height == 5);
    qmix_image_free(&img);
    static const char *const jpegs[3] = {"rgb40x24.jpg", "grey10.jpg", "progressive.jpg"};
    static const int dims[3][2] = {{40, 24}, {10, 10}, {24, 16}};
    for (int k = 0; k < 3; k++) {
        char path[256];
        snprintf(path, sizeof path, "testdata/images/%s", jpegs[k]);
        ck_assert_msg(!qmix_image_load(path, &img, &err), "%s", err.msg);
        ck_assert(img.width == dims[k][0] && img.height == dims[k][1]);
        if (k == 1) /* grey: replicated */
            for (int i = 0; i < 100; i++)
                ck_assert(img.rgb[3 * i] == img.rgb[3 * i + 1] && img.rgb[3 * i] == img.rgb[3 * i + 2]);
        qmix_image_free(&img);
    }
    /* a truncated JPEG is refused, not half decoded */
    size_t len;
    uint8_t *jpg = tu_read("testdata/images/rgb40x24.jpg", &len);
    ck_assert(qmix_image_decode(jpg, len - 40, "cut.jpg", &img, &err) == -1);
    ck_assert_msg(strstr(err.msg, "cut.jpg"), "%s", err.msg);
    free(jpg);
}
END_TEST

/* Alpha is composited onto white as Pillow's alpha_composite does it (integer arithmetic). */
START_TEST(alpha_on_white)
{
    uint8_t rgb[3];
    qmix_image_rgba_on_white((const uint8_t[4]){10, 20, 30, 255}, rgb);
    ck_assert(rgb[0] == 10 && rgb[1] == 20 && rgb[2] == 30);
    qmix_image_rgba_on_white((const uint8_t[4]){10, 20, 30, 0}, rgb);
    ck_assert(rgb[0] == 255 && rgb[1] == 255 && rgb[2] == 255);
    qmix_image_rgba_on_white((const uint8_t[4]){0, 100, 255, 128}, rgb);
    /* 0·128/255 + 255·127/255 = 127; 100·128/255 + 127 = 177.2; 255 */
    ck_assert_int_eq(rgb[0], 127);
    ck_assert_int_eq(rgb[1], 177);
    ck_assert_int_eq(rgb[2], 255);
}
END_TEST

/* The tower's embeddings of image i from the checkpoint at dir. */
static float *embed_with(const char *dir, int i, int *rows)
{
    qmix_err err;
    qmix_model *m;
    qmix_vision *v;
    ck_assert_msg(!qmix_model_open(dir, &m, &err), "%s", err.msg);
    ck_assert_msg(!qmix_vision_open(m, &v, &err), "%s", err.msg);
    char path[512];
    snprintf(path, sizeof path, FIX "/images/%s.png", images[i]);
    size_t len;
    void *bytes = tu_read(path, &len);
    qmix_prompt_image pim;
    ck_assert_msg(!qmix_vision_prompt_image(v, sess->pool, bytes, len, path, &pim, &err), "%s", err.msg);
    free(bytes);
    *rows = pim.lh * pim.lw;
    qmix_vision_free(v);
    qmix_model_close(m);
    return pim.embeds;
}

/* The MLX (mlx-vlm) layout: `qmix quantize` keeps the tower 16-bit as vision_tower.*, which gives
 * the HF tower's embeddings exactly; and a channels-last patch embedding (mlx-vlm's own
 * conversion) is permuted at load to the same embeddings. */
START_TEST(mlx_layout)
{
    char *dir = tu_tmpdir(), out[600], perm[600], args[2048];
    snprintf(out, sizeof out, "%s/q4", dir);
    snprintf(args, sizeof args, "quantize " FIX " %s --recipe uniform-4 --quiet", out);
    tu_expect(args, 0, NULL);
    for (int i = 0; i < 3; i++) {
        int n_hf, n_mlx;
        float *hf = embed_with(FIX, i, &n_hf), *mlx = embed_with(out, i, &n_mlx);
        ck_assert_int_eq(n_hf, n_mlx);
        ck_assert_msg(max_diff(hf, mlx, (size_t)n_hf * 64) == 0, "%s: MLX tower differs by %g",
                      images[i], max_diff(hf, mlx, (size_t)n_hf * 64));
        free(hf);
        free(mlx);
    }
    /* what quantizing costs on images: qmix kld --images (0 against itself, > 0 for 4 bits) */
    double self = tu_kld_mean("kld " FIX " " FIX " --images " FIX "/images --prompt 'Describe "
                              "this image.' --answer-tokens 8 --json");
    double q4 = tu_kld_mean("kld " FIX " %s --images " FIX "/images --prompt 'Describe this "
                            "image.' --answer-tokens 8 --json", out);
    printf("kld --images: self %.3g, uniform-4 %.4f\n", self, q4);
    ck_assert(self == 0.0);
    ck_assert(q4 > 1e-3 && q4 < 10);
    /* the same checkpoint with patch_embed channels-last [D, tp, ps, ps, 3] */
    snprintf(perm, sizeof perm, "%s/perm", dir);
    snprintf(args, sizeof args, "cp -r '%s' '%s' && rm '%s/model.safetensors.index.json'", out,
             perm, perm);
    ck_assert_int_eq(system(args), 0);
    qmix_err err;
    qmix_st_store *st;
    snprintf(args, sizeof args, "%s/model.safetensors", out);
    ck_assert_msg(!qmix_st_open(args, &st, &err), "%s", err.msg);
    uint64_t n = qmix_st_count(st);
    qmix_stw_tensor *specs = calloc(n, sizeof *specs);
    for (uint64_t k = 0; k < n; k++) {
        const qmix_tensor *t = qmix_st_at(st, k);
        specs[k] = (qmix_stw_tensor){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
        memcpy(specs[k].shape, t->shape, sizeof t->shape);
        if (!strcmp(t->name, "vision_tower.patch_embed.proj.weight")) {
            int64_t s5[5] = {t->shape[0], t->shape[2], t->shape[3], t->shape[4], 3};
            memcpy(specs[k].shape, s5, sizeof s5);
        }
    }
    qmix_stw *w;
    snprintf(args, sizeof args, "%s/model.safetensors", perm);
    ck_assert_msg(!qmix_stw_open(args, specs, n, NULL, 0, &w, &err), "%s", err.msg);
    for (uint64_t k = 0; k < n; k++) {
        const qmix_tensor *t = qmix_st_at(st, k);
        ck_assert(!qmix_stw_begin(w, t->name, &err));
        if (strcmp(t->name, "vision_tower.patch_embed.proj.weight")) {
            ck_assert(!qmix_stw_write(w, t->data, t->nbytes, &err));
            continue;
        }
        const uint16_t *src = t->data; /* [D][3][2][16][16] -> [D][2][16][16][3], bf16 */
        uint16_t *dst = malloc(t->nbytes);
        for (int64_t o = 0; o < t->shape[0]; o++)
            for (int c = 0; c < 3; c++)
                for (int f = 0; f < 2; f++)
                    for (int y = 0; y < 16; y++)
                        for (int x = 0; x < 16; x++)
                            dst[(((o * 2 + f) * 16 + y) * 16 + x) * 3 + c] =
                                src[(((o * 3 + c) * 2 + f) * 16 + y) * 16 + x];
        ck_assert(!qmix_stw_write(w, dst, t->nbytes, &err));
        free(dst);
    }
    ck_assert_msg(!qmix_stw_close(w, &err), "%s", err.msg);
    qmix_st_close(st);
    free(specs);
    int n_hf, n_p;
    float *hf = embed_with(FIX, 2, &n_hf), *p = embed_with(perm, 2, &n_p);
    ck_assert_int_eq(n_hf, n_p);
    ck_assert_msg(max_diff(hf, p, (size_t)n_hf * 64) <= 1e-5, "channels-last differs by %g",
                  max_diff(hf, p, (size_t)n_hf * 64));
    free(hf);
    free(p);
    tu_rmdir(dir);
}
END_TEST

/* The GGUF form: `qmix convert --to gguf` writes the tower beside the text GGUF as llama.cpp's
 * mmproj file; text GGUF + mmproj reproduce the goldens (F32: logits and greedy answers; the
 * default F16 mmproj: embeddings within 1e-4 and the greedy answers). */
START_TEST(gguf_mmproj)
{
    char *dir = tu_tmpdir(), args[2048], *out;
    for (int f32 = 1; f32 >= 0; f32--) {
        snprintf(args, sizeof args, "convert " FIX " %s/m%d.gguf --to gguf --quiet%s", dir, f32,
                 f32 ? " --type f32" : "");
        tu_expect(args, 0, NULL);
        char gguf[700], mmproj[700];
        snprintf(gguf, sizeof gguf, "%s/m%d.gguf", dir, f32);
        snprintf(mmproj, sizeof mmproj, "%s/mmproj-m%d.gguf", dir, f32);
        qmix_err err;
        qmix_model *m;
        qmix_vision *v;
        ck_assert_msg(!qmix_model_open(gguf, &m, &err), "%s", err.msg);
        ck_assert(qmix_vision_open(m, &v, &err) == -1);
        ck_assert_msg(strstr(err.msg, "--mmproj"), "%s", err.msg);
        ck_assert_msg(!qmix_vision_open_mmproj(m, mmproj, NULL, &v, &err), "%s", err.msg);
        ck_assert_int_eq(v->cfg.image_token_id, 840);
        ck_assert_int_eq(v->cfg.min_pixels, 4096);
        for (int i = 0; i < 3; i++) {
            char path[512];
            snprintf(path, sizeof path, FIX "/images/%s.png", images[i]);
            size_t len;
            void *bytes = tu_read(path, &len);
            qmix_prompt_image pim;
            ck_assert_msg(!qmix_vision_prompt_image(v, sess->pool, bytes, len, path, &pim, &err),
                          "%s", err.msg);
            size_t n = (size_t)pim.lh * pim.lw * 64;
            float *want = read_f32(images[i], "image_embeds.f32", n);
            double d = max_diff(pim.embeds, want, n);
            printf("%s: mmproj %s embeddings max |diff| %.3g\n", images[i], f32 ? "F32" : "F16", d);
            ck_assert_msg(d <= (f32 ? 1e-5 : EMBED_TOL), "%s: mmproj embeddings differ by %g",
                          images[i], d);
            free(want);
            free(bytes);
            qmix_prompt_image_free(&pim);

            ck_assert_int_eq(tu_run_out(&out, "generate %s --mmproj %s --image %s -p 'Describe "
                                        "this image in one sentence.' -n 8 --temp 0 --print-ids "
                                        "--ignore-eos 2>/dev/null", gguf, mmproj, path), 0);
            snprintf(path, sizeof path, FIX "/golden/%s/greedy.txt", images[i]);
            int ng;
            int32_t *g = tu_read_ids(path, &ng);
            char want_ids[256] = "";
            for (int k = 0; k < ng; k++)
                snprintf(want_ids + strlen(want_ids), sizeof want_ids - strlen(want_ids), "%d\n", g[k]);
            ck_assert_msg(!strcmp(out, want_ids), "%s via GGUF + mmproj: greedy\n%s\nexpected\n%s",
                          images[i], out, want_ids);
            free(g);
            free(out);
        }
        qmix_vision_free(v);
        qmix_model_close(m);
    }
    /* the text GGUF's rope.dimension_sections come from the config (tiny-b: 6 5 5) */
    snprintf(args, sizeof args, "convert testdata/fixtures/tiny-b %s/b.gguf --to gguf --quiet", dir);
    tu_expect(args, 0, NULL);
    snprintf(args, sizeof args, "%s/b.gguf", dir);
    qmix_err err;
    qmix_model *mb;
    ck_assert_msg(!qmix_model_open(args, &mb, &err), "%s", err.msg);
    const int *sec = qmix_model_config(mb)->mrope_section;
    ck_assert_msg(sec[0] == 6 && sec[1] == 5 && sec[2] == 5, "sections %d %d %d", sec[0], sec[1],
                  sec[2]);
    qmix_model_close(mb);
    tu_rmdir(dir);
}
END_TEST

static char *b64(const uint8_t *p, size_t n)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *o = malloc(4 * (n / 3 + 1) + 1), *q = o;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        *q++ = a[v >> 18];
        *q++ = a[(v >> 12) & 63];
        *q++ = i + 1 < n ? a[(v >> 6) & 63] : '=';
        *q++ = i + 2 < n ? a[v & 63] : '=';
    }
    *q = 0;
    return o;
}

/* The command line: generate --image --print-ids gives the greedy goldens; logits --messages
 * with a data: URL gives the prompt ids and logits; bad requests fail with clear messages. */
START_TEST(cli)
{
    char *dir = tu_tmpdir(), path[600], args[2048], *out;
    ck_assert_int_eq(tu_run_out(&out, "generate " FIX " --image " FIX "/images/img_150x200.png -p 'Describe "
                                "this image in one sentence.' -n 8 --temp 0 --print-ids "
                                "--ignore-eos"), 0);
    int n;
    int32_t *want = tu_read_ids(FIX "/golden/img_150x200/greedy.txt", &n), got[8], k = 0;
    for (char *p = out, *e; k < 8 && *p; p = e) {
        got[k] = (int32_t)strtol(p, &e, 10);
        if (e == p) break;
        k++;
    }
    ck_assert_int_eq(k, 8);
    for (int i = 0; i < 8; i++) ck_assert_int_eq(got[i], want[i]);
    free(out);
    free(want);

    size_t len;
    uint8_t *png = tu_read(FIX "/images/img_64x96.png", &len);
    char *enc = b64(png, len);
    size_t cap = strlen(enc) + 512;
    char *conv = malloc(cap);
    snprintf(conv, cap, "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", "
             "\"image_url\": {\"url\": \"data:image/png;base64,%s\"}}, {\"type\": \"text\", "
             "\"text\": \"Describe this image in one sentence.\"}]}]", enc);
    snprintf(path, sizeof path, "%s/conv.json", dir);
    tu_write(path, conv, strlen(conv));
    snprintf(args, sizeof args, "logits " FIX " --messages %s --out %s/l.f32 --tokens-out %s/t.txt",
             path, dir, dir);
    tu_expect(args, 0, NULL);
    snprintf(path, sizeof path, "%s/t.txt", dir);
    int nt, ng;
    int32_t *t = tu_read_ids(path, &nt), *g = tu_read_ids(FIX "/golden/img_64x96/tokens.txt", &ng);
    ck_assert_int_eq(nt, ng);
    for (int i = 0; i < nt; i++) ck_assert_int_eq(t[i], g[i]);
    snprintf(path, sizeof path, "%s/l.f32", dir);
    size_t lsize;
    float *l = tu_read(path, &lsize);
    float *wl = read_f32("img_64x96", "logits_prefill.f32", (size_t)ng * 1024);
    ck_assert_uint_eq(lsize, (size_t)ng * 1024 * sizeof(float));
    ck_assert(max_diff(l, wl, (size_t)ng * 1024) <= LOGIT_TOL);
    free(t), free(g), free(l), free(wl), free(png), free(enc), free(conv);

    /* chat: /image attaches to the next message; the answer is generate's */
    char *gen_out, *chat_out;
    ck_assert_int_eq(tu_run_out(&gen_out, "generate " FIX " --image " FIX "/images/img_64x96.png "
                                "-p 'Describe this image in one sentence.' -n 8 --temp 0 "
                                "--ignore-eos 2>/dev/null"), 0);
    snprintf(path, sizeof path, "%s/chat.in", dir);
    const char *chat_in = "/image " FIX "/images/img_64x96.png\nDescribe this image in one sentence.\n";
    tu_write(path, chat_in, strlen(chat_in));
    ck_assert_int_eq(tu_run_out(&chat_out, "chat " FIX " --temp 0 --max-tokens 8 --ignore-eos <%s",
                                path), 0);
    ck_assert_msg(strstr(chat_out, "image attached (96x64)"), "%s", chat_out);
    ck_assert_msg(strstr(chat_out, gen_out), "chat answered\n%s\nnot\n%s", chat_out, gen_out);
    free(gen_out);
    free(chat_out);

    /* errors */
    tu_expect("generate testdata/fixtures/tiny-a --image " FIX "/images/img_64x96.png -p x", 1,
              "no vision tower");
    static const char *const bad[][2] = {
        {"https://example.com/cat.png", "does not fetch remote images"},
        {"data:image/png;base64,@@@@", "invalid base64"},
        {"data:image/png,rawbytes", "must be base64"},
        {"data:image/png;base64,aGVsbG8=", "not a PNG or JPEG"},
        {"file:///nonexistent/x.png", "x.png"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(path, sizeof path, "%s/bad.json", dir);
        char body[512];
        snprintf(body, sizeof body, "[{\"role\": \"user\", \"content\": [{\"type\": "
                 "\"image_url\", \"image_url\": {\"url\": \"%s\"}}]}]", bad[i][0]);
        tu_write(path, body, strlen(body));
        snprintf(args, sizeof args, "generate " FIX " --messages %s -n 1", path);
        tu_expect(args, 1, bad[i][1]);
    }
    /* too many images: refused before any is read */
    size_t bcap = 200 * 80;
    char *many = malloc(bcap);
    size_t at = (size_t)snprintf(many, bcap, "[{\"role\": \"user\", \"content\": [");
    for (int i = 0; i < CLI_IMAGES_OVER; i++)
        at += (size_t)snprintf(many + at, bcap - at, "%s{\"type\": \"image_url\", \"image_url\": "
                               "\"file:///nonexistent.png\"}", i ? ", " : "");
    snprintf(many + at, bcap - at, "]}]");
    tu_write(path, many, strlen(many));
    tu_expect(args, 1, "too many images");
    free(many);
    tu_rmdir(dir);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("vision");
    TCase *tc = tcase_create("tiny-vl-a");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, config_and_pixels);
    tcase_add_test(tc, smart_resize_rules);
    tcase_add_loop_test(tc, embeddings_prompt_logits_greedy, 0, 3);
    tcase_add_test(tc, batched_and_resumed);
    tcase_add_test(tc, bad_images);
    tcase_add_test(tc, alpha_on_white);
    tcase_add_test(tc, decoder_modes);
    tcase_add_test(tc, cli);
    tcase_add_test(tc, mlx_layout);
    tcase_add_test(tc, gguf_mmproj);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

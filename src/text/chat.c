/* The Qwen3.5 chat template in C. Each function below mirrors a part of the template; the comments
 * quote the Jinja they reproduce. Python semantics matter where the template leans on them:
 * `|trim` is str.strip() (Unicode whitespace), `|string` and `{{ }}` are str() (True, None, 1.5),
 * `|tojson` is json.dumps(ensure_ascii=False). */
#include "text/chat.h"
#include "text/tok_gguf.h"
#include "text/tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "util/fileio.h"

const char qmix_chat_qwen35_template[] =
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- macro render_content(content, do_vision_count, is_system_content=false) %}\n"
    "    {%- if content is string %}\n"
    "        {{- content }}\n"
    "    {%- elif content is iterable and content is not mapping %}\n"
    "        {%- for item in content %}\n"
    "            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}\n"
    "                {%- if is_system_content %}\n"
    "                    {{- raise_exception('System message cannot contain images.') }}\n"
    "                {%- endif %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}\n"
    "                    {{- 'Picture ' ~ image_count.value ~ ': ' }}\n"
    "                {%- endif %}\n"
    "                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}\n"
    "            {%- elif 'video' in item or item.type == 'video' %}\n"
    "                {%- if is_system_content %}\n"
    "                    {{- raise_exception('System message cannot contain videos.') }}\n"
    "                {%- endif %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}\n"
    "                    {{- 'Video ' ~ video_count.value ~ ': ' }}\n"
    "                {%- endif %}\n"
    "                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}\n"
    "            {%- elif 'text' in item %}\n"
    "                {{- item.text }}\n"
    "            {%- else %}\n"
    "                {{- raise_exception('Unexpected item type in content.') }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- elif content is none or content is undefined %}\n"
    "        {{- '' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Unexpected content type.') }}\n"
    "    {%- endif %}\n"
    "{%- endmacro %}\n"
    "{%- if not messages %}\n"
    "    {{- raise_exception('No messages provided.') }}\n"
    "{%- endif %}\n"
    "{%- if tools and tools is iterable and tools is not mapping %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {{- \"# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\" }}\n"
    "    {{- '\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n<parameter=example_parameter_2>\\nThis is the value for the second parameter\\nthat can span\\nmultiple lines\\n</parameter>\\n</function>\\n</tool_call>\\n\\n<IMPORTANT>\\nReminder:\\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\\n- Required parameters MUST be specified\\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\\n</IMPORTANT>' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {%- set content = render_content(messages[0].content, false, true)|trim %}\n"
    "        {%- if content %}\n"
    "            {{- '\\n\\n' + content }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {%- set content = render_content(messages[0].content, false, true)|trim %}\n"
    "        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" %}\n"
    "        {%- set content = render_content(message.content, false)|trim %}\n"
    "        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}\n"
    "            {%- set ns.multi_step_tool = false %}\n"
    "            {%- set ns.last_query_index = index %}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if ns.multi_step_tool %}\n"
    "    {{- raise_exception('No user query found in messages.') }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = render_content(message.content, true)|trim %}\n"
    "    {%- if message.role == \"system\" %}\n"
    "        {%- if not loop.first %}\n"
    "            {{- raise_exception('System message must be at the beginning.') }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- set reasoning_content = reasoning_content|trim %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if tool_call.function is defined %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {%- if loop.first %}\n"
    "                    {%- if content|trim %}\n"
    "                        {{- '\\n\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\n"
    "                    {%- else %}\n"
    "                        {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\n"
    "                    {%- endif %}\n"
    "                {%- else %}\n"
    "                    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.arguments is defined %}\n"
    "                    {%- for args_name, args_value in tool_call.arguments|items %}\n"
    "                        {{- '<parameter=' + args_name + '>\\n' }}\n"
    "                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}\n"
    "                        {{- args_value }}\n"
    "                        {{- '\\n</parameter>\\n' }}\n"
    "                    {%- endfor %}\n"
    "                {%- endif %}\n"
    "                {{- '</function>\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.previtem and loop.previtem.role != \"tool\" %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if not loop.last and loop.nextitem.role != \"tool\" %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- elif loop.last %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Unexpected message role.') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<think>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}";
const size_t qmix_chat_qwen35_template_len = sizeof qmix_chat_qwen35_template - 1;

/* ---- growable byte string ---- */

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} sb;

static void sb_put(sb *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_puts(sb *b, const char *s) { sb_put(b, s, strlen(s)); }

/* Hands the buffer over (an empty string when nothing was written). */
static int sb_take(sb *b, char **out, size_t *len)
{
    if (!b->oom && !b->p) sb_put(b, "", 0);
    if (b->oom) {
        free(b->p);
        *out = NULL;
        return -1;
    }
    *out = b->p;
    if (len) *len = b->n;
    return 0;
}

/* ---- Python str(), repr(float), json.dumps ---- */

/* repr(float): the shortest digits that round-trip; exponent form when the decimal point would
 * sit more than 16 places right or 4 places left of the first digit ("1e+16", "1e-05"). */
static void py_float_repr(double x, char *buf, size_t cap)
{
    if (isnan(x)) {
        snprintf(buf, cap, "NaN");
        return;
    }
    if (isinf(x)) {
        snprintf(buf, cap, x < 0 ? "-Infinity" : "Infinity");
        return;
    }
    if (x == 0) {
        snprintf(buf, cap, signbit(x) ? "-0.0" : "0.0");
        return;
    }
    char tmp[48];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, x);
        if (strtod(tmp, NULL) == x) break;
    }
    const char *s = tmp;
    int neg = 0;
    if (*s == '-') {
        neg = 1;
        s++;
    }
    char digits[32];
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s >= '0' && *s <= '9') digits[nd++] = *s;
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    int e = *s == 'e' ? atoi(s + 1) : 0;
    int decpt = e + 1;
    char *o = buf;
    size_t left = cap;
#define EMIT(...)                                                                                  \
    do {                                                                                           \
        int w_ = snprintf(o, left, __VA_ARGS__);                                                   \
        if (w_ < 0 || (size_t)w_ >= left) return;                                                  \
        o += w_;                                                                                   \
        left -= (size_t)w_;                                                                        \
    } while (0)
    if (neg) EMIT("-");
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            EMIT("0.");
            for (int i = 0; i < -decpt; i++) EMIT("0");
            EMIT("%s", digits);
        } else if (decpt >= nd) {
            EMIT("%s", digits);
            for (int i = nd; i < decpt; i++) EMIT("0");
            EMIT(".0");
        } else {
            EMIT("%.*s.%s", decpt, digits, digits + decpt);
        }
    } else {
        EMIT("%c", digits[0]);
        if (nd > 1) EMIT(".%s", digits + 1);
        int ex = decpt - 1;
        EMIT("e%c%02d", ex < 0 ? '-' : '+', ex < 0 ? -ex : ex);
    }
#undef EMIT
}

static void py_str_scalar(sb *b, const json_t *v)
{
    char buf[64];
    switch (json_typeof(v)) {
    case JSON_STRING: sb_put(b, json_string_value(v), json_string_length(v)); break;
    case JSON_INTEGER:
        snprintf(buf, sizeof buf, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        sb_puts(b, buf);
        break;
    case JSON_REAL:
        py_float_repr(json_real_value(v), buf, sizeof buf);
        sb_puts(b, buf);
        break;
    case JSON_TRUE: sb_puts(b, "True"); break;
    case JSON_FALSE: sb_puts(b, "False"); break;
    case JSON_NULL: sb_puts(b, "None"); break;
    default: break;
    }
}

static void json_str(sb *b, const char *s, size_t n)
{
    sb_put(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char ubuf[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                snprintf(ubuf, sizeof ubuf, "\\u%04x", c);
                esc = ubuf;
            }
        }
        if (esc) {
            sb_put(b, s + run, i - run);
            sb_puts(b, esc);
            run = i + 1;
        }
    }
    sb_put(b, s + run, n - run);
    sb_put(b, "\"", 1);
}

static int json_dump(sb *b, const json_t *v, int depth)
{
    if (depth > 1000) return -1;
    switch (json_typeof(v)) {
    case JSON_STRING: json_str(b, json_string_value(v), json_string_length(v)); return 0;
    case JSON_NULL: sb_puts(b, "null"); return 0;
    case JSON_TRUE: sb_puts(b, "true"); return 0;
    case JSON_FALSE: sb_puts(b, "false"); return 0;
    case JSON_INTEGER:
    case JSON_REAL: py_str_scalar(b, v); return 0;
    case JSON_ARRAY: {
        sb_put(b, "[", 1);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) sb_put(b, ", ", 2);
            if (json_dump(b, json_array_get(v, i), depth + 1)) return -1;
        }
        sb_put(b, "]", 1);
        return 0;
    }
    case JSON_OBJECT: {
        sb_put(b, "{", 1);
        const char *key;
        size_t klen;
        json_t *val;
        int first = 1;
        void *tmp;
        json_object_keylen_foreach_safe((json_t *)v, tmp, key, klen, val)
        {
            if (!first) sb_put(b, ", ", 2);
            first = 0;
            json_str(b, key, klen);
            sb_put(b, ": ", 2);
            if (json_dump(b, val, depth + 1)) return -1;
        }
        sb_put(b, "}", 1);
        return 0;
    }
    }
    return -1;
}

int qmix_chat_json_dumps(const json_t *v, char **out, size_t *len)
{
    sb b = {0};
    if (json_dump(&b, v, 0)) {
        free(b.p);
        *out = NULL;
        return -1;
    }
    return sb_take(&b, out, len);
}

int qmix_chat_py_str(const json_t *v, char **out, size_t *len)
{
    *out = NULL;
    if (!v || json_is_object(v) || json_is_array(v)) return -1;
    sb b = {0};
    py_str_scalar(&b, v);
    return sb_take(&b, out, len);
}

/* ---- Python str methods over (pointer, length) views ---- */

typedef struct {
    const char *p;
    size_t n;
} view;

/* str.isspace(): ASCII \t\n\v\f\r, \x1c-\x1f, space, and the Unicode spaces/separators. */
static int py_space(unsigned cp)
{
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

/* Decodes the (valid UTF-8) code point at s[i]; returns its byte length. */
static size_t utf8_at(const char *s, size_t n, size_t i, unsigned *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    unsigned c = u[i];
    size_t len = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    if (i + len > n) len = 1;
    unsigned v = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
    for (size_t k = 1; k < len; k++) v = (v << 6) | (u[i + k] & 0x3f);
    *cp = v;
    return len;
}

static view py_strip(view v)
{
    unsigned cp;
    while (v.n) {
        size_t l = utf8_at(v.p, v.n, 0, &cp);
        if (!py_space(cp)) break;
        v.p += l;
        v.n -= l;
    }
    while (v.n) {
        size_t start = v.n - 1;
        while (start > 0 && ((unsigned char)v.p[start] & 0xc0) == 0x80) start--;
        utf8_at(v.p, v.n, start, &cp);
        if (!py_space(cp)) break;
        v.n = start;
    }
    return v;
}

static view lstrip_nl(view v)
{
    while (v.n && v.p[0] == '\n') v.p++, v.n--;
    return v;
}

static view rstrip_nl(view v)
{
    while (v.n && v.p[v.n - 1] == '\n') v.n--;
    return v;
}

static const char *find(view v, const char *needle)
{
    return memmem(v.p, v.n, needle, strlen(needle));
}

static const char *find_last(view v, const char *needle)
{
    size_t k = strlen(needle);
    if (k > v.n) return NULL;
    for (size_t i = v.n - k + 1; i-- > 0;)
        if (!memcmp(v.p + i, needle, k)) return v.p + i;
    return NULL;
}

static int starts_with(view v, const char *s)
{
    size_t k = strlen(s);
    return v.n >= k && !memcmp(v.p, s, k);
}

static int ends_with(view v, const char *s)
{
    size_t k = strlen(s);
    return v.n >= k && !memcmp(v.p + v.n - k, s, k);
}

/* ---- the template ---- */

typedef struct {
    const qmix_chat_opts *opts;
    int image_count, video_count;
    qmix_err *err;
} render_ctx;

static int str_eq(const json_t *v, const char *s)
{
    return json_is_string(v) && json_string_length(v) == strlen(s) &&
           !strcmp(json_string_value(v), s);
}

static const json_t *field(const json_t *obj, const char *key)
{
    return json_is_object(obj) ? json_object_get(obj, key) : NULL;
}

/* Python's `needle in item` for a content part: a key of a dict, a substring of a string, an
 * element of a list. */
static int py_in(const json_t *item, const char *needle)
{
    if (json_is_object(item)) return json_object_get(item, needle) != NULL;
    if (json_is_string(item)) {
        view v = {json_string_value(item), json_string_length(item)};
        return find(v, needle) != NULL;
    }
    if (json_is_array(item)) {
        for (size_t i = 0; i < json_array_size(item); i++)
            if (str_eq(json_array_get(item, i), needle)) return 1;
        return 0;
    }
    return -1;
}

/* {%- macro render_content(content, do_vision_count, is_system_content=false) %} */
static int render_content(render_ctx *c, const json_t *content, int do_vision_count,
                          int is_system, sb *out)
{
    if (json_is_string(content)) {
        sb_put(out, json_string_value(content), json_string_length(content));
        return 0;
    }
    if (!content || json_is_null(content)) return 0;
    if (!json_is_array(content)) return qmix_errf(c->err, "Unexpected content type.");
    for (size_t i = 0; i < json_array_size(content); i++) {
        const json_t *item = json_array_get(content, i);
        int has_image = py_in(item, "image"), has_video, has_text;
        if (has_image < 0)
            return qmix_errf(c->err, "content part %zu: %s is not a part (a TypeError in the "
                                     "template's `in` test)",
                             i, json_is_null(item) ? "null" : "a scalar");
        if (has_image || py_in(item, "image_url") || str_eq(field(item, "type"), "image")) {
            if (is_system) return qmix_errf(c->err, "System message cannot contain images.");
            if (do_vision_count) c->image_count++;
            if (c->opts->add_vision_id) {
                char buf[64];
                snprintf(buf, sizeof buf, "Picture %d: ", c->image_count);
                sb_puts(out, buf);
            }
            sb_puts(out, "<|vision_start|><|image_pad|><|vision_end|>");
        } else if ((has_video = py_in(item, "video")) || str_eq(field(item, "type"), "video")) {
            if (is_system) return qmix_errf(c->err, "System message cannot contain videos.");
            if (do_vision_count) c->video_count++;
            if (c->opts->add_vision_id) {
                char buf[64];
                snprintf(buf, sizeof buf, "Video %d: ", c->video_count);
                sb_puts(out, buf);
            }
            sb_puts(out, "<|vision_start|><|video_pad|><|vision_end|>");
        } else if ((has_text = py_in(item, "text"))) {
            /* {{- item.text }}: str() of the value; undefined (a string or list part) renders "" */
            const json_t *t = field(item, "text");
            if (json_is_object(t) || json_is_array(t))
                return qmix_errf(c->err, "content part %zu: a text that is a JSON %s is not "
                                         "supported", i, json_is_object(t) ? "object" : "array");
            if (t) py_str_scalar(out, t);
        } else {
            return qmix_errf(c->err, "Unexpected item type in content.");
        }
    }
    return 0;
}

/* render_content(...)|trim into a fresh buffer; *v views it. */
static int content_trimmed(render_ctx *c, const json_t *content, int do_vision_count, int is_system,
                           sb *buf, view *v)
{
    buf->n = 0;
    if (render_content(c, content, do_vision_count, is_system, buf)) return -1;
    view whole = {buf->p ? buf->p : "", buf->n};
    *v = py_strip(whole);
    return 0;
}

static int render_tools_header(render_ctx *c, const json_t *messages, const json_t *tools, sb *out)
{
    sb_puts(out, "<|im_start|>system\n");
    sb_puts(out, "# Tools\n\nYou have access to the following functions:\n\n<tools>");
    for (size_t i = 0; i < json_array_size(tools); i++) {
        sb_puts(out, "\n");
        if (json_dump(out, json_array_get(tools, i), 0))
            return qmix_errf(c->err, "tools[%zu] cannot be written as JSON", i);
    }
    sb_puts(out, "\n</tools>");
    sb_puts(out,
            "\n\nIf you choose to call a function ONLY reply in the following format with NO "
            "suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_"
            "parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the "
            "value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</"
            "function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the "
            "specified format: an inner <function=...></function> block must be nested within "
            "<tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may "
            "provide optional reasoning for your function call in natural language BEFORE the "
            "function call, but NOT after\n- If there is no function call available, answer the "
            "question like normal with your current knowledge and do not tell the user about "
            "function calls\n</IMPORTANT>");
    const json_t *first = json_array_get(messages, 0);
    if (str_eq(field(first, "role"), "system")) {
        sb buf = {0};
        view v;
        if (content_trimmed(c, field(first, "content"), 0, 1, &buf, &v)) {
            free(buf.p);
            return -1;
        }
        if (v.n) {
            sb_puts(out, "\n\n");
            sb_put(out, v.p, v.n);
        }
        free(buf.p);
    }
    sb_puts(out, "<|im_end|>\n");
    return 0;
}

/* One assistant tool call: `tool_call.function` if defined, its name and arguments. */
static int render_tool_call(render_ctx *c, size_t msg_i, size_t call_i, const json_t *call,
                            view content, sb *out)
{
    const json_t *fn = field(call, "function");
    if (fn) call = fn;
    const json_t *name = field(call, "name");
    if (!json_is_string(name))
        return qmix_errf(c->err, "messages[%zu].tool_calls[%zu]: the function name is %s", msg_i,
                         call_i, name ? "not a string" : "missing");
    if (call_i == 0)
        sb_puts(out, py_strip(content).n ? "\n\n<tool_call>\n<function="
                                         : "<tool_call>\n<function=");
    else
        sb_puts(out, "\n<tool_call>\n<function=");
    sb_put(out, json_string_value(name), json_string_length(name));
    sb_puts(out, ">\n");
    const json_t *args = field(call, "arguments");
    json_t *parsed = NULL;
    if (args) {
        /* vLLM's convention: a JSON-string argument object is parsed; null or "" means {}. */
        if (json_is_null(args) || (json_is_string(args) && json_string_length(args) == 0)) {
            args = parsed = json_object();
        } else if (json_is_string(args)) {
            json_error_t jerr;
            parsed = json_loadb(json_string_value(args), json_string_length(args), JSON_DECODE_ANY,
                                &jerr);
            if (!parsed)
                return qmix_errf(c->err, "messages[%zu].tool_calls[%zu]: arguments are not valid "
                                         "JSON: %s", msg_i, call_i, jerr.text);
            args = parsed;
        }
        if (!json_is_object(args)) {
            json_decref(parsed);
            return qmix_errf(c->err, "Can only get item pairs from a mapping.");
        }
        const char *key;
        size_t klen;
        json_t *val;
        void *tmp;
        json_object_keylen_foreach_safe((json_t *)args, tmp, key, klen, val)
        {
            sb_puts(out, "<parameter=");
            sb_put(out, key, klen);
            sb_puts(out, ">\n");
            if (json_is_object(val) || json_is_array(val)) {
                if (json_dump(out, val, 0)) {
                    json_decref(parsed);
                    return qmix_errf(c->err, "messages[%zu].tool_calls[%zu]: argument too deep",
                                     msg_i, call_i);
                }
            } else {
                py_str_scalar(out, val);
            }
            sb_puts(out, "\n</parameter>\n");
        }
        json_decref(parsed);
    }
    sb_puts(out, "</function>\n</tool_call>");
    return 0;
}

static int render_assistant(render_ctx *c, const json_t *msg, size_t i, size_t last_query,
                            view content, sb *out)
{
    view reasoning = {"", 0};
    const json_t *rc = field(msg, "reasoning_content");
    if (json_is_string(rc)) {
        reasoning.p = json_string_value(rc);
        reasoning.n = json_string_length(rc);
    } else if (find(content, "</think>")) {
        /* content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') */
        view head = {content.p, (size_t)(find(content, "</think>") - content.p)};
        head = rstrip_nl(head);
        const char *open = find_last(head, "<think>");
        if (open) {
            size_t skip = (size_t)(open - head.p) + strlen("<think>");
            head.p += skip;
            head.n -= skip;
        }
        reasoning = lstrip_nl(head);
        /* content.split('</think>')[-1].lstrip('\n') */
        const char *close = find_last(content, "</think>");
        size_t skip = (size_t)(close - content.p) + strlen("</think>");
        content.p += skip;
        content.n -= skip;
        content = lstrip_nl(content);
    }
    reasoning = py_strip(reasoning);
    if (i > last_query) {
        sb_puts(out, "<|im_start|>assistant\n<think>\n");
        sb_put(out, reasoning.p, reasoning.n);
        sb_puts(out, "\n</think>\n\n");
    } else {
        sb_puts(out, "<|im_start|>assistant\n");
    }
    sb_put(out, content.p, content.n);
    const json_t *calls = field(msg, "tool_calls");
    /* message.tool_calls and ... is iterable and ... is not mapping */
    if (json_is_array(calls)) {
        for (size_t k = 0; k < json_array_size(calls); k++)
            if (render_tool_call(c, i, k, json_array_get(calls, k), content, out)) return -1;
    } else if (json_is_string(calls) && json_string_length(calls)) {
        return qmix_errf(c->err, "messages[%zu].tool_calls is a string, not a list", i);
    }
    sb_puts(out, "<|im_end|>\n");
    return 0;
}

int qmix_chat_render(const json_t *messages, const json_t *tools, const qmix_chat_opts *opts,
                     char **out, size_t *out_len, qmix_err *err)
{
    *out = NULL;
    qmix_chat_opts defaults;
    if (!opts) {
        qmix_chat_opts_default(&defaults);
        opts = &defaults;
    }
    if (!json_is_array(messages)) {
        if (!messages || json_is_null(messages)) return qmix_errf(err, "No messages provided.");
        return qmix_errf(err, "messages must be a JSON array");
    }
    size_t n = json_array_size(messages);
    if (n == 0) return qmix_errf(err, "No messages provided.");
    render_ctx c = {.opts = opts, .err = err};
    sb o = {0}, buf = {0};
    view v;

    /* {%- if tools and tools is iterable and tools is not mapping %} */
    if (json_is_string(tools) && json_string_length(tools))
        return qmix_errf(err, "tools is a string, not a list");
    const json_t *first = json_array_get(messages, 0);
    if (json_is_array(tools) && json_array_size(tools)) {
        if (render_tools_header(&c, messages, tools, &o)) goto fail;
    } else if (str_eq(field(first, "role"), "system")) {
        if (content_trimmed(&c, field(first, "content"), 0, 1, &buf, &v)) goto fail;
        sb_puts(&o, "<|im_start|>system\n");
        sb_put(&o, v.p, v.n);
        sb_puts(&o, "<|im_end|>\n");
    }

    /* The last user message that is not only a <tool_response>…</tool_response>. */
    int multi_step_tool = 1;
    size_t last_query = n - 1;
    for (size_t k = n; k-- > 0;) {
        const json_t *m = json_array_get(messages, k);
        if (!str_eq(field(m, "role"), "user")) continue;
        if (content_trimmed(&c, field(m, "content"), 0, 0, &buf, &v)) goto fail;
        if (!(starts_with(v, "<tool_response>") && ends_with(v, "</tool_response>"))) {
            multi_step_tool = 0;
            last_query = k;
            break;
        }
    }
    if (multi_step_tool) {
        qmix_errf(err, "No user query found in messages.");
        goto fail;
    }

    for (size_t i = 0; i < n; i++) {
        const json_t *m = json_array_get(messages, i);
        const json_t *role = field(m, "role");
        if (content_trimmed(&c, field(m, "content"), 1, 0, &buf, &v)) goto fail;
        if (str_eq(role, "system")) {
            if (i != 0) {
                qmix_errf(err, "System message must be at the beginning.");
                goto fail;
            }
        } else if (str_eq(role, "user")) {
            sb_puts(&o, "<|im_start|>user\n");
            sb_put(&o, v.p, v.n);
            sb_puts(&o, "<|im_end|>\n");
        } else if (str_eq(role, "assistant")) {
            if (render_assistant(&c, m, i, last_query, v, &o)) goto fail;
        } else if (str_eq(role, "tool")) {
            /* loop.previtem is falsy for the first message (and for an empty object) */
            const json_t *prev = i ? json_array_get(messages, i - 1) : NULL;
            int prev_truthy = prev && !json_is_null(prev) && !json_is_false(prev) &&
                              !(json_is_object(prev) && json_object_size(prev) == 0) &&
                              !(json_is_array(prev) && json_array_size(prev) == 0) &&
                              !(json_is_string(prev) && json_string_length(prev) == 0);
            if (prev_truthy && !str_eq(field(prev, "role"), "tool"))
                sb_puts(&o, "<|im_start|>user");
            sb_puts(&o, "\n<tool_response>\n");
            sb_put(&o, v.p, v.n);
            sb_puts(&o, "\n</tool_response>");
            if (i + 1 == n || !str_eq(field(json_array_get(messages, i + 1), "role"), "tool"))
                sb_puts(&o, "<|im_end|>\n");
        } else {
            qmix_errf(err, "Unexpected message role.");
            goto fail;
        }
    }
    if (opts->add_generation_prompt) {
        sb_puts(&o, "<|im_start|>assistant\n");
        sb_puts(&o, opts->enable_thinking ? "<think>\n" : "<think>\n\n</think>\n\n");
    }
    free(buf.p);
    if (o.oom || buf.oom) {
        free(o.p);
        return qmix_errf(err, "out of memory rendering the chat template");
    }
    return sb_take(&o, out, out_len);
fail:
    if (o.oom || buf.oom) qmix_errf(err, "out of memory rendering the chat template");
    free(o.p);
    free(buf.p);
    return -1;
}

void qmix_chat_opts_default(qmix_chat_opts *opts)
{
    opts->add_generation_prompt = true;
    opts->enable_thinking = true;
    opts->add_vision_id = false;
}

bool qmix_chat_template_is_qwen35(const char *text, size_t len)
{
    return len == qmix_chat_qwen35_template_len && !memcmp(text, qmix_chat_qwen35_template, len);
}

#define TEMPLATE_MAX (16u << 20)

int qmix_chat_template_load(const char *model_dir, bool with_tools, char **text, size_t *len,
                            char *source, size_t source_len, qmix_err *err)
{
    *text = NULL;
    size_t dlen = strlen(model_dir);
    if (dlen > 5 && !strcmp(model_dir + dlen - 5, ".gguf")) { /* the template travels in the GGUF */
        if (source) snprintf(source, source_len, "%s:tokenizer.chat_template", model_dir);
        return qmix_gguf_chat_template(model_dir, text, len, err);
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/chat_template.jinja", model_dir);
    FILE *probe = fopen(path, "rb");
    if (probe) {
        fclose(probe);
        if (source) snprintf(source, source_len, "%s", path);
        return qmix_read_file(path, TEMPLATE_MAX, text, len, err);
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir);
    json_error_t jerr;
    json_t *cfg = json_load_file(path, 0, &jerr);
    if (!cfg) {
        if (jerr.line == -1 && errno == ENOENT)
            return qmix_errf(err, "%s: no chat_template.jinja and no tokenizer_config.json",
                             model_dir);
        return qmix_errf(err, "%s: %s (line %d)", path, jerr.text, jerr.line);
    }
    const json_t *t = json_object_get(cfg, "chat_template");
    if (json_is_array(t)) {
        const json_t *def = NULL, *tool_use = NULL;
        for (size_t i = 0; i < json_array_size(t); i++) {
            const json_t *e = json_array_get(t, i), *name = json_object_get(e, "name");
            if (str_eq(name, "default")) def = json_object_get(e, "template");
            if (str_eq(name, "tool_use")) tool_use = json_object_get(e, "template");
        }
        t = with_tools && tool_use ? tool_use : def;
    }
    if (!json_is_string(t)) {
        json_decref(cfg);
        return qmix_errf(err, "%s: no chat_template.jinja, and tokenizer_config.json has no "
                              "chat_template", model_dir);
    }
    size_t n = json_string_length(t);
    *text = malloc(n + 1);
    if (!*text) {
        json_decref(cfg);
        return qmix_errf(err, "out of memory");
    }
    memcpy(*text, json_string_value(t), n);
    (*text)[n] = 0;
    if (len) *len = n;
    if (source) snprintf(source, source_len, "%s (chat_template)", path);
    json_decref(cfg);
    return 0;
}

/* Encodes a rendered conversation with special-token strings recognised in the template's text
 * but not inside what users and tools wrote: each user/tool message's text is found in the
 * rendered prompt (in order, as the template wrote it, whitespace-trimmed) and encoded as plain
 * text. Its neighbours ("\n" before, <|im_end|> after) are token boundaries either way, so the
 * pieces concatenate to what one encode would give where no special-token string occurs. */
int qmix_chat_encode(qmix_tokenizer *tok, const char *text, size_t len,
                               const json_t *messages, int32_t **ids, size_t *n_ids, qmix_err *err)
{
    size_t n = 0, cap = 256, at = 0;
    int32_t *out = malloc(cap * sizeof *out);
    const json_t *msg;
    int rc = out ? 0 : qmix_errf(err, "out of memory");
    for (size_t m = 0; m <= json_array_size(messages) && !rc; m++) {
        const char *content = NULL;
        size_t clen = 0;
        msg = json_array_get(messages, m);
        const char *role = json_string_value(json_object_get(msg, "role"));
        json_t *c = json_object_get(msg, "content");
        if (role && (!strcmp(role, "user") || !strcmp(role, "tool")) && json_is_string(c)) {
            content = json_string_value(c);
            clen = json_string_length(c);
            while (clen && strchr(" \t\r\n", content[0])) content++, clen--;
            while (clen && strchr(" \t\r\n", content[clen - 1])) clen--;
        }
        const char *found = NULL;
        if (clen)
            found = memmem(text + at, len - at, content, clen);
        size_t upto = m == json_array_size(messages) ? len : found ? (size_t)(found - text) : at;
        /* template text up to the content, specials allowed; then the content, plain */
        for (int piece = 0; piece < 2 && !rc; piece++) {
            size_t from = piece ? upto : at, to = piece ? (found ? upto + clen : upto) : upto;
            if (to <= from) continue;
            int32_t *part;
            size_t np;
            if (qmix_tok_encode(tok, text + from, to - from, !piece, &part, &np, err)) {
                rc = -1;
                break;
            }
            if (n + np > cap) {
                while (n + np > cap) cap *= 2;
                int32_t *grown = realloc(out, cap * sizeof *out);
                if (!grown) {
                    free(part);
                    rc = qmix_errf(err, "out of memory");
                    break;
                }
                out = grown;
            }
            if (np) memcpy(out + n, part, np * sizeof *out);
            n += np;
            free(part);
        }
        at = found ? upto + clen : upto;
    }
    if (rc) {
        free(out);
        return -1;
    }
    *ids = out;
    *n_ids = n;
    return 0;
}

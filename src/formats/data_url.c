/* data: URLs (RFC 2397), base64 payloads only: what image_url parts carry inline. */
#include "formats/data_url.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util/err.h"

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62; /* standard and URL-safe alphabets */
    if (c == '/' || c == '_') return 63;
    return -1;
}

int qmix_data_url_decode(const char *url, size_t len, uint8_t **data, size_t *out_len,
                         qmix_err *err)
{
    *data = NULL;
    *out_len = 0;
    if (len < 5 || strncasecmp(url, "data:", 5))
        return qmix_errf(err, "not a data: URL");
    const char *comma = memchr(url, ',', len);
    if (!comma) return qmix_errf(err, "malformed data: URL (no ',' before the payload)");
    size_t meta_len = (size_t)(comma - url) - 5;
    const char *meta = url + 5;
    if (meta_len < 7 || strncasecmp(meta + meta_len - 7, ";base64", 7))
        return qmix_errf(err, "data: URL must be base64-encoded (data:image/png;base64,...)");
    const char *p = comma + 1, *end = url + len;
    uint8_t *out = malloc((size_t)(end - p) / 4 * 3 + 3);
    if (!out) return qmix_errf(err, "out of memory decoding a data: URL of %zu bytes", len);
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    size_t n = 0;
    for (; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64_value(c);
        if (v < 0 || pad) {
            free(out);
            return qmix_errf(err, "malformed data: URL: invalid base64 at byte %zu",
                             (size_t)(p - url));
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (uint8_t)(acc >> bits);
        }
    }
    if (pad > 2 || bits >= 6) {
        free(out);
        return qmix_errf(err, "malformed data: URL: truncated base64");
    }
    if (!n) {
        free(out);
        return qmix_errf(err, "data: URL has an empty payload");
    }
    *data = out;
    *out_len = n;
    return 0;
}

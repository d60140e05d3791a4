/* Small self-contained SVG charts for the measuring commands (kld --plot, sensitivity --plot): a
 * picture of where a quant hurts, viewable in any browser, with no plotting dependency. */
#include "cli/plot.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "util/fileio.h"

#define W 760
#define PAD_L 150
#define PAD_R 30
#define PAD_T 50
#define PAD_B 60

static const char *palette[] = {"#c0392b", "#e67e22", "#f1c40f", "#27ae60", "#2980b9", "#8e44ad"};

/* XML-escapes s into out (labels come from file names and role names). */
static void esc(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

/* Pictures are outputs like any other: written under a temporary name, renamed when complete. */
static FILE *open_svg(qmix_wfile *w, const char *path, int height, const char *title,
                      qmix_err *err)
{
    if (qmix_wfile_open(w, path, err)) return NULL;
    FILE *f = w->f;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
               "<text x=\"%d\" y=\"24\" font-size=\"15\" font-weight=\"bold\">", W, height, PAD_L);
    esc(f, title);
    fputs("</text>\n", f);
    return f;
}

static int close_svg(qmix_wfile *w, qmix_err *err)
{
    fputs("</svg>\n", w->f);
    return qmix_wfile_commit(w, err);
}

int cli_plot_kld_histogram(const char *path, const char *title, const double *kld, int64_t n,
                            double median, double p99, qmix_err *err)
{
    enum { BINS = 48 };
    const int h = 360, plot_h = h - PAD_T - PAD_B, plot_w = W - PAD_L - PAD_R;
    /* log10 KLD over the decades the values span (1e-6 at the lowest) */
    double lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++)
        if (kld[i] > 1e-6) {
            if (log10(kld[i]) > hi) hi = ceil(log10(kld[i]));
            if (log10(kld[i]) < lo) lo = floor(log10(kld[i]));
        }
    if (lo > hi - 2) lo = hi - 2;
    int64_t count[BINS] = {0}, zero = 0, max_count = 1;
    for (int64_t i = 0; i < n; i++) {
        if (!(kld[i] > 1e-6)) {
            zero++;
            continue;
        }
        int b = (int)((log10(kld[i]) - lo) / (hi - lo) * BINS);
        if (b >= BINS) b = BINS - 1;
        if (b < 0) b = 0;
        if (++count[b] > max_count) max_count = count[b];
    }
    qmix_wfile w;
    FILE *f = open_svg(&w, path, h, title, err);
    if (!f) return -1;
    fprintf(f, "<text x=\"%d\" y=\"40\" fill=\"#555\">%lld tokens; %lld with KLD below 1e-6 "
               "not drawn</text>\n", PAD_L, (long long)n, (long long)zero);
    double bw = (double)plot_w / BINS;
    for (int b = 0; b < BINS; b++) {
        double bh = (double)count[b] / (double)max_count * plot_h;
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#2980b9\"/>\n",
                PAD_L + b * bw, PAD_T + plot_h - bh, bw - 1, bh);
    }
    /* axes: decades on x, token counts on y */
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", PAD_L,
            PAD_T + plot_h, W - PAD_R, PAD_T + plot_h);
    for (int d = (int)lo; d <= (int)hi; d++) {
        double x = PAD_L + (d - lo) / (hi - lo) * plot_w;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"black\"/>"
                   "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">1e%d</text>\n",
                x, PAD_T + plot_h, x, PAD_T + plot_h + 5, x, PAD_T + plot_h + 18, d);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">per-token KL divergence (log scale)"
               "</text>\n", PAD_L + plot_w / 2, h - 12);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%lld</text>"
               "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">tokens</text>\n",
            PAD_L - 6, PAD_T + 4, (long long)max_count, PAD_L - 6, PAD_T + plot_h);
    const struct { double v; const char *name, *color; } marks[] = {
        {median, "median", "#27ae60"}, {p99, "p99", "#c0392b"}};
    for (int m = 0; m < 2; m++) {
        if (!(marks[m].v > 0)) continue;
        double x = PAD_L + (log10(marks[m].v) - lo) / (hi - lo) * plot_w;
        if (x < PAD_L) x = PAD_L;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"%s\" "
                   "stroke-dasharray=\"4 3\"/><text x=\"%.1f\" y=\"%d\" fill=\"%s\">%s %.2g</text>\n",
                x, PAD_T, x, PAD_T + plot_h, marks[m].color, x + 3, PAD_T + 12 + 14 * m,
                marks[m].color, marks[m].name, marks[m].v);
    }
    return close_svg(&w, err);
}

int cli_plot_bars(const char *path, const char *title, const char *x_label,
                   const char *const *rows, int n_rows, const char *const *series, int n_series,
                   const double *values, qmix_err *err)
{
    if (n_series > (int)(sizeof palette / sizeof palette[0]))
        return qmix_errf(err, "at most %d series in a bar chart",
                         (int)(sizeof palette / sizeof palette[0]));
    const int bar = 9, gap = 8, row_h = n_series * bar + gap;
    const int plot_h = n_rows * row_h, h = PAD_T + plot_h + PAD_B, plot_w = W - PAD_L - PAD_R;
    /* log scale: KLDs span decades between roles */
    double vmax = 0, vmin = INFINITY;
    for (int i = 0; i < n_rows * n_series; i++)
        if (values[i] > 0) {
            if (values[i] > vmax) vmax = values[i];
            if (values[i] < vmin) vmin = values[i];
        }
    double hi = vmax > 0 ? ceil(log10(vmax)) : 0, lo = vmax > 0 ? floor(log10(vmin)) : -1;
    if (hi - lo < 1) lo = hi - 1;
    qmix_wfile w;
    FILE *f = open_svg(&w, path, h, title, err);
    if (!f) return -1;
    for (int r = 0; r < n_rows; r++) {
        int y0 = PAD_T + r * row_h;
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">", PAD_L - 6, y0 + row_h / 2 + 2);
        esc(f, rows[r]);
        fputs("</text>\n", f);
        for (int s = 0; s < n_series; s++) {
            double v = values[r * n_series + s];
            double wv = v > 0 ? (log10(v) - lo) / (hi - lo) * plot_w : 0;
            if (wv < 1 && v > 0) wv = 1;
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"%s\">"
                       "<title>%.3g</title></rect>\n",
                    PAD_L, y0 + s * bar, wv, bar - 1, palette[s], v);
        }
    }
    int axis_y = PAD_T + plot_h;
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", PAD_L, axis_y,
            W - PAD_R, axis_y);
    for (int d = (int)lo; d <= (int)hi; d++) {
        double x = PAD_L + (d - lo) / (hi - lo) * plot_w;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ccc\"/>"
                   "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">1e%d</text>\n",
                x, PAD_T, x, axis_y, x, axis_y + 16, d);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">", PAD_L + plot_w / 2, axis_y + 34);
    esc(f, x_label);
    fputs("</text>\n", f);
    for (int s = 0; s < n_series; s++) {
        int x = PAD_L + s * 90;
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"%s\"/>"
                   "<text x=\"%d\" y=\"%d\">", x, h - 18, palette[s], x + 16, h - 8);
        esc(f, series[s]);
        fputs("</text>\n", f);
    }
    return close_svg(&w, err);
}

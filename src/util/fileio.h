#ifndef QMIX_UTIL_FILEIO_H
#define QMIX_UTIL_FILEIO_H

#include <stddef.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>

#include "qmix.h"

/* Reads a whole (small) file into a NUL-terminated malloc'd buffer; refuses files over max_bytes. */
int qmix_read_file(const char *path, size_t max_bytes, char **out, size_t *len, qmix_err *err);

/* Maps a whole regular, non-empty file read-only (the descriptor is closed again: the mapping
 * outlives it). *map is NULL on failure; release with qmix_unmap_file. */
int qmix_map_file(const char *path, const uint8_t **map, uint64_t *size, qmix_err *err);
void qmix_unmap_file(const uint8_t *map, uint64_t size);

/* ---- writing outputs so that a crash, a kill or a full disk never leaves half of one behind.
 *
 * A file is written under a temporary name beside its final path and renamed over it once
 * complete (flushed, fsynced): the final path holds the old file or the whole new one. A path
 * that exists and is not a regular file (/dev/stdout, a pipe) is written in place. */

/* Opens the file that becomes path: returns a descriptor, *tmp the malloc'd temporary name (NULL
 * when written in place). Errors name path and errno. */
int qmix_out_open(const char *path, char **tmp, qmix_err *err);
/* Makes the output final: fsync, close, rename tmp to path. Closes fd and frees tmp either way;
 * on failure the temporary is removed. */
int qmix_out_commit(int fd, char *tmp, const char *path, qmix_err *err);
/* Abandons it: closes fd, removes and frees tmp. */
void qmix_out_abandon(int fd, char *tmp);

/* The same with stdio (fseek works; f has no descriptor of its own: use fd). */
typedef struct qmix_wfile {
    FILE *f;
    int fd;
    char *path, *tmp;
    struct qmix_wsink *sink; /* keeps the errno of a failed write */
} qmix_wfile;
int qmix_wfile_open(qmix_wfile *w, const char *path, qmix_err *err);
/* Checks the stream for write errors, then commits; the error names errno (ENOSPC, EFBIG). */
int qmix_wfile_commit(qmix_wfile *w, qmix_err *err);
void qmix_wfile_abandon(qmix_wfile *w);

/* A whole file from memory, a JSON document (json_dumpf flags), a copy of a file. */
int qmix_write_file(const char *path, const void *data, size_t len, qmix_err *err);
int qmix_write_json(const char *path, const json_t *v, size_t flags, qmix_err *err);
/* missing_ok: an absent source is not an error (nothing is written). */
int qmix_copy_file(const char *from, const char *to, int missing_ok, qmix_err *err);

/* A directory output is built in a sibling directory, OUT.partial-PID, and moved to OUT when
 * complete: OUT never holds half a model. A run killed part-way leaves only the .partial
 * directory (without config.json where the writer writes it last). Into an existing non-empty OUT
 * (a --force run) the files are moved one by one after OUT/config.json is removed, config.json
 * last. */
typedef struct qmix_outdir {
    char *final, *work; /* work: where the writer writes */
} qmix_outdir;
int qmix_outdir_begin(qmix_outdir *d, const char *final, qmix_err *err);
int qmix_outdir_commit(qmix_outdir *d, qmix_err *err);
/* Removes the work directory and everything in it; safe after a commit or on a zeroed d. */
void qmix_outdir_abandon(qmix_outdir *d);
/* rm -rf, for the writers' failure paths. */
int qmix_remove_tree(const char *path);

#endif

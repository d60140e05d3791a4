#ifndef QMIX_UTIL_FILEIO_H
#define QMIX_UTIL_FILEIO_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* Reads a whole (small) file into a NUL-terminated malloc'd buffer; refuses files over max_bytes. */
int qmix_read_file(const char *path, size_t max_bytes, char **out, size_t *len, qmix_err *err);

/* Maps a whole regular, non-empty file read-only (the descriptor is closed again: the mapping
 * outlives it). *map is NULL on failure; release with qmix_unmap_file. */
int qmix_map_file(const char *path, const uint8_t **map, uint64_t *size, qmix_err *err);
void qmix_unmap_file(const uint8_t *map, uint64_t size);

#endif

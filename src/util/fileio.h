#ifndef QMIX_UTIL_FILEIO_H
#define QMIX_UTIL_FILEIO_H

#include <stddef.h>

#include "qmix.h"

/* Reads a whole (small) file into a NUL-terminated malloc'd buffer; refuses files over max_bytes. */
int qmix_read_file(const char *path, size_t max_bytes, char **out, size_t *len, qmix_err *err);

#endif

/* Errors travel up as a message in a caller-owned buffer; nothing deep inside prints. */
#ifndef QMIX_UTIL_ERR_H
#define QMIX_UTIL_ERR_H

#include "qmix.h"

/* Formats into err (if non-NULL) and returns -1 so callers can `return qmix_errf(...)`. */
int qmix_errf(qmix_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends context ("loading X: ") to an existing message; returns -1. */
int qmix_err_prefix(qmix_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif

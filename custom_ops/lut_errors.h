/* lut_errors.h: the kernels' one error helper (lutkernel.c, spnkernel.c), not part of any API. */
#ifndef LUT_ERRORS_H
#define LUT_ERRORS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

/* Format the message into err[errlen] (when given) and return `code`. */
static inline int set_err(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static inline int set_err(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

#endif /* LUT_ERRORS_H */

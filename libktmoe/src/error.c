/* Error reporting: status codes plus a thread-local message. */
#include "internal.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define KT_MSG_MAX 512

static _Thread_local char kt_msg[KT_MSG_MAX];

ktmoe_status kt_error(ktmoe_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(kt_msg, sizeof kt_msg, fmt, ap);
    va_end(ap);
    return st;
}

void kt_error_set_message(ktmoe_status st, const char *msg) {
    KT_UNUSED(st);
    snprintf(kt_msg, sizeof kt_msg, "%s", msg ? msg : "");
}

void kt_error_clear(void) { kt_msg[0] = '\0'; }

void kt_error_copy(char *buf, size_t size) {
    if (size) snprintf(buf, size, "%s", kt_msg);
}

KTMOE_API const char *ktmoe_last_error(void) { return kt_msg; }

KTMOE_API const char *ktmoe_status_name(ktmoe_status st) {
    switch (st) {
    case KTMOE_OK: return "KTMOE_OK";
    case KTMOE_ERR_INVALID_ARGUMENT: return "KTMOE_ERR_INVALID_ARGUMENT";
    case KTMOE_ERR_OUT_OF_MEMORY: return "KTMOE_ERR_OUT_OF_MEMORY";
    case KTMOE_ERR_UNSUPPORTED: return "KTMOE_ERR_UNSUPPORTED";
    case KTMOE_ERR_STATE: return "KTMOE_ERR_STATE";
    case KTMOE_ERR_INTERNAL: return "KTMOE_ERR_INTERNAL";
    case KTMOE_ERR_IO: return "KTMOE_ERR_IO";
    }
    return "KTMOE_ERR_UNKNOWN";
}

KTMOE_API const char *ktmoe_version(void) { return KTMOE_VERSION_STRING; }
KTMOE_API int32_t ktmoe_abi_version(void) { return KTMOE_ABI_VERSION; }

/* ---- memory ---- */

/* Allocations of KT_HUGE_MIN bytes or more (the expert weights, the
 * activation caches) are aligned to 2 MiB and advised as transparent huge
 * pages: the kernels stream them with rows 3-8 KB apart, and 4 KB pages
 * cost a TLB miss every few rows (Linux's default THP mode "madvise" maps
 * huge pages only where asked).  KTMOE_HUGEPAGES=0 turns the advice off. */
#define KT_HUGE_PAGE ((size_t)2 << 20)
#define KT_HUGE_MIN ((size_t)4 << 20)

static int kt_hugepages_wanted(void) {
    static atomic_int wanted = -1;
    int w = atomic_load_explicit(&wanted, memory_order_relaxed);
    if (w < 0) {
        const char *e = getenv("KTMOE_HUGEPAGES");
        w = !(e && e[0] == '0' && e[1] == '\0');
        atomic_store_explicit(&wanted, w, memory_order_relaxed);
    }
    return w;
}

void *kt_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    size_t align = 64;
    int huge = bytes >= KT_HUGE_MIN && kt_hugepages_wanted();
    if (huge) {
        align = KT_HUGE_PAGE;
        bytes = (bytes + KT_HUGE_PAGE - 1) & ~(KT_HUGE_PAGE - 1);
    } else {
        bytes = (bytes + 63) & ~(size_t)63;
    }
    if (posix_memalign(&p, align, bytes) != 0) {
        kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes",
                 bytes);
        return NULL;
    }
#if defined(MADV_HUGEPAGE)
    if (huge) (void)madvise(p, bytes, MADV_HUGEPAGE); /* advice only: failure is harmless */
#endif
    return p;
}

void kt_free(void *p) { free(p); }

ktmoe_status kt_buf_reserve(kt_buf *b, size_t bytes) {
    if (b->bytes >= bytes && b->p) return KTMOE_OK;
    void *p = kt_alloc(bytes);
    if (!p) return KTMOE_ERR_OUT_OF_MEMORY;
    kt_free(b->p);
    b->p = p;
    b->bytes = bytes;
    return KTMOE_OK;
}

void kt_buf_free(kt_buf *b) {
    kt_free(b->p);
    b->p = NULL;
    b->bytes = 0;
}

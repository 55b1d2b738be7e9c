/* CPU feature detection (CPUID and OS state) and NUMA topology. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KT_X86 1
#endif

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if KT_X86
static uint64_t kt_xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Linux keeps AMX tile data off until a process asks for it. */
static int kt_amx_request_permission(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    const long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023;
    const long XFEATURE_XTILEDATA = 18;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0) return 0;
    return (bitmask & (1ul << XFEATURE_XTILEDATA)) != 0;
#else
    return 0;
#endif
}

static uint32_t kt_detect(void) {
    unsigned a, b, c, d;
    uint32_t f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1,
        avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = kt_xgetbv0();
    int os_avx = (xcr0 & 0x6) == 0x6;                 /* XMM | YMM         */
    int os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  /* opmask, ZMM hi/lo */
    int os_amx = (xcr0 & 0x60000) == 0x60000;         /* XTILECFG, XTILEDATA */
    if (!os_avx) return 0;
    unsigned max = __get_cpuid_max(0, NULL);
    if (max < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned b7 = b, c7 = c, d7 = d;
    __cpuid_count(7, 1, a, b, c, d);
    unsigned a71 = a;
    if (fma) f |= KTMOE_CPU_FMA;
    if (f16c) f |= KTMOE_CPU_F16C;
    if ((b7 >> 5) & 1) f |= KTMOE_CPU_AVX2;
    if (os_avx512) {
        if ((b7 >> 16) & 1) f |= KTMOE_CPU_AVX512F;
        if ((b7 >> 30) & 1) f |= KTMOE_CPU_AVX512BW;
        if ((b7 >> 31) & 1) f |= KTMOE_CPU_AVX512VL;
        if ((c7 >> 11) & 1) f |= KTMOE_CPU_AVX512_VNNI;
        if ((a71 >> 5) & 1) f |= KTMOE_CPU_AVX512_BF16;
    }
    if (os_amx && ((d7 >> 24) & 1) && kt_amx_request_permission()) {
        f |= KTMOE_CPU_AMX_TILE;
        if ((d7 >> 22) & 1) f |= KTMOE_CPU_AMX_BF16;
        if ((d7 >> 25) & 1) f |= KTMOE_CPU_AMX_INT8;
    }
    return f;
}

/* 1 on CPUs whose AVX-512 units are 256 bits wide (512-bit operations
 * split in two): AMD family 19h (Zen 4; Zen 3 has no AVX-512).  Zen 5
 * (family 1Ah) and Intel's AVX-512 cores have full-width units. */
static int kt_detect_narrow512(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    int amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u; /* "AuthenticAMD" */
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    unsigned family = (a >> 8) & 0xF;
    if (family == 0xF) family += (a >> 20) & 0xFF;
    return family == 0x19;
}

static void kt_brand(char *out, size_t size) {
    unsigned r[12];
    out[0] = '\0';
    if (__get_cpuid_max(0x80000000u, NULL) < 0x80000004u) return;
    for (unsigned i = 0; i < 3; i++)
        __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2],
                    &r[4 * i + 3]);
    char s[49];
    memcpy(s, r, 48);
    s[48] = '\0';
    const char *p = s;
    while (*p == ' ') p++;
    snprintf(out, size, "%s", p);
    size_t n = strlen(out);
    while (n && out[n - 1] == ' ') out[--n] = '\0';
}
#else
static uint32_t kt_detect(void) { return 0; }
static int kt_detect_narrow512(void) { return 0; }
static void kt_brand(char *out, size_t size) {
    if (size) out[0] = '\0';
}
#endif

#include <pthread.h>
static pthread_once_t kt_cpu_once = PTHREAD_ONCE_INIT;
static uint32_t kt_features;
static int kt_narrow512;
static char kt_brand_str[64];

static void kt_cpu_init(void) {
    kt_features = kt_detect();
    kt_narrow512 = kt_detect_narrow512();
    kt_brand(kt_brand_str, sizeof kt_brand_str);
}

uint32_t kt_cpu_features(void) {
    pthread_once(&kt_cpu_once, kt_cpu_init);
    return kt_features;
}

KTMOE_API uint32_t ktmoe_cpu_features(void) { return kt_cpu_features(); }

int kt_cpu_wide512(void) {
    const char *s = getenv("KTMOE_ZMM"); /* 0 or 1: override, for tests and measurements */
    if (s && (s[0] == '0' || s[0] == '1') && !s[1]) return s[0] == '1';
    pthread_once(&kt_cpu_once, kt_cpu_init);
    return !kt_narrow512;
}

KTMOE_API const char *ktmoe_cpu_name(void) {
    pthread_once(&kt_cpu_once, kt_cpu_init);
    return kt_brand_str;
}

/* ---- NUMA (Linux sysfs; one node elsewhere) ---- */

static int kt_parse_cpulist(const char *s, int *cpus, int max) {
    int n = 0;
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10);
        if (end == s) break;
        long b = a;
        s = end;
        if (*s == '-') {
            b = strtol(s + 1, &end, 10);
            s = end;
        }
        for (long i = a; i <= b; i++) {
            if (n < max) cpus[n] = (int)i;
            n++;
        }
        if (*s == ',') s++;
        else break;
    }
    return n < max ? n : max;
}

int kt_numa_node_cpus(int node, int *cpus, int max) {
    char path[96], line[4096];
    snprintf(path, sizeof path, "/sys/devices/system/node/node%d/cpulist", node);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int n = 0;
    if (fgets(line, sizeof line, f)) n = kt_parse_cpulist(line, cpus, max);
    fclose(f);
    return n;
}

int kt_numa_node_count(void) {
    int count = 0, cpus[1];
    for (int node = 0; node < 1024; node++) {
        char path[96];
        snprintf(path, sizeof path, "/sys/devices/system/node/node%d", node);
        FILE *f = fopen(strcat(path, "/cpulist"), "r");
        if (!f) break;
        fclose(f);
        if (kt_numa_node_cpus(node, cpus, 1) > 0) count++;
    }
    return count > 0 ? count : 1;
}

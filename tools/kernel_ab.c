/* Paired A/B timing of the avx2 tier's kernels: two builds of
 * kernels_avx2.c linked into one program (B's symbols renamed by
 * tools/kernel_ab.sh), timed alternately on the same data, so that a
 * machine whose speed drifts by tens of percent from one minute to the
 * next still gives a usable ratio: the median over pairs of B/A.
 *
 * Shapes: one DeepSeek-V2-Lite layer (H=2048, I=1408), m rows an expert
 * (48 at qlen 512, k=6, E=64), E experts' weights cycled so that they
 * stream from memory as in a layer:
 *   B2      outer(m, 64, H)  gathered dO rows x Wd[:, tile]   (backward dh)
 *   B4      outer(m, 64, I)  dg rows x Wg[:, tile]            (backward dx)
 *   F2      dot_many(m, 256, H)  gathered x rows x Wg[tile]^T (forward)
 *   decode  qdot(1, 256, H)  int8 activations x 4-bit Wg rows (inference)
 * Usage: kernel_ab [experts=8] [m=48] [pairs=20] [bf16|i4s] */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void B_kt_outer_avx2(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                     const int32_t *didx, const kt_wmat *w, const int32_t *widx, float *c,
                     int64_t ldc, int accum);
void B_kt_dot_many_avx2(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                        const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum);
void B_kt_qdot_avx2(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                    const kt_wmat *w, float *c, int64_t ldc);

enum { H = 2048, I = 1408, Q = 512 };

typedef struct side {
    kt_outer_fn outer;
    kt_dot_fn dot_many;
    kt_qdot_fn qdot;
} side;

static int E, M, I4;
static uint16_t *wd, *wg;       /* bf16 [E][H][I], [E][I][H] */
static uint8_t *qd, *qg;        /* 4-bit codes, same shapes   */
static float *sd, *sg;          /* per-row scales             */
static float *dO, *x, *g, *c;
static int8_t *xq;
static float *xd, *xs;
static int32_t tok[Q];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float frand(void) { return (float)rand() / (float)RAND_MAX - 0.5f; }

static int cmp(const void *a, const void *b) {
    double x1 = *(const double *)a, x2 = *(const double *)b;
    return (x1 > x2) - (x1 < x2);
}

/* W of expert e: down (rows H, cols I) or gate (rows I, cols H). */
static kt_wmat weight(int down, int e) {
    if (!I4) return kt_plain(KT_W_BF16, (down ? wd : wg) + (size_t)e * H * I, down ? I : H);
    int64_t cols = down ? I : H, rows = down ? H : I;
    kt_wmat w = {KT_W_I4S, (down ? qd : qg) + (size_t)e * rows * cols / 2, cols / 2,
                 (down ? sd : sg) + (size_t)e * rows, NULL, 1, cols, 0};
    return w;
}

/* GFLOP/s (GB/s of weights for decode) of one pass over E experts. */
static double run(int test, const side *s, int e0) {
    double t0 = now(), work = 0;
    for (int i = 0; i < E; i++) {
        int e = (e0 + i) % E;
        if (test == 0) {
            kt_wmat w = weight(1, e);
            for (int64_t j0 = 0; j0 < I; j0 += 64) {
                kt_wmat t = kt_wsub(&w, 0, j0);
                s->outer(M, 64, H, dO, H, 1, tok, &t, NULL, c, 64, 0);
                work += 2.0 * M * 64 * H;
            }
        } else if (test == 1) {
            kt_wmat w = weight(0, e);
            for (int64_t n0 = 0; n0 < H; n0 += 64) {
                kt_wmat t = kt_wsub(&w, 0, n0);
                s->outer(M, 64, I, g, I, 1, NULL, &t, NULL, c, H, 0);
                work += 2.0 * M * 64 * I;
            }
        } else if (test == 2) {
            kt_wmat w = weight(0, e);
            for (int64_t j0 = 0; j0 < I; j0 += 256) {
                int64_t tn = KT_MIN(256, I - j0);
                kt_wmat t = kt_wsub(&w, j0, 0);
                s->dot_many(M, tn, H, x, H, tok, &t, g, I, 0);
                work += 2.0 * M * tn * H;
            }
        } else {
            kt_wmat w = {KT_W_I4S, qg + (size_t)e * I * H / 2, H / 2, sg + (size_t)e * I, NULL, 1, H, 0};
            kt_qact xa = {xq, xd, xs, H, H / KT_QBLK, 2};
            for (int64_t j0 = 0; j0 < I; j0 += 256) {
                int64_t tn = KT_MIN(256, I - j0);
                kt_wmat t = kt_wsub(&w, j0, 0);
                s->qdot(1, tn, H, &xa, NULL, &t, c + j0, I);
                work += (double)tn * H / 2;
            }
        }
    }
    return work / (now() - t0) / 1e9;
}

int main(int argc, char **argv) {
    E = argc > 1 ? atoi(argv[1]) : 8;
    M = argc > 2 ? atoi(argv[2]) : 48;
    int pairs = argc > 3 ? atoi(argv[3]) : 20;
    I4 = argc > 4 && strcmp(argv[4], "i4s") == 0;
    if (E < 1 || M < 1 || M > Q || pairs < 2 || pairs > 1000) {
        fprintf(stderr, "usage: kernel_ab [experts >= 1] [m 1..%d] [pairs 2..1000] [bf16|i4s]\n", Q);
        return 2;
    }
    size_t nw = (size_t)E * H * I;
    wd = kt_alloc(nw * 2), wg = kt_alloc(nw * 2), qd = kt_alloc(nw / 2), qg = kt_alloc(nw / 2);
    sd = kt_alloc((size_t)E * H * 4), sg = kt_alloc((size_t)E * I * 4);
    dO = kt_alloc((size_t)Q * H * 4), x = kt_alloc((size_t)Q * H * 4);
    g = kt_alloc((size_t)Q * I * 4), c = kt_alloc((size_t)Q * H * 4);
    xq = kt_alloc(H), xd = kt_alloc(H / KT_QBLK * 4), xs = kt_alloc(H / KT_QBLK * 4);
    if (!wd || !wg || !qd || !qg || !sd || !sg || !dO || !x || !g || !c || !xq || !xd || !xs) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < nw; i++) {
        wd[i] = kt_f32_to_bf16(frand());
        wg[i] = kt_f32_to_bf16(frand());
    }
    for (size_t i = 0; i < nw / 2; i++) qd[i] = (uint8_t)rand(), qg[i] = (uint8_t)rand();
    for (size_t i = 0; i < (size_t)E * H; i++) sd[i] = 0.01f;
    for (size_t i = 0; i < (size_t)E * I; i++) sg[i] = 0.01f;
    for (size_t i = 0; i < (size_t)Q * H; i++) dO[i] = frand(), x[i] = frand();
    for (size_t i = 0; i < (size_t)Q * I; i++) g[i] = frand();
    for (int i = 0; i < H; i++) xq[i] = (int8_t)rand();
    for (int i = 0; i < H / KT_QBLK; i++) xd[i] = 0.01f, xs[i] = 1.0f;
    for (int i = 0; i < Q; i++) tok[i] = rand() % Q;

    const side A = {kt_outer_avx2, kt_dot_many_avx2, kt_qdot_avx2};
    const side B = {B_kt_outer_avx2, B_kt_dot_many_avx2, B_kt_qdot_avx2};
    const char *names[4] = {"B2 outer(dO gathered, Wd)", "B4 outer(dg, Wg)", "F2 dot_many(x gathered, Wg)",
                            "decode qdot(1 row, 4-bit Wg)"};
    printf("kernel_ab: E=%d m=%d pairs=%d weights %s; B/A > 1: B faster\n", E, M, pairs, I4 ? "i4s" : "bf16");
    double *r = malloc(sizeof(double) * 3 * (size_t)pairs);
    if (!r) return 1;
    double *ga = r + pairs, *gb = ga + pairs;
    for (int test = 0; test < 4; test++) {
        for (int i = 0; i < pairs; i++) {
            int e0 = (i * 7) % E; /* both sides of a pair read the same experts */
            if (i & 1) {
                gb[i] = run(test, &B, e0);
                ga[i] = run(test, &A, e0 + E / 2);
            } else {
                ga[i] = run(test, &A, e0);
                gb[i] = run(test, &B, e0 + E / 2);
            }
            r[i] = gb[i] / ga[i];
        }
        qsort(r, (size_t)pairs, sizeof *r, cmp);
        qsort(ga, (size_t)pairs, sizeof *ga, cmp);
        qsort(gb, (size_t)pairs, sizeof *gb, cmp);
        const char *unit = test == 3 ? "GB/s" : "GFLOP/s";
        printf("%-30s B/A median %.3f (quartiles %.3f %.3f); A median %.1f best %.1f, B median %.1f best %.1f %s\n",
               names[test], r[pairs / 2], r[pairs / 4], r[3 * pairs / 4], ga[pairs / 2], ga[pairs - 1],
               gb[pairs / 2], gb[pairs - 1], unit);
    }
    free(r);
    return 0;
}

// STREAM-like read bandwidth: THREADS threads each sum (XOR) its own slice of a 1 GiB buffer
// with 64-byte vectors, read as one sequential stream and as 8 streams side by side (as a
// kernel streaming 8 weight panels reads), 9 passes of each, alternating. Prints two figures in
// GB/s (1e9 bytes/s): the median pass of the better way, and the best pass of all. On a shared
// VM passes of one run differ by up to 2x; the median is the ceiling a decode run is compared
// with, the best shows the bursts. Used by perf/llamacpp_compare.sh next to its decode figures, as the ceiling
// a batch-1 decode (which reads every weight once per token) can reach.
// Build: cc -O3 -march=native -pthread perf/readbw.c -o readbw; run: ./readbw THREADS
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (1UL << 30)

static uint64_t *buf;
static size_t words_per_thread;
static volatile uint64_t sink;

typedef uint64_t v8 __attribute__((vector_size(64)));
static int streams;

static void *reader(void *arg) {
  const v8 *p = (const v8 *)(buf + (size_t)arg * words_per_thread);
  size_t lines = words_per_thread / 8;
  v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
  if (streams == 1) {
    for (size_t i = 0; i + 8 <= lines; i += 8) {
      a0 ^= p[i]; a1 ^= p[i + 1]; a2 ^= p[i + 2]; a3 ^= p[i + 3];
      a4 ^= p[i + 4]; a5 ^= p[i + 5]; a6 ^= p[i + 6]; a7 ^= p[i + 7];
    }
  } else {
    size_t n = lines / 8;
    for (size_t i = 0; i < n; i++) {
      a0 ^= p[i]; a1 ^= p[n + i]; a2 ^= p[2 * n + i]; a3 ^= p[3 * n + i];
      a4 ^= p[4 * n + i]; a5 ^= p[5 * n + i]; a6 ^= p[6 * n + i]; a7 ^= p[7 * n + i];
    }
  }
  v8 a = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7;
  sink ^= a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) {
    fprintf(stderr, "readbw: THREADS must be 1-256\n");
    return 2;
  }
  buf = aligned_alloc(64, BYTES);
  if (!buf) {
    fprintf(stderr, "readbw: no memory for 1 GiB\n");
    return 1;
  }
  memset(buf, 1, BYTES);
  words_per_thread = BYTES / 8 / threads / 64 * 64;
  double best = 0, got[2][9];
  pthread_t t[256];
  for (int pass = 0; pass < 18; pass++) {
    streams = pass % 2 ? 8 : 1;
    double t0 = now();
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, reader, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double gbs = (double)words_per_thread * 8 * threads / (now() - t0) / 1e9;
    got[pass % 2][pass / 2] = gbs;
    if (gbs > best) best = gbs;
  }
  double med = 0;
  for (int m = 0; m < 2; m++) {
    qsort(got[m], 9, sizeof(double), cmp);
    if (got[m][4] > med) med = got[m][4];
  }
  printf("%.1f %.1f\n", med, best);
  return 0;
}

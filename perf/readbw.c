// STREAM-like read bandwidth: THREADS threads each sum (XOR) its own slice of a 1 GiB buffer
// with the widest vectors the compiler targets (-march=native), best of 7 passes, printed in
// GB/s (1e9 bytes/s). Used by perf/llamacpp_compare.sh next to its decode figures, as the ceiling
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

static void *reader(void *arg) {
  const uint64_t *p = buf + (size_t)arg * words_per_thread;
  uint64_t acc[8] = {0};
  for (size_t i = 0; i < words_per_thread; i += 8)
    for (int j = 0; j < 8; j++) acc[j] ^= p[i + j];
  sink ^= acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
  return NULL;
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
  words_per_thread = BYTES / 8 / threads / 8 * 8;
  double best = 0;
  pthread_t t[256];
  for (int pass = 0; pass < 7; pass++) {
    double t0 = now();
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, reader, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double gbs = (double)words_per_thread * 8 * threads / (now() - t0) / 1e9;
    if (gbs > best) best = gbs;
  }
  printf("%.1f\n", best);
  return 0;
}

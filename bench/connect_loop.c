/* bench/trace.py --only overhead-c: connect + accept + close (SO_LINGER 0) on loopback, N times, in one
 * thread; prints connections/s. A C loop, because a Python one tops out near 65k/s here and issue
 * 19 asks for the overhead at 200k connect()/s: bench/trace.py runs one per core, each on its own port. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100000, port = argc > 2 ? atoi(argv[2]) : 20000;
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
    struct linger lg = {1, 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (void *)&a, sizeof a)) { perror("connect"); return 1; }
        int s = accept(l, 0, 0);
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(c); close(s);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.0f\n", n / dt);
    return 0;
}

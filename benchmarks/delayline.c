/*
 * delayline: a fixed per-packet delay between two TUN devices, for kernels
 * without the netem qdisc (benchmarks/link100.py runs it in a "router"
 * network namespace of its own).
 *
 * Creates the TUN devices A and B (IFF_TUN | IFF_NO_PI: bare IP packets; they
 * vanish when this process exits) and prints "ready".  Every packet the
 * kernel routes into A is read at once, stamped with CLOCK_MONOTONIC, and
 * written to B (so the kernel receives it on B and routes it on) DELAY_US
 * microseconds later; packets routed into B go to A the same way.  One FIFO
 * per direction (the delay is constant, so FIFO order is due order), bounded
 * to CAP packets: a packet that finds its FIFO full is read and dropped, and
 * counted.  Waits in ppoll() with a nanosecond timeout up to the head of the
 * queues, with a timer slack of 1 ns (the default slack of 50 us would be a
 * quarter of a 200 us delay).  A timed wake-up still comes some microseconds
 * late (more on a virtual machine), so the line keeps a running estimate of
 * the median lateness of its timed wake-ups (+-0.25 us per wake-up, at most
 * a quarter of the delay and 50 us) and asks to be woken that much before
 * the head packet is due; a packet goes out when it is due within that
 * estimate, so on the median it leaves on time.  No rate limit, no
 * reordering, no loss except a full FIFO: the shaping is left to tc on the
 * links either side.
 *
 * Exits on SIGTERM or SIGINT (or when the parent dies: PR_SET_PDEATHSIG) and
 * prints one JSON line of counters per direction: packets and bytes in and
 * out, drops (FIFO full, too large), write errors, the deepest FIFO, and
 * when the packets went out against their due time (mean, max late, how
 * many more than 20 / 100 us late or 20 us early: scheduling delay of this
 * process), with the final wake-up estimate.
 *
 * build: cc -O2 -o delayline delayline.c
 * usage: delayline TUN_A TUN_B DELAY_US [CAP]     (root or CAP_NET_ADMIN; CAP default 4096)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define SLOT 2048           /* > any packet a 1500-byte-MTU TUN device hands us */
#define BATCH 64            /* packets read from one device before looking at the clock again */

struct pkt {
    uint64_t due;
    uint32_t len;
    unsigned char data[SLOT];
};

struct dir {
    const char *name;
    int in, out;
    struct pkt *ring;
    uint32_t cap, head, count, max_depth;
    uint64_t pkts_in, bytes_in, pkts_out, bytes_out, drop_full, drop_big, write_err;
    int64_t late_sum_ns, late_max_ns;
    uint64_t late_20us, late_100us, early_20us;
};

static volatile sig_atomic_t stop;
static uint64_t delay_ns;
static int64_t wake_est_ns, wake_est_cap_ns;    /* median lateness of a timed wake-up, and its bound */
static unsigned char scratch[SLOT];

static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int tun_open(const char *name) {
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/net/tun");
        exit(2);
    }
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    if (strlen(name) >= IFNAMSIZ) {
        fprintf(stderr, "delayline: device name too long: %s\n", name);
        exit(2);
    }
    strcpy(ifr.ifr_name, name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "delayline: TUNSETIFF %s: %s\n", name, strerror(errno));
        exit(2);
    }
    return fd;
}

/* Read what the device has (up to BATCH packets) into the FIFO. Returns -1 on a read error. */
static int ingest(struct dir *d) {
    for (int i = 0; i < BATCH; i++) {
        int full = d->count == d->cap;
        struct pkt *p = full ? NULL : &d->ring[(d->head + d->count) % d->cap];
        ssize_t n = read(d->in, full ? scratch : p->data, SLOT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            fprintf(stderr, "delayline: read %s: %s\n", d->name, strerror(errno));
            return -1;
        }
        d->pkts_in++;
        d->bytes_in += (uint64_t)n;
        if (full) {
            d->drop_full++;
            continue;
        }
        if (n >= SLOT) {            /* may have been cut short: never forward a truncated packet */
            d->drop_big++;
            continue;
        }
        p->len = (uint32_t)n;
        p->due = now_ns() + delay_ns;
        d->count++;
        if (d->count > d->max_depth)
            d->max_depth = d->count;
    }
    return 0;
}

/* Write every packet whose time has come (within the wake-up estimate). */
static void release(struct dir *d) {
    while (d->count) {
        struct pkt *p = &d->ring[d->head];
        uint64_t t = now_ns();
        if (p->due > t + (uint64_t)wake_est_ns)
            return;
        int64_t late = (int64_t)(t - p->due);       /* negative: early, by less than wake_est_ns */
        d->late_sum_ns += late;
        if (late > d->late_max_ns)
            d->late_max_ns = late;
        if (late > 20000)
            d->late_20us++;
        if (late > 100000)
            d->late_100us++;
        if (late < -20000)
            d->early_20us++;
        ssize_t n = write(d->out, p->data, p->len);
        if (n == (ssize_t)p->len) {
            d->pkts_out++;
            d->bytes_out += p->len;
        } else {
            d->write_err++;
        }
        d->head = (d->head + 1) % d->cap;
        d->count--;
    }
}

static void report(const struct dir *d, const char *sep) {
    uint64_t sent = d->pkts_out + d->write_err;
    printf("\"%s\": {\"pkts_in\": %llu, \"bytes_in\": %llu, \"pkts_out\": %llu, \"bytes_out\": %llu, "
           "\"drop_full\": %llu, \"drop_big\": %llu, \"write_err\": %llu, \"left_in_fifo\": %u, "
           "\"max_depth\": %u, \"late_mean_us\": %.2f, \"late_max_us\": %.2f, "
           "\"late_over_20us\": %llu, \"late_over_100us\": %llu, \"early_over_20us\": %llu}%s",
           d->name, (unsigned long long)d->pkts_in, (unsigned long long)d->bytes_in,
           (unsigned long long)d->pkts_out, (unsigned long long)d->bytes_out,
           (unsigned long long)d->drop_full, (unsigned long long)d->drop_big,
           (unsigned long long)d->write_err, d->count, d->max_depth,
           sent ? (double)d->late_sum_ns / 1e3 / (double)sent : 0.0, (double)d->late_max_ns / 1e3,
           (unsigned long long)d->late_20us, (unsigned long long)d->late_100us,
           (unsigned long long)d->early_20us, sep);
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: delayline TUN_A TUN_B DELAY_US [CAP]\n");
        return 2;
    }
    double delay_us = strtod(argv[3], NULL);
    long cap = argc > 4 ? strtol(argv[4], NULL, 10) : 4096;
    if (delay_us < 0 || delay_us > 10e6 || cap < 1 || cap > 1000000) {
        fprintf(stderr, "delayline: DELAY_US must be 0..10000000, CAP 1..1000000\n");
        return 2;
    }
    delay_ns = (uint64_t)(delay_us * 1000.0 + 0.5);
    wake_est_cap_ns = (int64_t)(delay_ns / 4 < 50000 ? delay_ns / 4 : 50000);

    pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)            /* the parent died before the line above */
        return 1;
    prctl(PR_SET_TIMERSLACK, 1UL);

    sigset_t block, during_wait;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &during_wait);   /* delivered only inside ppoll(): no lost wakeup */
    sigdelset(&during_wait, SIGTERM);
    sigdelset(&during_wait, SIGINT);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fa = tun_open(argv[1]), fb = tun_open(argv[2]);
    struct dir d[2] = {
        {.name = "a_to_b", .in = fa, .out = fb, .cap = (uint32_t)cap},
        {.name = "b_to_a", .in = fb, .out = fa, .cap = (uint32_t)cap},
    };
    for (int i = 0; i < 2; i++) {
        d[i].ring = malloc((size_t)cap * sizeof(struct pkt));
        if (!d[i].ring) {
            fprintf(stderr, "delayline: out of memory\n");
            return 2;
        }
    }
    printf("ready\n");
    fflush(stdout);

    int rc = 0;
    while (!stop) {
        release(&d[0]);
        release(&d[1]);
        struct timespec ts, *tsp = NULL;
        uint64_t next = UINT64_MAX, wake_at = 0;
        for (int i = 0; i < 2; i++)
            if (d[i].count && d[i].ring[d[i].head].due < next)
                next = d[i].ring[d[i].head].due;
        if (next != UINT64_MAX) {
            uint64_t t = now_ns();
            wake_at = next - (uint64_t)wake_est_ns;
            uint64_t wait = wake_at > t ? wake_at - t : 0;
            ts.tv_sec = (time_t)(wait / 1000000000u);
            ts.tv_nsec = (long)(wait % 1000000000u);
            tsp = &ts;
        }
        struct pollfd pfd[2] = {{.fd = fa, .events = POLLIN}, {.fd = fb, .events = POLLIN}};
        int r = ppoll(pfd, 2, tsp, &during_wait);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("delayline: ppoll");
            rc = 1;
            break;
        }
        if (r == 0 && tsp && tsp->tv_sec == 0 && tsp->tv_nsec > 0) {   /* a timed wake-up: how late? */
            int64_t late = (int64_t)(now_ns() - wake_at);
            wake_est_ns += late > wake_est_ns ? 250 : -250;
            if (wake_est_ns < 0)
                wake_est_ns = 0;
            if (wake_est_ns > wake_est_cap_ns)
                wake_est_ns = wake_est_cap_ns;
        }
        for (int i = 0; i < 2; i++) {
            if (pfd[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "delayline: %s: poll error 0x%x\n", i ? argv[2] : argv[1], pfd[i].revents);
                rc = 1;
                stop = 1;
            } else if ((pfd[i].revents & POLLIN) && ingest(&d[i]) < 0) {
                rc = 1;
                stop = 1;
            }
        }
    }
    printf("{\"delay_us\": %.3f, \"cap\": %ld, \"wake_est_us\": %.2f, ", delay_ns / 1e3, cap,
           (double)wake_est_ns / 1e3);
    report(&d[0], ", ");
    report(&d[1], "}\n");
    fflush(stdout);
    return rc;
}

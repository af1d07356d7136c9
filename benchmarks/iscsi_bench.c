/*
 * iscsi_bench: a small load generator for iSCSI targets, on libiscsi's async API.
 *
 * The same client measures every target in a run, so its own cost cancels out
 * of the ratios.  Keeps QD commands in flight, random or sequential, reads or
 * writes, for a fixed time; prints one JSON line: ops, bytes, seconds,
 * IOPS, MiB/s, mean and p99 latency (microseconds), errors.
 *
 * build: cc -O2 -o iscsi_bench iscsi_bench.c -liscsi
 * usage: iscsi_bench URL read|write|randread|randwrite|randrw[:READ_PCT] BS QD SECONDS
 *                    [SPAN_MIB] [crc32c|none] [INITIATOR_NAME|-]
 *   randrw: random I/O, each command a read with probability READ_PCT % (default 70).
 *   INITIATOR_NAME: this session's initiator name (default iqn.2026-11.org.example:bench);
 *     also seeds the LBA generator, so concurrent sessions do not walk the same LBAs.
 *   environment (both optional, for runs of many processes at once):
 *     ISCSI_BENCH_START_AT=EPOCH_SECONDS  log in, then wait until this wall-clock time to start
 *     ISCSI_BENCH_LAT_OUT=PATH            write every latency (seconds, native doubles) there
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

struct slot { double start; };

static struct iscsi_context *ctx;
static int lun, is_write, is_random, read_pct = -1, in_flight, errors, stop_issuing;
static uint32_t bs, block_size;
static uint64_t span_blocks, next_lba, ops, reads, writes, max_ops = 4000000;
static uint64_t rng = 88172645463325252ULL;
static unsigned char *wbuf;
static double *lat;
static double t_end;

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rnd64(void) {
	rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
	return rng;
}

static void issue(void);

static void done(struct iscsi_context *c, int status, void *command_data, void *priv) {
	struct scsi_task *task = command_data;
	struct slot *s = priv;
	(void)c;
	if (status != SCSI_STATUS_GOOD) errors++;
	if (ops < max_ops) lat[ops] = now() - s->start;
	ops++;
	in_flight--;
	if (task) scsi_free_scsi_task(task);
	free(s);
	if (!stop_issuing) issue();
}

static void issue(void) {
	uint32_t nblk = bs / block_size;
	uint64_t lba;
	if (is_random) lba = (rnd64() % (span_blocks / nblk)) * nblk;
	else { lba = next_lba; next_lba += nblk; if (next_lba + nblk > span_blocks) next_lba = 0; }
	int w = read_pct >= 0 ? (int)(rnd64() % 100) >= read_pct : is_write;
	if (w) writes++; else reads++;
	struct slot *s = malloc(sizeof *s);
	s->start = now();
	struct scsi_task *t;
	if (w)
		t = iscsi_write16_task(ctx, lun, lba, wbuf, bs, block_size, 0, 0, 0, 0, 0, done, s);
	else
		t = iscsi_read16_task(ctx, lun, lba, bs, block_size, 0, 0, 0, 0, 0, done, s);
	if (!t) { fprintf(stderr, "submit failed: %s\n", iscsi_get_error(ctx)); exit(2); }
	in_flight++;
}

static int cmp(const void *a, const void *b) {
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
	if (argc < 6) {
		fprintf(stderr, "usage: %s URL read|write|randread|randwrite|randrw[:READ_PCT] BS QD SECONDS"
		                " [SPAN_MIB] [crc32c|none] [INITIATOR_NAME|-]\n", argv[0]);
		return 2;
	}
	const char *mode = argv[2];
	bs = atoi(argv[3]);
	int qd = atoi(argv[4]);
	double secs = atof(argv[5]);
	uint64_t span_mib = argc > 6 ? strtoull(argv[6], 0, 10) : 0;
	is_write = strstr(mode, "write") != NULL;
	is_random = strncmp(mode, "rand", 4) == 0;
	if (!strncmp(mode, "randrw", 6)) {
		read_pct = mode[6] == ':' ? atoi(mode + 7) : 70;
		if (read_pct < 0 || read_pct > 100) { fprintf(stderr, "READ_PCT must be 0..100\n"); return 2; }
	}
	const char *initiator = "iqn.2026-11.org.example:bench";
	if (argc > 8 && strcmp(argv[8], "-") && argv[8][0]) {
		initiator = argv[8];
		for (const char *p = initiator; *p; p++) rng = (rng ^ (unsigned char)*p) * 0x100000001b3ULL;
		if (!rng) rng = 1;
	}

	ctx = iscsi_create_context(initiator);
	struct iscsi_url *url = iscsi_parse_full_url(ctx, argv[1]);
	if (!url) { fprintf(stderr, "bad url: %s\n", iscsi_get_error(ctx)); return 2; }
	iscsi_set_targetname(ctx, url->target);
	iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(ctx, argc > 7 && !strcmp(argv[7], "crc32c") ? ISCSI_HEADER_DIGEST_CRC32C
	                                                                       : ISCSI_HEADER_DIGEST_NONE);
	if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
		fprintf(stderr, "login failed: %s\n", iscsi_get_error(ctx));
		return 2;
	}
	lun = url->lun;
	/* Clear the POWER ON unit attention, then learn the geometry. */
	for (int i = 0; i < 4; i++) {
		struct scsi_task *t = iscsi_testunitready_sync(ctx, lun);
		int ok = t && t->status == SCSI_STATUS_GOOD;
		if (t) scsi_free_scsi_task(t);
		if (ok) break;
	}
	struct scsi_task *t = iscsi_readcapacity16_sync(ctx, lun);
	if (!t || t->status != SCSI_STATUS_GOOD) { fprintf(stderr, "readcapacity16 failed\n"); return 2; }
	struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(t);
	block_size = rc->block_length;
	span_blocks = rc->returned_lba + 1;
	scsi_free_scsi_task(t);
	if (span_mib && span_mib * 1048576 / block_size < span_blocks) span_blocks = span_mib * 1048576 / block_size;

	wbuf = malloc(bs);
	for (uint32_t i = 0; i < bs; i++) wbuf[i] = (unsigned char)rnd64();
	lat = malloc(sizeof(double) * max_ops);

	const char *start_at = getenv("ISCSI_BENCH_START_AT");
	if (start_at && *start_at) {
		struct timespec rt;
		clock_gettime(CLOCK_REALTIME, &rt);
		double wait = atof(start_at) - (rt.tv_sec + rt.tv_nsec / 1e9);
		if (wait > 0 && wait < 3600) {
			struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
			while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
		}
	}
	double t0 = now();
	struct timespec rt0;
	clock_gettime(CLOCK_REALTIME, &rt0);
	t_end = t0 + secs;
	for (int i = 0; i < qd; i++) issue();
	while (in_flight > 0) {
		struct pollfd pfd = { .fd = iscsi_get_fd(ctx), .events = iscsi_which_events(ctx) };
		if (poll(&pfd, 1, 1000) < 0 && errno != EINTR) { perror("poll"); return 2; }
		if (iscsi_service(ctx, pfd.revents) < 0) { fprintf(stderr, "service: %s\n", iscsi_get_error(ctx)); return 2; }
		if (!stop_issuing && now() >= t_end) stop_issuing = 1;
	}
	double el = now() - t0;
	uint64_t n = ops < max_ops ? ops : max_ops;
	double sum = 0;
	for (uint64_t i = 0; i < n; i++) sum += lat[i];
	qsort(lat, n, sizeof(double), cmp);
	double p99 = n ? lat[(uint64_t)(n * 0.99)] : 0;
	const char *lat_out = getenv("ISCSI_BENCH_LAT_OUT");
	if (lat_out && *lat_out) {
		FILE *f = fopen(lat_out, "wb");
		if (!f || fwrite(lat, sizeof(double), n, f) != n || fclose(f) != 0) { perror(lat_out); return 2; }
	}
	printf("{\"ops\": %llu, \"bytes\": %llu, \"seconds\": %.4f, \"iops\": %.1f, \"mib_s\": %.2f, "
	       "\"lat_mean_us\": %.1f, \"lat_p99_us\": %.1f, \"errors\": %d, \"reads\": %llu, \"writes\": %llu, \"start_epoch\": %.6f}\n",
	       (unsigned long long)ops, (unsigned long long)ops * bs, el, ops / el, ops * (double)bs / el / 1048576.0,
	       n ? sum / n * 1e6 : 0, p99 * 1e6, errors, (unsigned long long)reads, (unsigned long long)writes,
	       rt0.tv_sec + rt0.tv_nsec / 1e9);
	iscsi_logout_sync(ctx);
	iscsi_destroy_context(ctx);
	return errors ? 1 : 0;
}

/* vbus vm firmware, the CPL3 part: the bridge ABI north driver
 * (docs/design.md 4.5) and its two programs, echo and venet.
 *
 * It does what vbus/kvmsim.py's guest does, in guest RAM: formats the
 * bridge page, posts call slots (ENUMERATE, OPEN, CALL, SHM) and rings
 * doorbell 0; its queues are ioq rings (docs/design.md 3.3) in guest RAM,
 * rx buffers posted by the north.  Doorbells are port writes that KVM turns
 * into eventfd signals; interrupts come from irqfd through the PIC and are
 * counted by the CPL0 stubs.  North-side mitigation: interrupts off (the
 * ring's north flag disarmed) while polling; armed with a fence, re-checked,
 * and only then the halt call. */
#include "fw.h"

void venet(void);

/* --- output ---------------------------------------------------------------------------- */
static char line[256];
static u32 line_len;

static void put_c(char c)
{
	if (line_len < sizeof(line) - 1)
		line[line_len++] = c;
}
static void put_s(const char *s)
{
	while (*s)
		put_c(*s++);
}
static void put_u(u64 v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		put_c(tmp[--n]);
}
static void put_x(u64 v)
{
	put_s("0x");
	int started = 0;
	for (int i = 60; i >= 0; i -= 4) {
		u32 d = (v >> i) & 15;
		if (d || started || i == 0) {
			put_c("0123456789abcdef"[d]);
			started = 1;
		}
	}
}
static void flush(void)
{
	line[line_len] = 0;
	outl(PORT_PUTS, (u32)(u64)line);
	line_len = 0;
}

static void finish(u32 status)
{
	BOOT[BO_STATUS] = 2;
	outl(PORT_EXIT, status);
	for (;;)
		cpu_relax();
}

/* The failure text goes where the VMM reads it, and on the console. */
static void fail(u32 status)
{
	char *msg = (char *)BOOTINFO_GPA + BO_MESSAGE * 8;
	line[line_len] = 0;
	memcpy(msg, line, line_len + 1);
	flush();
	finish(status);
}

/* --- the bridge page ------------------------------------------------------------------- */
struct slot {
	u32 op;
	i32 status;
	u32 handle;
	u32 arg;
	u64 addr;
	u32 len;
	u32 flags;
	u64 reply;
	u32 reply_cap;
	u32 reply_len;
	u16 doorbell;
	u16 irq;
	u32 tag;
	u64 zero;
};

struct bridge {
	u32 magic, version, fault, fault_detail;
	u32 call_head, call_tail, event_head, event_tail;
	u32 irq_enable;
	u32 reserved[7];
	struct slot slots[16];
};

#define OP_ENUMERATE 1
#define OP_OPEN 2
#define OP_CALL 3
#define OP_SHM 4
#define OP_CLOSE 5
#define SHM_WRITABLE 1
#define SHM_NO_MITIGATION 2

static volatile struct bridge *const br = (volatile struct bridge *)BRIDGE_GPA;
static u32 call_head;

static u64 doorbells; /* rung in the data phase */
static int counting;

static void ring_doorbell(u32 i)
{
	outw((u16)(DOORBELL_PORT + 2 * i), 1);
	if (counting)
		doorbells++;
}

static void check_fault(void)
{
	if (br->fault) {
		put_s("vbusd faulted the guest: reason ");
		put_u(br->fault);
		put_s(", detail ");
		put_u(br->fault_detail);
		fail(ST_FAULTED);
	}
}

static void bridge_init(void)
{
	memset((void *)BRIDGE_GPA, 0, 4096);
	br->magic = 0x4b425642;
	br->version = 1;
	br->irq_enable = 1;
	call_head = 0;
}

static const char *op_name(u32 op)
{
	static const char *names[] = { "?", "ENUMERATE", "OPEN", "CALL", "SHM", "CLOSE" };
	return op <= 5 ? names[op] : "?";
}

/* Post one slot, ring doorbell 0, sleep on interrupt 0 until it is answered. */
static struct slot request(const struct slot *s)
{
	volatile struct slot *at = &br->slots[call_head % 16];
	memcpy((void *)at, s, sizeof(*s));
	barrier();
	call_head++;
	br->call_head = call_head; /* after the slot stores (x86 TSO) */
	ring_doorbell(0);
	for (;;) {
		u64 seen = irq_total;
		barrier();
		if (br->call_tail == call_head)
			break;
		check_fault();
		wait_irq(seen);
	}
	struct slot answer;
	memcpy(&answer, (const void *)at, sizeof(answer));
	return answer;
}

static struct slot checked(const struct slot *s)
{
	struct slot a = request(s);
	if (a.status < 0) {
		put_s(op_name(s->op));
		put_s(" failed: errno ");
		put_u((u64)-a.status);
		fail(ST_FAILED);
	}
	return a;
}

static u64 str_len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

/* ENUMERATE, then find the device by name: 0 when it is not on the bus. */
static u32 find_device(const char *name, char *cls, u32 cls_cap)
{
	struct slot s = { .op = OP_ENUMERATE, .reply = REPLY_GPA, .reply_cap = 65536 };
	struct slot a = checked(&s);
	const u8 *p = (const u8 *)REPLY_GPA;
	u64 at = 0, want = str_len(name);
	while (at + 8 <= a.reply_len) {
		u32 id = *(const u32 *)(p + at);
		u16 nlen = *(const u16 *)(p + at + 4);
		u16 clen = *(const u16 *)(p + at + 6);
		if (nlen == want && !memcmp(p + at + 8, name, want)) {
			u32 n = clen < cls_cap - 1 ? clen : cls_cap - 1;
			memcpy(cls, p + at + 8 + nlen, n);
			cls[n] = 0;
			return id;
		}
		at += (8 + nlen + clen + 3) & ~3UL;
	}
	return 0;
}

static u32 open_device(const char *name)
{
	u64 n = str_len(name);
	memcpy((void *)DATA_GPA, name, n);
	struct slot s = { .op = OP_OPEN, .addr = DATA_GPA, .len = (u32)n };
	return checked(&s).handle;
}

static u32 call(u32 handle, u32 func, const void *data, u32 len, void *reply, u32 cap)
{
	memcpy((void *)DATA_GPA, data, len);
	struct slot s = { .op = OP_CALL, .handle = handle, .arg = func, .addr = DATA_GPA,
			  .len = len, .reply = REPLY_GPA, .reply_cap = 65536 };
	struct slot a = checked(&s);
	u32 n = a.reply_len < cap ? a.reply_len : cap;
	memcpy(reply, (const void *)REPLY_GPA, n);
	return a.reply_len;
}

/* --- ioq, the north end (docs/design.md 3.3) ------------------------------------------ */
struct desc {
	u64 cookie;
	u64 ptr;
	u64 len;
	u8 valid;
	u8 sown;
	u8 pad[6];
};

struct ring {
	u32 magic, version, count, flags;
	u32 sig_magic, sig_version;
	u8 north[4]; /* enabled, pending, dirty, reserved */
	u8 south[4];
	u8 pad0[32];
	u32 valid;
	u8 pad1[60];
	u32 inuse;
	u8 pad2[60];
	struct desc desc[];
};

struct ioq {
	volatile struct ring *r;
	u32 count, mask;
	u32 valid; /* published so far */
	u32 reaped; /* completions taken */
	u8 *pool;
	u32 buf_size;
	u32 doorbell;
	int mitigate;
};

static u32 queues;

static void ioq_init(struct ioq *q, u32 count, u32 buf_size, u32 doorbell, int mitigate)
{
	u32 k = queues++;
	q->r = (volatile struct ring *)(RINGS_GPA + k * RING_STRIDE);
	q->pool = (u8 *)(POOLS_GPA + k * POOL_STRIDE);
	q->count = count;
	q->mask = count - 1;
	q->valid = q->reaped = 0;
	q->buf_size = buf_size;
	q->doorbell = doorbell;
	q->mitigate = mitigate;
	memset((void *)q->r, 0, 192 + 32 * count);
	q->r->magic = 0x56424951;
	q->r->version = 1;
	q->r->count = count;
	q->r->sig_magic = 0x56425347;
	q->r->sig_version = 1;
	q->r->north[0] = 1;
	q->r->south[0] = 1;
	for (u32 j = 0; j < count; j++)
		q->r->desc[j].ptr = (u64)(q->pool + (u64)j * buf_size);
}

static void ioq_publish(struct ioq *q, u32 n)
{
	barrier();
	q->valid += n;
	q->r->valid = q->valid; /* after the descriptor stores (x86 TSO) */
}

/* The ring's north flag: off while polling, on (with the fence) to sleep. */
static void ioq_disarm(struct ioq *q)
{
	q->r->north[0] = 0;
	q->r->north[1] = 0;
	q->r->north[2] = 0;
}
static void ioq_arm(struct ioq *q)
{
	q->r->north[0] = 1;
	mfence();
}
static void ioq_ack(struct ioq *q)
{
	q->r->north[1] = 0;
	q->r->north[2] = 0;
}

/* Signal the south: mitigated unless the queue has mitigation off. */
static void ioq_notify(struct ioq *q)
{
	q->r->south[2] = 1;
	mfence(); /* the published index before the south's flags are read */
	if (!q->mitigate || (q->r->south[0] && !q->r->south[1])) {
		q->r->south[1] = 1;
		ring_doorbell(q->doorbell);
	}
}

static u32 ioq_inuse(struct ioq *q) { return *(volatile u32 *)&q->r->inuse; }

static u32 ioq_completed(struct ioq *q)
{
	u32 n = ioq_inuse(q) - q->reaped;
	if (n > q->valid - q->reaped) {
		put_s("ioq: south index beyond what was posted");
		fail(ST_FAILED);
	}
	return n;
}

/* Free slots for sending (tx: completions only free space). */
static u32 ioq_space(struct ioq *q)
{
	u32 inuse = ioq_inuse(q);
	q->reaped = inuse;
	return q->count - (q->valid - inuse);
}

/* Fill the next slot's buffer and descriptor (published by ioq_publish). */
static u8 *ioq_slot_buf(struct ioq *q, u32 i) { return q->pool + (u64)((q->valid + i) & q->mask) * q->buf_size; }

static void ioq_fill(struct ioq *q, u32 i, u32 len)
{
	volatile struct desc *d = &q->r->desc[(q->valid + i) & q->mask];
	d->ptr = (u64)ioq_slot_buf(q, i);
	d->len = len;
	d->valid = 1;
	d->sown = 1;
}

static void ioq_post_empty(struct ioq *q, u32 n)
{
	u32 room = q->count - (q->valid - q->reaped);
	if (n > room)
		n = room;
	for (u32 i = 0; i < n; i++)
		ioq_fill(q, i, q->buf_size);
	if (n)
		ioq_publish(q, n);
}

static struct ioq *shm(u32 handle, u32 index, struct ioq *q, int writable)
{
	struct slot s = { .op = OP_SHM, .handle = handle, .arg = index, .addr = (u64)q->r,
			  .len = q->count, .doorbell = (u16)q->doorbell, .irq = 1 };
	s.flags = (writable ? SHM_WRITABLE : 0) | (q->mitigate ? 0 : SHM_NO_MITIGATION);
	checked(&s);
	if (writable) {
		ioq_post_empty(q, q->count);
		ioq_notify(q);
	}
	return q;
}

/* --- the data phase ------------------------------------------------------------------- */
static u64 irqs_at_start, waits;

static void phase_start(void)
{
	outl(PORT_MARK, 1);
	counting = 1;
	doorbells = 0;
	waits = 0;
	irqs_at_start = irq_total;
}

static void phase_end(void)
{
	counting = 0;
	BOOT[BO_DOORBELLS] = doorbells;
	BOOT[BO_IRQS] = irq_total - irqs_at_start;
	BOOT[BO_WAITS] = waits;
	outl(PORT_MARK, 2);
}

static void sleep_until(u64 seen)
{
	waits++;
	wait_irq(seen);
}

/* --- echo ------------------------------------------------------------------------------- */
static void pattern(u8 *p, u64 seq, u32 len)
{
	for (u32 k = 0; k < len; k++)
		p[k] = (u8)(seq * 131 + k * 7 + (seq >> 8));
	if (len >= 8)
		*(u64 *)p = seq;
}

static int verify(const u8 *p, u64 seq, u32 len)
{
	if (len >= 8 && *(const u64 *)p != seq)
		return 0;
	for (u32 k = 8; k < len; k++)
		if (p[k] != (u8)(seq * 131 + k * 7 + (seq >> 8)))
			return 0;
	return 1;
}

static u64 sent, received, bad;

static u32 echo_send(struct ioq *tx, u64 total, u32 batch, u32 size)
{
	u32 n = ioq_space(tx);
	if (n > batch)
		n = batch;
	if (n > total - sent)
		n = (u32)(total - sent);
	for (u32 i = 0; i < n; i++) {
		pattern(ioq_slot_buf(tx, i), sent + i, size);
		ioq_fill(tx, i, size);
	}
	if (n) {
		ioq_publish(tx, n);
		sent += n;
	}
	return n;
}

static u32 echo_recv(struct ioq *rx, u32 size)
{
	u32 n = ioq_completed(rx);
	for (u32 i = 0; i < n; i++) {
		u32 slot = (rx->reaped + i) & rx->mask;
		u64 len = rx->r->desc[slot].len;
		const u8 *p = rx->pool + (u64)slot * rx->buf_size;
		if (len != size || !verify(p, received + i, size))
			bad++;
	}
	if (n) {
		rx->reaped += n;
		received += n;
		BOOT[BO_RECEIVED] = received; /* progress, for a VMM that gives up */
		BOOT[BO_SENT] = sent;
		ioq_post_empty(rx, n);
	}
	return n;
}

static void echo(void)
{
	char cls[65];
	const char *name = (const char *)(BOOTINFO_GPA + BI_DEVICE * 8);
	u64 total = BOOT[BI_MESSAGES];
	u32 size = (u32)BOOT[BI_MSG_SIZE];
	u32 batch = (u32)BOOT[BI_BATCH];
	int mitigate = (int)BOOT[BI_MITIGATION];

	if (!find_device(name, cls, sizeof(cls))) {
		put_s("device ");
		put_s(name);
		put_s(" is not on the bus");
		fail(ST_NO_DEVICE);
	}
	if (memcmp(cls, "echo", 5)) {
		put_s("device ");
		put_s(name);
		put_s(" is of class ");
		put_s(cls);
		put_s(", not echo");
		fail(ST_NO_DEVICE);
	}
	u32 handle = open_device(name);
	static struct ioq txq, rxq;
	struct ioq *tx = &txq, *rx = &rxq;
	ioq_init(tx, 256, 2048, 1, mitigate);
	ioq_init(rx, 256, 2048, 1, mitigate);
	shm(handle, 0, tx, 0);
	shm(handle, 1, rx, 1);
	put_s("echo: ");
	put_s(name);
	put_s(" open, handle ");
	put_u(handle);
	put_s(", ");
	put_u(total);
	put_s(" messages of ");
	put_u(size);
	put_s(" bytes, mitigation ");
	put_s(mitigate ? "on" : "off");
	flush();

	phase_start();
	if (mitigate) {
		/* Polling from here on: notifications off, and whatever the south
		 * marked pending during setup taken, or the first arm would find
		 * pending set and the south would never kick again. */
		ioq_disarm(tx);
		ioq_disarm(rx);
		while (received < total) {
			int moved = 0;
			if (sent < total && echo_send(tx, total, batch, size)) {
				ioq_notify(tx);
				moved = 1;
			}
			if (echo_recv(rx, size)) {
				ioq_notify(rx);
				moved = 1;
			}
			if (moved)
				continue;
			check_fault();
			u64 seen = irq_total;
			ioq_arm(tx);
			ioq_arm(rx);
			if ((sent < total && ioq_space(tx)) || ioq_completed(rx)) {
				ioq_disarm(tx);
				ioq_disarm(rx);
				continue;
			}
			sleep_until(seen);
			ioq_disarm(tx);
			ioq_disarm(rx);
		}
	} else {
		/* No mitigation: one message at a time, every kick forced, every
		 * interrupt taken. */
		while (received < total) {
			echo_send(tx, total, 1, size);
			ioq_notify(tx);
			for (;;) {
				u64 seen = irq_total;
				ioq_ack(rx);
				if (echo_recv(rx, size))
					break;
				check_fault();
				sleep_until(seen);
			}
			ioq_notify(rx);
		}
	}
	phase_end();
	BOOT[BO_SENT] = sent;
	BOOT[BO_RECEIVED] = received;
	BOOT[BO_BAD] = bad;
	put_s("echo: ");
	put_u(received);
	put_s(" of ");
	put_u(total);
	put_s(" echoed, ");
	put_u(bad);
	put_s(" bad, ");
	put_u(doorbells);
	put_s(" doorbells, ");
	put_u(BOOT[BO_IRQS]);
	put_s(" interrupts");
	flush();
	if (bad || received != total) {
		put_s("echo: ");
		put_u(bad);
		put_s(" of ");
		put_u(total);
		put_s(" echoes did not match what was sent");
		fail(ST_FAILED);
	}
}

void umain(void)
{
	bridge_init();
	ring_doorbell(0);
	if (BOOT[BI_MODE] == MODE_ECHO)
		echo();
	else
		venet();
	for (int i = 0; i < 8; i++)
		BOOT[BO_IRQ0 + i] = irq_count[(BOOT[BI_IRQ_LINE] + i) & 7];
	finish(ST_OK);
}

/* --- venet: ARP and ICMP echo for one address (docs/design.md 3.8) ------------------- */
#define F_VERSION_1 (1UL << 32)
#define CALL_NEGOTIATE 2
#define CALL_CONFIG 3
#define CALL_LINK_UP 5
#define HDR 12 /* struct virtio_net_hdr_v1 */

static u8 mac[6];
static u32 my_ip;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static u16 csum(const u8 *p, u32 n)
{
	u64 sum = 0;
	for (u32 i = 0; i + 1 < n; i += 2)
		sum += (u32)(p[i] << 8 | p[i + 1]);
	if (n & 1)
		sum += (u32)(p[n - 1] << 8);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

/* The answer to one frame, built in `out` (header included); its length or 0. */
static u32 answer(const u8 *in, u32 len, u8 *out)
{
	if (len < HDR + 14)
		return 0;
	const u8 *eth = in + HDR;
	u32 elen = len - HDR;
	u16 type = be16(eth + 12);
	memset(out, 0, HDR);
	u8 *o = out + HDR;
	if (type == 0x0806 && elen >= 42) {
		const u8 *arp = eth + 14;
		if (be16(arp) != 1 || be16(arp + 2) != 0x0800 || arp[4] != 6 || arp[5] != 4)
			return 0;
		if (be16(arp + 6) != 1 || be32(arp + 24) != my_ip)
			return 0;
		memcpy(o, eth + 6, 6);
		memcpy(o + 6, mac, 6);
		put16(o + 12, 0x0806);
		u8 *r = o + 14;
		put16(r, 1);
		put16(r + 2, 0x0800);
		r[4] = 6;
		r[5] = 4;
		put16(r + 6, 2);
		memcpy(r + 8, mac, 6);
		memcpy(r + 14, arp + 24, 4);
		memcpy(r + 18, arp + 8, 6);
		memcpy(r + 24, arp + 14, 4);
		BOOT[BO_ARP]++;
		return HDR + 42;
	}
	if (type == 0x0800 && elen >= 14 + 20) {
		const u8 *ip = eth + 14;
		u32 ihl = (ip[0] & 15) * 4u;
		u32 total = be16(ip + 2);
		if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || 14 + total > elen)
			return 0;
		if (ip[9] != 1 || be32(ip + 16) != my_ip || (be16(ip + 6) & 0x3fff))
			return 0; /* ICMP to us, not a fragment */
		const u8 *icmp = ip + ihl;
		if (icmp[0] != 8 || icmp[1] != 0)
			return 0;
		memcpy(o, eth + 6, 6);
		memcpy(o + 6, mac, 6);
		put16(o + 12, 0x0800);
		u8 *rip = o + 14;
		memcpy(rip, ip, total);
		memcpy(rip + 12, ip + 16, 4);
		memcpy(rip + 16, ip + 12, 4);
		rip[8] = 64;
		put16(rip + 10, 0);
		put16(rip + 10, csum(rip, ihl));
		u8 *ricmp = rip + ihl;
		ricmp[0] = 0;
		put16(ricmp + 2, 0);
		put16(ricmp + 2, csum(ricmp, total - ihl));
		BOOT[BO_ICMP]++;
		return HDR + 14 + total;
	}
	return 0;
}

void venet(void)
{
	char cls[65];
	const char *name = (const char *)(BOOTINFO_GPA + BI_DEVICE * 8);
	my_ip = (u32)BOOT[BI_IP];
	if (!find_device(name, cls, sizeof(cls))) {
		put_s("device ");
		put_s(name);
		put_s(" is not on the bus");
		fail(ST_NO_DEVICE);
	}
	if (memcmp(cls, "venet", 6)) {
		put_s("device ");
		put_s(name);
		put_s(" is of class ");
		put_s(cls);
		put_s(", not venet");
		fail(ST_NO_DEVICE);
	}
	u32 handle = open_device(name);
	u64 features = F_VERSION_1;
	u8 reply[64];
	call(handle, CALL_NEGOTIATE, &features, 8, reply, sizeof(reply));
	u32 rx_size = *(u32 *)(reply + 8);
	if (rx_size > 2048) {
		put_s("venet: the device wants rx buffers of ");
		put_u(rx_size);
		put_s(" bytes, more than the guest's 2048");
		fail(ST_FAILED);
	}
	call(handle, CALL_CONFIG, 0, 0, reply, sizeof(reply));
	memcpy(mac, reply, 6);
	static struct ioq txq, rxq;
	struct ioq *tx = &txq, *rx = &rxq;
	ioq_init(tx, 256, 2048, 1, 1);
	ioq_init(rx, 256, rx_size, 1, 1);
	shm(handle, 0, tx, 0);
	shm(handle, 1, rx, 1);
	call(handle, CALL_LINK_UP, 0, 0, reply, sizeof(reply));
	put_s("venet: ");
	put_s(name);
	put_s(" up, mac ");
	for (int i = 0; i < 6; i++) {
		if (i)
			put_c(':');
		put_c("0123456789abcdef"[mac[i] >> 4]);
		put_c("0123456789abcdef"[mac[i] & 15]);
	}
	put_s(", ip ");
	for (int i = 3; i >= 0; i--) {
		put_u((my_ip >> (8 * i)) & 255);
		if (i)
			put_c('.');
	}
	put_c('/');
	put_u(BOOT[BI_PREFIX]);
	flush();

	phase_start(); /* serving: until the VMM stops the guest */
	ioq_disarm(tx);
	ioq_disarm(rx);
	for (;;) {
		u32 n = ioq_completed(rx);
		u32 replies = 0;
		for (u32 i = 0; i < n; i++) {
			u32 slot = (rx->reaped + i) & rx->mask;
			u64 len = rx->r->desc[slot].len;
			const u8 *p = rx->pool + (u64)slot * rx->buf_size;
			BOOT[BO_RX_FRAMES]++;
			if (len > rx->buf_size)
				continue;
			if (ioq_space(tx) <= replies) {
				BOOT[BO_DROPPED]++;
				continue;
			}
			u8 *out = ioq_slot_buf(tx, replies);
			u32 olen = answer(p, (u32)len, out);
			if (olen) {
				ioq_fill(tx, replies, olen);
				replies++;
			}
		}
		if (replies) {
			ioq_publish(tx, replies);
			BOOT[BO_TX_FRAMES] += replies;
			ioq_notify(tx);
		}
		if (n) {
			rx->reaped += n;
			ioq_post_empty(rx, n);
			ioq_notify(rx);
			continue;
		}
		check_fault();
		BOOT[BO_DOORBELLS] = doorbells;
		BOOT[BO_IRQS] = irq_total - irqs_at_start;
		BOOT[BO_WAITS] = waits;
		u64 seen = irq_total;
		ioq_arm(rx);
		if (ioq_completed(rx)) {
			ioq_disarm(rx);
			continue;
		}
		sleep_until(seen);
		ioq_disarm(rx);
	}
}

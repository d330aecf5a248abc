/* vbus vm firmware: what the setup (CPL0) and the driver (CPL3) share, and
 * the layout the VMM (vbus/vm/machine.py) writes and reads.  Keep the
 * numbers here and in vbus/vm/layout.py the same. */
#ifndef VBUS_FW_H
#define VBUS_FW_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef int i32;
typedef long i64;

/* Guest-physical layout (identity-mapped). */
#define BOOTINFO_GPA 0x1000UL
#define BRIDGE_GPA 0x2000UL
#define DATA_GPA 0x3000UL /* OPEN names, CALL data: 4 KiB */
#define REPLY_GPA 0x10000UL /* replies: 64 KiB */
#define RINGS_GPA 0x400000UL /* ring k at RINGS_GPA + k * RING_STRIDE */
#define RING_STRIDE 0x10000UL
#define POOLS_GPA 0x800000UL /* pool k at POOLS_GPA + k * POOL_STRIDE */
#define POOL_STRIDE 0x100000UL

/* Ports.  Doorbell i is a 16-bit write to DOORBELL_PORT + 2 * i
 * (KVM_IOEVENTFD, no exit); the others exit to the VMM. */
#define PORT_PUTS 0x500 /* outl: gpa of a NUL-terminated line */
#define PORT_EXIT 0x504 /* outl: final status (0: success) */
#define PORT_MARK 0x508 /* outl: 1 data phase starts, 2 it ends */
#define DOORBELL_PORT 0x5000

/* The boot information page: u64 words.  0..31 the VMM writes, 32.. the guest. */
#define BI_MAGIC 0 /* 0x4d564256 "VBVM" */
#define BI_MODE 1 /* 1 echo, 2 venet */
#define BI_RAM 2
#define BI_MESSAGES 3
#define BI_NDOORBELLS 4
#define BI_NIRQS 5
#define BI_MITIGATION 6 /* 1 on, 0 off */
#define BI_IP 7 /* venet: IPv4 address, host order */
#define BI_PREFIX 8
#define BI_MSG_SIZE 9
#define BI_BATCH 10
#define BI_IRQ_LINE 11 /* PIC line of interrupt 0; interrupt i is line + i */
#define BI_SECONDS 12 /* venet: seconds to serve (0: until stopped; the VMM keeps time) */
#define BI_DEVICE 16 /* byte offset 0x80: device name, NUL-terminated, 64 bytes */

#define BO_STATUS 32 /* 1 running, 2 done */
#define BO_SENT 33
#define BO_RECEIVED 34
#define BO_BAD 35
#define BO_DOORBELLS 36 /* doorbells rung in the data phase */
#define BO_IRQS 37 /* interrupts taken in the data phase */
#define BO_WAITS 38 /* halts in the data phase */
#define BO_ARP 39
#define BO_ICMP 40
#define BO_RX_FRAMES 41
#define BO_TX_FRAMES 42
#define BO_DROPPED 43
#define BO_IRQ_TOTAL_AT 44
#define BO_IRQ_COUNT_AT 45
#define BO_IRQ0 48 /* interrupts taken per interrupt index, 8 words */
#define BO_MESSAGE 64 /* byte offset 0x200: failure text, 256 bytes */

#define MODE_ECHO 1
#define MODE_VENET 2

/* Exit statuses (PORT_EXIT). */
#define ST_OK 0
#define ST_FAILED 1 /* a check failed: the message says which */
#define ST_NO_DEVICE 3 /* the device is not on the bus */
#define ST_FAULTED 4 /* vbusd faulted the guest */
#define ST_EXCEPTION 0x100 /* + vector: a CPU exception */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

#define BOOT ((volatile u64 *)BOOTINFO_GPA)

/* Interrupts counted by the CPL0 handlers (start.S). */
extern volatile u64 irq_total;
extern volatile u64 irq_count[8];

/* CPL3: halt until an interrupt arrives, unless irq_total != seen already
 * (a hlt at CPL3, turned by the #GP entry into a checked halt). */
void wait_irq(u64 seen);
void umain(void);

void *memcpy(void *dst, const void *src, u64 n);
void *memset(void *dst, int c, u64 n);
int memcmp(const void *a, const void *b, u64 n);

#endif

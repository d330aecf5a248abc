/* vbus vm firmware, the CPL0 part: descriptor tables, the TSS with its I/O
 * bitmap (port I/O from CPL3), the IDT (the halt call is its #GP entry), the
 * PIC, then down to CPL3.
 *
 * This code runs through the instruction emulator: general registers only,
 * no string formatting on the way, a few thousand instructions in all. */
#include "fw.h"

volatile u64 irq_total;
volatile u64 irq_count[8];

struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	u8 iomap[8192 + 1]; /* all zero: every port allowed; the last byte ends it */
} __attribute__((packed, aligned(16)));

static struct tss tss;
static u64 gdt[9] __attribute__((aligned(16)));
static u64 idt[2 * 256] __attribute__((aligned(16)));

extern char kstack_top[];
extern void enter_user(void);
extern void irq_0(void), irq_1(void), irq_2(void), irq_3(void);
extern void irq_4(void), irq_5(void), irq_6(void), irq_7(void);
extern void exc_0(void), exc_1(void), exc_2(void), exc_3(void), exc_4(void), exc_5(void);
extern void exc_6(void), exc_7(void), exc_8(void), exc_9(void), exc_10(void), exc_11(void);
extern void exc_12(void), exc_gp(void), exc_14(void), exc_15(void), exc_16(void);
extern void exc_17(void), exc_18(void), exc_19(void), exc_20(void), exc_21(void);

static void (*const excs[22])(void) = {
	exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7, exc_8, exc_9, exc_10,
	exc_11, exc_12, exc_gp, exc_14, exc_15, exc_16, exc_17, exc_18, exc_19, exc_20, exc_21,
};
static void (*const irqs[8])(void) = { irq_0, irq_1, irq_2, irq_3, irq_4, irq_5, irq_6, irq_7 };

struct dtr {
	u16 limit;
	u64 base;
} __attribute__((packed));

static void gate(int vec, void (*fn)(void))
{
	u64 a = (u64)fn;
	/* 64-bit gate, present, DPL 0, selector 0x08, IST 0: an interrupt gate,
	 * but a trap gate (interrupts stay on) for #GP, the halt call. */
	u64 type = vec == 13 ? 0x8fUL : 0x8eUL;
	idt[2 * vec] = (a & 0xffff) | (0x08UL << 16) | (type << 40) | ((a >> 16 & 0xffff) << 48);
	idt[2 * vec + 1] = a >> 32;
}

/* A line of text for the VMM, from CPL0 (no formatting here). */
static void kputs(const char *s) { outl(PORT_PUTS, (u32)(u64)s); }

static char hexbuf[96];

static void hex(char *at, u64 v)
{
	for (int i = 15; i >= 0; i--) {
		at[i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	}
}

/* From exc_common: frame[0] vector, [1] error code, [2] rip, [3] cs, [4] rflags, [5] rsp. */
void exception(u64 *frame)
{
	static const char text[] = "exception vector 0x---------------- error 0x---------------- rip 0x----------------";
	for (u64 i = 0; i < sizeof(text); i++)
		hexbuf[i] = text[i];
	hex(hexbuf + 19, frame[0]);
	hex(hexbuf + 44, frame[1]);
	hex(hexbuf + 67, frame[2]);
	kputs(hexbuf);
	outl(PORT_EXIT, ST_EXCEPTION + (u32)frame[0]);
}

static void pic_init(u32 line, u32 n)
{
	u8 mask = 0xff;
	for (u32 i = 0; i < n && line + i < 8; i++)
		mask &= (u8) ~(1u << (line + i));
	outb(0x20, 0x11); /* ICW1: edge, cascade, ICW4 */
	outb(0xa0, 0x11);
	outb(0x21, 0x20); /* ICW2: vector base */
	outb(0xa1, 0x28);
	outb(0x21, 0x04); /* ICW3: slave on line 2 */
	outb(0xa1, 0x02);
	outb(0x21, 0x01); /* ICW4: 8086 mode */
	outb(0xa1, 0x01);
	outb(0x21, mask);
	outb(0xa1, 0xff);
}

void kmain(void)
{
	struct dtr d;
	u64 t = (u64)&tss;
	u64 limit = sizeof(tss) - 1;

	gdt[0] = 0;
	gdt[1] = 0x00af9a000000ffffUL; /* 0x08 kernel code, 64-bit */
	gdt[2] = 0x00cf92000000ffffUL; /* 0x10 kernel data */
	gdt[3] = 0x00cffa000000ffffUL; /* 0x18 user code, 32-bit (sysret's layout) */
	gdt[4] = 0x00cff2000000ffffUL; /* 0x20 user data */
	gdt[5] = 0x00affa000000ffffUL; /* 0x28 user code, 64-bit */
	/* 0x30 TSS, 16 bytes: available 64-bit TSS, present */
	gdt[6] = (limit & 0xffff) | ((t & 0xffffff) << 16) | (0x89UL << 40) |
		 ((limit >> 16 & 0xf) << 48) | ((t >> 24 & 0xff) << 56);
	gdt[7] = t >> 32;
	gdt[8] = 0;
	d.limit = sizeof(gdt) - 1;
	d.base = (u64)gdt;
	__asm__ volatile("lgdt %0" ::"m"(d));
	__asm__ volatile("mov %0, %%ds; mov %0, %%es; mov %0, %%ss" ::"r"(0x10) : "memory");

	tss.rsp0 = (u64)kstack_top;
	tss.iomap_base = 104;
	tss.iomap[8192] = 0xff;
	__asm__ volatile("ltr %w0" ::"r"(0x30));

	for (int v = 0; v < 22; v++)
		gate(v, excs[v]);
	for (int l = 0; l < 8; l++)
		gate(0x20 + l, irqs[l]);
	d.limit = sizeof(idt) - 1;
	d.base = (u64)idt;
	__asm__ volatile("lidt %0" ::"m"(d));

	pic_init((u32)BOOT[BI_IRQ_LINE], (u32)BOOT[BI_NIRQS]);

	BOOT[BO_STATUS] = 1;
	BOOT[BO_IRQ_TOTAL_AT] = (u64)&irq_total; /* where the VMM reads the live counts */
	BOOT[BO_IRQ_COUNT_AT] = (u64)irq_count;
	enter_user();
}

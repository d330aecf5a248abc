/* vbus vm firmware: entry, interrupt and exception stubs, the halt call.
 *
 * The VMM enters _start in 64-bit mode at CPL0 with paging on (identity map)
 * and interrupts off.  Everything at CPL0 runs through the instruction
 * emulator, so the stubs are a handful of general-register instructions. */
	.section .note.GNU-stack, "", @progbits
	.code64
	.section .text.start, "ax"
	.globl _start
_start:
	lea kstack_top(%rip), %rsp
	call kmain
1:	hlt
	jmp 1b

/* Enter the driver at CPL3: iretq to umain on the user stack, IF=1. */
	.globl enter_user
enter_user:
	pushq $0x23			/* user data selector | 3 */
	lea ustack_top(%rip), %rax
	pushq %rax
	pushq $0x202			/* IF */
	pushq $0x2b			/* user code selector | 3 */
	lea umain(%rip), %rax
	pushq %rax
	iretq

/* Hardware interrupts from the PIC: vectors 0x20 + line.  Count, EOI, return. */
	.macro IRQ line
	.globl irq_\line
irq_\line:
	pushq %rax
	movl $\line, %eax
	jmp irq_common
	.endm
	IRQ 0
	IRQ 1
	IRQ 2
	IRQ 3
	IRQ 4
	IRQ 5
	IRQ 6
	IRQ 7
irq_common:
	lock incq irq_count(,%rax,8)
	lock incq irq_total(%rip)
	/* Taken between the halt call's check and its hlt: return past the
	 * hlt, or it would sleep with this interrupt already counted. */
	leaq halt_check(%rip), %rax
	cmpq %rax, 8(%rsp)
	jb 1f
	leaq halt_done(%rip), %rax
	cmpq %rax, 8(%rsp)
	jae 1f
	movq %rax, 8(%rsp)
1:
	movb $0x20, %al
	outb %al, $0x20			/* non-specific EOI to the master PIC */
	popq %rax
	iretq

/* CPU exceptions: report the vector, the error code and where. */
	.macro EXC vec, err=0
	.globl exc_\vec
exc_\vec:
	.if \err == 0
	pushq $0
	.endif
	pushq $\vec
	jmp exc_common
	.endm
	EXC 0
	EXC 1
	EXC 2
	EXC 3
	EXC 4
	EXC 5
	EXC 6
	EXC 7
	EXC 8, 1
	EXC 9
	EXC 10, 1
	EXC 11, 1
	EXC 12, 1
	EXC 14, 1
	EXC 15
	EXC 16
	EXC 17, 1
	EXC 18
	EXC 19
	EXC 20
	EXC 21, 1
exc_common:
	movq %rsp, %rdi			/* vector, error, rip, cs, rflags, rsp, ss */
	call exception
1:	hlt
	jmp 1b

/* The halt call: CPL3 executes hlt with rdi = the irq_total it saw; the
 * #GP that follows lands here, through a trap gate (interrupts stay on).
 * Halt only if no interrupt came since the caller looked, then return past
 * the hlt.  An interrupt taken anywhere from the check to the hlt returns
 * to halt_done instead (irq_common), so no interrupt slips in between: the
 * check and the hlt are one step without relying on sti's shadow.  Any
 * other #GP is reported as an exception. */
	.globl exc_gp
exc_gp:
	pushq %rax			/* then: error, rip, cs, rflags, rsp, ss */
	testb $3, 24(%rsp)
	jz 2f
	movq 16(%rsp), %rax
	cmpb $0xf4, (%rax)
	jne 2f
	incq 16(%rsp)
	.globl halt_check, halt_done
halt_check:
	cmpq %rdi, irq_total(%rip)
	jne halt_done
	hlt
halt_done:
	popq %rax
	addq $8, %rsp
	iretq
2:	popq %rax
	pushq $13
	jmp exc_common

/* CPL3 side of the halt call. */
	.globl wait_irq
wait_irq:
	hlt
	ret

	.section .bss
	.balign 16
	.globl kstack_top, ustack_top
	.space 16384
kstack_top:
	.space 65536
ustack_top:

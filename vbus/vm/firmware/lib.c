/* vbus vm firmware: the few library routines the compiler and the driver need. */
#include "fw.h"

void *memcpy(void *dst, const void *src, u64 n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n)::"memory");
	return dst;
}

void *memset(void *dst, int c, u64 n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, u64 n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *x = a, *y = b;
	for (u64 i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * SipHash-2-4 (Aumasson and Bernstein, 2012) over a 24-byte message: the
 * keyed hash of kracauer's SYN cookies. netstack/siphash.py is the same
 * function in Python, checked against the reference vectors; the
 * differential test checks this one against it through the cookies the
 * program makes.
 *
 * Fixed at three message words so the verifier sees straight-line code: the
 * cookie's message (netstack/syncookie.py's MESSAGE) is exactly 24 bytes.
 */
#ifndef KRACAUER_SIPHASH_H
#define KRACAUER_SIPHASH_H

#include <linux/types.h>

struct sipstate {
	__u64 v0, v1, v2, v3;
};

static __always_inline __u64 rotl64(__u64 x, int b)
{
	return (x << b) | (x >> (64 - b));
}

/* One SipRound: the paper's Figure 2.1. */
static __always_inline void sipround(struct sipstate *s)
{
	s->v0 += s->v1;
	s->v1 = rotl64(s->v1, 13) ^ s->v0;
	s->v0 = rotl64(s->v0, 32);
	s->v2 += s->v3;
	s->v3 = rotl64(s->v3, 16) ^ s->v2;
	s->v0 += s->v3;
	s->v3 = rotl64(s->v3, 21) ^ s->v0;
	s->v2 += s->v1;
	s->v1 = rotl64(s->v1, 17) ^ s->v2;
	s->v2 = rotl64(s->v2, 32);
}

/* c = 2 compression rounds per message word. */
static __always_inline void sipcompress(struct sipstate *s, __u64 m)
{
	s->v3 ^= m;
	sipround(s);
	sipround(s);
	s->v0 ^= m;
}

/* SipHash reads its message as little-endian words, whatever the host's order. */
static __always_inline __u64 le64(const __u8 *p)
{
	return (__u64)p[0] | (__u64)p[1] << 8 | (__u64)p[2] << 16 | (__u64)p[3] << 24 |
	       (__u64)p[4] << 32 | (__u64)p[5] << 40 | (__u64)p[6] << 48 | (__u64)p[7] << 56;
}

/* SipHash-2-4 of the 24 bytes at msg under the key (k0, k1). */
static __always_inline __u64 siphash24_24(__u64 k0, __u64 k1, const __u8 *msg)
{
	struct sipstate s = {
		.v0 = k0 ^ 0x736f6d6570736575ULL,
		.v1 = k1 ^ 0x646f72616e646f6dULL,
		.v2 = k0 ^ 0x6c7967656e657261ULL,
		.v3 = k1 ^ 0x7465646279746573ULL,
	};

	sipcompress(&s, le64(msg));
	sipcompress(&s, le64(msg + 8));
	sipcompress(&s, le64(msg + 16));
	/* The last block: no bytes left, the length (24) in the top byte. */
	sipcompress(&s, (__u64)24 << 56);
	/* d = 4 finalization rounds. */
	s.v2 ^= 0xff;
	sipround(&s);
	sipround(&s);
	sipround(&s);
	sipround(&s);
	return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

#endif /* KRACAUER_SIPHASH_H */

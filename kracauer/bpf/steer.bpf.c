/* SPDX-License-Identifier: MIT */
/*
 * kracauer's TUN queue steering: which worker reads a packet.
 *
 * Attached to the multi-queue TUN with TUNSETSTEERINGEBPF (a socket filter
 * program; drivers/net/tun.c runs it in tun_select_queue for every packet the
 * kernel hands the TUN, keeps 16 bits of the answer and takes them modulo the
 * number of queues). Attaching it also turns off the TUN's own flow learning,
 * which forgets a flow after 3 s and would then split its two directions.
 *
 * Both directions of a connection go to the worker that holds it: the key is
 * always the client (its IPv4 address and port), read from where each kind
 * of packet carries it. netstack/steer.py is the same function in Python,
 * and a test runs both on the same packets. Packets it cannot key on go to
 * queue 0.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define IPPROTO_ICMPV6_ 58

/* murmur3's 32-bit finalizer over (address ^ port * golden ratio). */
static __always_inline __u32 steer_hash(__u32 client, __u32 port)
{
	__u32 h = client ^ (port * 0x9E3779B1u);

	h ^= h >> 16;
	h *= 0x85EBCA6Bu;
	h ^= h >> 13;
	h *= 0xC2B2AE35u;
	h ^= h >> 16;
	return h & 0xFFFF;
}

/* A big-endian u32 and u16 read at `off` (the packet starts at its IP header: a TUN has no link layer). */
static __always_inline int load_u32(struct __sk_buff *skb, __u32 off, __u32 *out)
{
	__u32 v;

	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)) < 0)
		return -1;
	*out = bpf_ntohl(v);
	return 0;
}

static __always_inline int load_u16(struct __sk_buff *skb, __u32 off, __u32 *out)
{
	__u16 v;

	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)) < 0)
		return -1;
	*out = bpf_ntohs(v);
	return 0;
}

static __always_inline int load_u8(struct __sk_buff *skb, __u32 off, __u32 *out)
{
	__u8 v;

	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)) < 0)
		return -1;
	*out = v;
	return 0;
}

/* An IPv4 packet from a client: (source, source port); an ICMP error about
 * a packet kracauer sent to a client: (quoted destination, quoted destination port). */
static __always_inline __u32 steer_ipv4(struct __sk_buff *skb)
{
	__u32 first, proto, addr, port, ihl, type, inner_ihl;

	if (load_u8(skb, 0, &first) || load_u8(skb, 9, &proto))
		return 0;
	ihl = (first & 0x0F) * 4;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		if (load_u32(skb, 12, &addr) || load_u16(skb, ihl, &port))
			return 0;
		return steer_hash(addr, port);
	}
	if (proto != IPPROTO_ICMP || load_u8(skb, ihl, &type))
		return 0;
	if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
		return 0;
	if (load_u8(skb, ihl + 8, &first))
		return 0;
	inner_ihl = (first & 0x0F) * 4;
	if (load_u32(skb, ihl + 8 + 16, &addr) || load_u16(skb, ihl + 8 + inner_ihl + 2, &port))
		return 0;
	return steer_hash(addr, port);
}

/* An IPv6 packet from a host: (low 32 bits of the destination, destination
 * port); an ICMPv6 error about a packet kracauer sent to a host: (low 32 bits
 * of the quoted source, quoted source port). */
static __always_inline __u32 steer_ipv6(struct __sk_buff *skb)
{
	__u32 next, addr, port, type;

	if (load_u8(skb, 6, &next))
		return 0;
	if (next == IPPROTO_TCP || next == IPPROTO_UDP) {
		if (load_u32(skb, 36, &addr) || load_u16(skb, 42, &port))
			return 0;
		return steer_hash(addr, port);
	}
	if (next != IPPROTO_ICMPV6_ || load_u8(skb, 40, &type) || type < 1 || type > 4)
		return 0;
	if (load_u32(skb, 48 + 20, &addr) || load_u16(skb, 48 + 40, &port))
		return 0;
	return steer_hash(addr, port);
}

SEC("socket")
int kracauer_steer(struct __sk_buff *skb)
{
	__u32 first;

	if (load_u8(skb, 0, &first))
		return 0;
	if (first >> 4 == 4)
		return steer_ipv4(skb);
	if (first >> 4 == 6)
		return steer_ipv6(skb);
	return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * kracauer's kernel data path: established connections translated at the TUN.
 *
 * Attached (tc clsact, direct action) to the egress of kracauer's TUN. Every
 * packet the kernel routes into the TUN passes here first: a client's IPv4
 * packet to a service address, or a host's IPv6 packet to prefix::client. If
 * the packet belongs to a flow in the flow map and is a plain ACK or data
 * segment, it is translated here (the same rewrite as netstack/flow.py, byte
 * for byte) and redirected into the TUN's ingress: the kernel then routes it
 * as if kracauer had written it. Anything else goes on unchanged to the TUN
 * queue and kracauer's Python loop (TC_ACT_OK), which keeps the handshake,
 * the hello, FIN, RST, ICMP and whatever is unusual.
 *
 * UDP datagrams of quic listeners' flows are translated the same way once
 * user space has put the flow in the map: see "UDP" below.
 *
 * It also answers SYNs to kracauer's listeners with SYN cookies (RFC 4987
 * §3.6), turning the SYN into the SYN-ACK in place and sending it back the
 * same way, so that a SYN flood never reaches Python: see "SYN cookies" below.
 *
 * As in clatd.c: a straight line of bounds checks, then the rewrite; every
 * "cannot handle this" is an early pass to user space with its reason counted.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"
#include "siphash.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/*
 * A plain hash, not an LRU: an LRU would evict a connection's entry
 * silently (and early, when small: its free lists are per CPU), losing the
 * only copy of a parked connection's state. kracauer caps its connections and
 * sizes the map for two entries each, so it never fills; if it did, an update
 * fails and that connection stays on the Python path. Not preallocated: the
 * map takes memory for the connections there are, not for max_entries.
 * Either kind may hand a deleted element to the next update at once, so a
 * program still holding it on another CPU could read another connection's
 * entry: same_client() below checks the entry still names the packet's client.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, FLOW_MAX_DEFAULT);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xlat_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cookie_config);
} cookie_config SEC(".maps");

/* The listeners whose SYNs the program answers, and their budgets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LISTENERS_MAX);
	__type(key, struct listener_key);
	__type(value, struct listener_value);
} listeners SEC(".maps");

/* Per CPU: no atomics on the SYN path, and a budget that scales with the cores. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, LISTENERS_MAX);
	__type(key, struct listener_key);
	__type(value, struct syn_stats);
} syn_stats SEC(".maps");

#define TCP_MIN 20
#define TCP_MAX 60
/* A stack copy of the TCP header; indexes are masked with HDR_MASK so the
 * verifier can see every access stays inside it. */
#define HDR_SIZE 64
#define HDR_MASK 63

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define IPV4_DF 0x4000
#define IPV4_MF_OFFSET 0x3fff
/* RFC 7915 §5.1: DF only on translated packets larger than 1260 bytes. */
#define DF_THRESHOLD 1260

static __always_inline void count(__u32 stat, __u64 n)
{
	__u64 *slot = bpf_map_lookup_elem(&stats, &stat);

	if (slot)
		*slot += n;
}

static __always_inline int pass(__u32 reason)
{
	count(reason, 1);
	return TC_ACT_OK;
}

/* The entry found for a packet still belongs to its client (see the map's comment):
 * the client's address is in both directions' rewrite. */
static __always_inline int same_client(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* A helper failed after the packet was changed: it cannot go on half
 * translated, and TCP will send it again. */
static __always_inline int shot(void)
{
	count(STAT_DROP_ERROR, 1);
	return TC_ACT_SHOT;
}

static __always_inline __u32 get16(const __u8 *h, __u32 at)
{
	return (__u32)h[at & HDR_MASK] << 8 | h[(at + 1) & HDR_MASK];
}

static __always_inline void put16(__u8 *h, __u32 at, __u32 v)
{
	h[at & HDR_MASK] = v >> 8;
	h[(at + 1) & HDR_MASK] = v;
}

static __always_inline __u32 get32(const __u8 *h, __u32 at)
{
	return get16(h, at) << 16 | get16(h, at + 2);
}

static __always_inline void put32(__u8 *h, __u32 at, __u32 v)
{
	put16(h, at, v >> 16);
	put16(h, at + 2, v);
}

static __always_inline void add32(__u8 *h, __u32 at, __u32 delta)
{
	put32(h, at, get32(h, at) + delta);
}

/* RFC 9293 §3.4: a < b in sequence space. */
static __always_inline int seq_lt(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

/* A window in one scale expressed in another (RFC 7323 §2.3); rounded up so
 * that rounding never closes it. */
static __always_inline __u32 rescale(__u32 window, int shift)
{
	if (shift > 0)
		window <<= shift & 15;
	else if (shift < 0)
		window = (window + (1u << (-shift & 15)) - 1) >> (-shift & 15);
	return window > 0xffff ? 0xffff : window;
}

struct tcp_options {
	__u32 ts_at;        /* offset of TSval, 0: none */
	__u32 sack_at;      /* offset of the first SACK edge, 0: none */
	__u32 sack_blocks;
};

/* The option walk's state, for bpf_loop: one step per option. */
struct option_walk {
	const __u8 *h;
	__u32 hl;
	__u32 at;
	__s32 bad;
	struct tcp_options *opt;
};

/*
 * One step of RFC 9293 §3.1's option list, as netstack/tcp.py walks it (the
 * last timestamp and SACK option win). A malformed list marks the walk bad:
 * user space drops such a packet. bpf_loop keeps the verifier from exploring
 * every path through 40 unrolled steps.
 */
static long option_step(__u64 index, void *ctx)
{
	struct option_walk *w = ctx;
	const __u8 *h = w->h;
	__u32 at = w->at, kind, len;

	if (at >= w->hl)
		return 1;
	kind = h[at & HDR_MASK];
	if (kind == 0)			/* End of Option List */
		return 1;
	if (kind == 1) {		/* NOP */
		w->at = at + 1;
		return 0;
	}
	if (at + 1 >= w->hl)
		goto bad;
	len = h[(at + 1) & HDR_MASK];
	if (len < 2 || at + len > w->hl)
		goto bad;
	if (kind == 8 && len == 10) {			/* RFC 7323 §3.2 */
		w->opt->ts_at = at + 2;
	} else if (kind == 5 && (len - 2) % 8 == 0) {	/* RFC 2018 §3 */
		w->opt->sack_at = at + 2;
		w->opt->sack_blocks = (len - 2) / 8;
	}
	w->at = at + len;
	return 0;
bad:
	w->bad = 1;
	return 1;
}

/* At most 40 option bytes, so 40 steps cover a list of NOPs. */
static __always_inline int parse_options(const __u8 *h, __u32 hl, struct tcp_options *opt)
{
	struct option_walk w = { .h = h, .hl = hl, .at = TCP_MIN, .opt = opt };

	opt->ts_at = opt->sack_at = opt->sack_blocks = 0;
	/* Linux's data segments carry exactly NOP NOP TS (RFC 7323 Appendix A). */
	if (hl == 32 && h[20] == 1 && h[21] == 1 && h[22] == 8 && h[23] == 10) {
		opt->ts_at = 24;
		return 0;
	}
	if (hl > TCP_MIN)
		bpf_loop(TCP_MAX - TCP_MIN, option_step, &w, 0);
	return w.bad ? -1 : 0;
}

/*
 * The TCP part of the rewrite, on the stack copy `h` (DESIGN.md step 4):
 * ports; SEG.SEQ moved by seq_add; SEG.ACK and SACK edges (which name the
 * other side's sequence space) by ack_add; TSval and TSecr by their offsets;
 * the window rescaled. The checksum field is left as it was: the caller fixes
 * it incrementally from the difference of the two copies.
 */
static __always_inline void rewrite_tcp(__u8 *h, __u32 flags, const struct tcp_options *opt,
					const struct flow_value *f)
{
	__builtin_memcpy(h, &f->sport, 2);
	__builtin_memcpy(h + 2, &f->dport, 2);
	add32(h, 4, f->seq_add);
	if (flags & TCPF_ACK)
		add32(h, 8, f->ack_add);
	if (f->wscale_shift)
		put16(h, 14, rescale(get16(h, 14), f->wscale_shift));
	if (opt->ts_at) {
		add32(h, opt->ts_at, f->tsval_add);
		add32(h, opt->ts_at + 4, f->tsecr_add);
	}
	for (__u32 i = 0; i < 8; i++) {		/* at most 4 blocks, 2 edges each */
		if (i >= opt->sack_blocks * 2)
			break;
		add32(h, opt->sack_at + 4 * i, f->ack_add);
	}
}

/* What the program tracks for user space (see struct flow_value). */
static __always_inline void track(struct flow_value *f, const __u8 *h, __u32 flags, __u32 payload)
{
	__u32 seq_end = get32(h, 4) + payload;
	__u32 window = get16(h, 14);

	if ((flags & TCPF_ACK) && seq_lt(f->ack_max, get32(h, 8)))
		f->ack_max = get32(h, 8);
	if (seq_lt(f->seq_next, seq_end))
		f->seq_next = seq_end;
	f->window = window;
	if (window > f->window_max)
		f->window_max = window;
	f->last_seen = bpf_ktime_get_ns();
}

/*
 * Read the TCP header at `off` into `h` and check what the fast path takes:
 * no SYN, FIN or RST (user space keeps the state machine), well-formed options.
 * Returns the header length, or 0 after counting why the packet passes.
 */
static __always_inline __u32 load_tcp(struct __sk_buff *skb, __u32 off, __u32 tcp_len, __u8 *h,
				      struct tcp_options *opt)
{
	__u32 hl;

	if (tcp_len < TCP_MIN || bpf_skb_load_bytes(skb, off, h, TCP_MIN))
		goto length;
	hl = (h[12] >> 4) * 4;
	if (hl < TCP_MIN || hl > tcp_len)
		goto length;
	if (h[13] & (TCPF_SYN | TCPF_FIN | TCPF_RST)) {
		pass(STAT_PASS_FLAGS);
		return 0;
	}
	/* hl is at most 60 (a 4-bit word count), so this stays inside h. */
	if (hl > TCP_MIN && bpf_skb_load_bytes(skb, off + TCP_MIN, h + TCP_MIN, hl - TCP_MIN))
		goto length;
	if (parse_options(h, hl, opt)) {
		pass(STAT_PASS_TCP_OPTIONS);
		return 0;
	}
	return hl;
length:
	pass(STAT_PASS_LENGTH);
	return 0;
}

/* Store the rewritten header and fix the TCP checksum for it and for the new
 * pseudo-header addresses (RFC 1624). Under CHECKSUM_PARTIAL the kernel's
 * helper only applies the pseudo-header part, as the TCP bytes are summed
 * when the segments are made. */
static __always_inline int store_tcp(struct __sk_buff *skb, __u32 off, const __u8 *old, const __u8 *new,
				     __u32 hl, __s64 pseudo_diff)
{
	__s64 diff = bpf_csum_diff((__be32 *)old, hl & 60, (__be32 *)new, hl & 60, 0);

	if (diff < 0 || pseudo_diff < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off, new, hl & 60, BPF_F_RECOMPUTE_CSUM))
		return -1;
	if (bpf_l4_csum_replace(skb, off + 16, 0, pseudo_diff, BPF_F_PSEUDO_HDR))
		return -1;
	return bpf_l4_csum_replace(skb, off + 16, 0, diff, 0);
}

static __always_inline void *flow_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

/* ------------------------------------------------------------ SYN cookies */

/*
 * RFC 4987 §3.6: a SYN to one of kracauer's listeners is answered here with a
 * SYN cookie, keeping nothing, exactly as netstack/tracker.py's
 * _cookie_syn_ack answers it: the same ISN (netstack/syncookie.py's cookie,
 * from the same secret), the same options in the same order (netstack/tcp.py's
 * syn_options), the same window, TTL 64. The SYN becomes the SYN-ACK in place
 * and goes back into the TUN's ingress, so the kernel routes it to the client;
 * the client's ACK comes to Python (no flow in the map), which rebuilds the
 * connection from the cookie. A SYN flood then costs Python nothing.
 *
 * Left to Python, as before: a SYN of a connection in the flow map (a parked
 * one: Python takes it back), SYNs carrying data, IP options or fragments,
 * malformed options, addresses and ports that are no listener; and, while the
 * listener's budget lasts, SYNs without timestamps. A cookie keeps the
 * client's window scale and SACK-permitted in the low bits of its TSval, so a
 * SYN with timestamps loses nothing; without timestamps a cookie can keep
 * neither, while Python's answer, with state, keeps both (Windows sends no
 * timestamps). Past python_syn_rate such SYNs a second (per CPU) the program
 * answers them too, as Linux's own cookies do, without window scale and SACK.
 *
 * The SYN-ACK's IP Identification is random here and a counter in Python: the
 * one field that differs. RFC 6864 §4.1 asks only that it not repeat soon
 * between two addresses.
 */

#define TICK_NS 64000000000ULL	/* the cookie counter's tick: 64 s */
#define MS_NS 1000000ULL	/* kracauer's timestamps count milliseconds */
#define SEC_NS 1000000000ULL
#define DEFAULT_MSS 536		/* RFC 9293 §3.7.1: no MSS option */
#define MIN_MSS 48		/* netstack/tracker.py's MIN_MSS */
#define MAX_WSCALE 14		/* RFC 7323 §2.3 */
#define NO_WSCALE 15
#define TS_OPTION_MASK 63	/* the TSval bits that carry the client's options */

struct syn_options {
	__s32 mss;		/* -1: none */
	__s32 wscale;		/* -1: none; else at most 14 */
	__u32 sack;		/* SACK-permitted */
	__u32 ts_at;		/* offset of TSval, 0: none */
};

struct syn_walk {
	const __u8 *h;
	__u32 hl;
	__u32 at;
	__s32 bad;
	struct syn_options *opt;
};

/* One step of a SYN's option list, as netstack/tcp.py's TcpHeader reads it
 * (RFC 9293 §3.1): the last option of a kind wins, one of the wrong length is
 * skipped, one running past the header makes the list malformed. */
static long syn_option_step(__u64 index, void *ctx)
{
	struct syn_walk *w = ctx;
	const __u8 *h = w->h;
	__u32 at = w->at, kind, len, shift;

	if (at >= w->hl)
		return 1;
	kind = h[at & HDR_MASK];
	if (kind == 0)			/* End of Option List */
		return 1;
	if (kind == 1) {		/* NOP */
		w->at = at + 1;
		return 0;
	}
	if (at + 1 >= w->hl)
		goto bad;
	len = h[(at + 1) & HDR_MASK];
	if (len < 2 || at + len > w->hl)
		goto bad;
	if (kind == 2 && len == 4) {			/* RFC 9293 §3.7.1: MSS */
		w->opt->mss = get16(h, at + 2);
	} else if (kind == 3 && len == 3) {		/* RFC 7323 §2.3: shifts above 14 are 14 */
		shift = h[(at + 2) & HDR_MASK];
		w->opt->wscale = shift > MAX_WSCALE ? MAX_WSCALE : shift;
	} else if (kind == 4 && len == 2) {		/* RFC 2018 §2: SACK-permitted */
		w->opt->sack = 1;
	} else if (kind == 8 && len == 10) {		/* RFC 7323 §3.2: timestamps */
		w->opt->ts_at = at + 2;
	}
	w->at = at + len;
	return 0;
bad:
	w->bad = 1;
	return 1;
}

static __always_inline int parse_syn_options(const __u8 *h, __u32 hl, struct syn_options *opt)
{
	struct syn_walk w = { .h = h, .hl = hl, .at = TCP_MIN, .opt = opt };

	opt->mss = opt->wscale = -1;
	opt->sack = opt->ts_at = 0;
	/* netstack/tcp.py takes exactly NOP NOP TS as that, and nothing else. */
	if (hl == 32 && h[20] == 1 && h[21] == 1 && h[22] == 8 && h[23] == 10) {
		opt->ts_at = 24;
		return 0;
	}
	if (hl > TCP_MIN)
		bpf_loop(TCP_MAX - TCP_MIN, syn_option_step, &w, 0);
	return w.bad ? -1 : 0;
}

/* netstack/syncookie.py's MSS_TABLE: the client's MSS rounded down to one of
 * (536, 1220, 1300, 1360, 1400, 1440, 1460, 8960), the first if below all. */
static __always_inline __u32 mss_index(__u32 mss)
{
	if (mss >= 8960)
		return 7;
	if (mss >= 1460)
		return 6;
	if (mss >= 1440)
		return 5;
	if (mss >= 1400)
		return 4;
	if (mss >= 1360)
		return 3;
	if (mss >= 1300)
		return 2;
	if (mss >= 1220)
		return 1;
	return 0;
}

/* netstack/syncookie.py's _hash: SipHash-2-4 of the 24-byte MESSAGE (tick
 * counter, client and service addresses and ports, client ISN, MSS index).
 * `h` is the SYN's TCP header: ports and sequence number in network order. */
static __always_inline __u64 cookie_hash(const struct cookie_config *cc, __u32 counter, const struct iphdr *ip,
					 const __u8 *h, __u32 index)
{
	__u8 msg[24] = {};

	msg[0] = counter >> 24;
	msg[1] = counter >> 16;
	msg[2] = counter >> 8;
	msg[3] = counter;
	__builtin_memcpy(msg + 4, &ip->saddr, 4);
	__builtin_memcpy(msg + 8, &ip->daddr, 4);
	__builtin_memcpy(msg + 12, h, 4);	/* client port, service port */
	__builtin_memcpy(msg + 16, h + 4, 4);	/* the client's ISN */
	msg[20] = index;
	return siphash24_24(cc->key[0], cc->key[1], msg);
}

/* netstack/syncookie.py's encode_options: window scale (15: none) and SACK in
 * TSval's low bits, never ahead of the clock (RFC 7323 §5.3: PAWS). */
static __always_inline __u32 encode_ts_options(__u32 tsval, __s32 wscale, __u32 sack)
{
	__u32 bits = (wscale < 0 ? NO_WSCALE : (__u32)wscale) << 1 | sack;
	__u32 ts = (tsval & ~(__u32)TS_OPTION_MASK) | bits;

	if (bits > (tsval & TS_OPTION_MASK))
		ts -= TS_OPTION_MASK + 1;
	return ts;
}

/* The listener's budget of SYNs without timestamps for user space, on this
 * CPU and in this second: 1 while it lasts (the SYN is handed on), else 0. */
static __always_inline int python_takes(const struct listener_value *l, struct syn_stats *st, __u64 now)
{
	__u64 second = now / SEC_NS;

	if (!l->python_syn_rate)
		return 0;
	if (!st)		/* user space made no counters: it keeps its SYNs */
		return 1;
	if (st->second != second) {
		st->second = second;
		st->used = 0;
	}
	if (st->used >= l->python_syn_rate)
		return 0;
	st->used++;
	st->passed++;
	return 1;
}

/* The SYN-ACK's options, as netstack/tcp.py's syn_options lays them out (as
 * Linux does): MSS; then SACK-permitted (or NOP NOP) and timestamps, or NOP
 * NOP SACK-permitted; then NOP and window scale. Returns the header length. */
static __always_inline __u32 syn_ack_options(__u8 *o, const struct cookie_config *cc,
					     const struct syn_options *opt, __u32 tsval, __u32 tsecr)
{
	__u32 n = TCP_MIN;

	o[n] = 2;
	o[n + 1] = 4;
	put16(o, n + 2, cc->mss);
	n += 4;
	if (opt->ts_at) {
		o[n & HDR_MASK] = opt->sack ? 4 : 1;
		o[(n + 1) & HDR_MASK] = opt->sack ? 2 : 1;
		o[(n + 2) & HDR_MASK] = 8;
		o[(n + 3) & HDR_MASK] = 10;
		put32(o, n + 4, tsval);
		put32(o, n + 8, tsecr);
		n += 12;
	} else if (opt->sack) {
		o[n & HDR_MASK] = 1;
		o[(n + 1) & HDR_MASK] = 1;
		o[(n + 2) & HDR_MASK] = 4;
		o[(n + 3) & HDR_MASK] = 2;
		n += 4;
	}
	if (opt->wscale >= 0) {
		o[n & HDR_MASK] = 1;
		o[(n + 1) & HDR_MASK] = 3;
		o[(n + 2) & HDR_MASK] = 3;
		o[(n + 3) & HDR_MASK] = cc->wscale;
		n += 4;
	}
	return n;
}

static __always_inline const struct cookie_config *get_cookie_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cookie_config, &zero);
}

/*
 * A bare SYN (SYN without ACK, RST or FIN) from a client, IPv4 without
 * options or fragments, its length checked by the caller: answered with a
 * cookie SYN-ACK and redirected, or passed on to user space (counted as a
 * packet with SYN, FIN or RST, as before). A function of its own (a BPF
 * subprogram, as are to_host and to_client): the verifier adds up the
 * frames of a call chain, and the three paths' buffers do not fit one.
 */
static __noinline int syn_to_listener(struct __sk_buff *skb, const struct xlat_config *cfg)
{
	__u32 l3 = cfg->l3_offset & 63, off = l3 + sizeof(struct iphdr), tcp_len;
	__u8 old[HDR_SIZE] = {}, h[HDR_SIZE] = {};
	const struct cookie_config *cc = get_cookie_config();
	struct listener_key lkey = {};
	struct flow_key key = { .family = 4 };
	struct listener_value *l;
	struct syn_stats *st;
	struct syn_options opt;
	struct iphdr in, out = {};
	const struct iphdr *ip = &in;
	__u32 hl, out_hl, client_mss, index, counter, isn, tsval = 0, tsecr = 0;
	__be32 len_old, len_new;
	__s64 diff, pseudo;
	__u64 now, hash, sum;

	if (!cc || !(cc->flags & COOKIE_F_ENABLED))
		return pass(STAT_PASS_FLAGS);
	/* to_host checked the IP header: no options, no fragment, the length right. */
	if (bpf_skb_load_bytes(skb, l3, &in, sizeof(in)))
		return pass(STAT_PASS_LENGTH);
	tcp_len = bpf_ntohs(in.tot_len) - sizeof(in);
	if (bpf_skb_load_bytes(skb, off, old, TCP_MIN))
		return pass(STAT_PASS_LENGTH);
	hl = (old[12] >> 4) * 4;
	/* A SYN with data (TCP Fast Open) is user space's: the cookie answers only the SYN. */
	if (hl < TCP_MIN || hl != tcp_len)
		return pass(STAT_PASS_FLAGS);
	/* The whole header again (20 to 60 bytes: never a zero-sized load for the verifier). */
	if (bpf_skb_load_bytes(skb, off, old, hl & 60))
		return pass(STAT_PASS_LENGTH);

	__builtin_memcpy(lkey.addr, &ip->daddr, 4);
	__builtin_memcpy(&lkey.port, old + 2, 2);
	l = bpf_map_lookup_elem(&listeners, &lkey);
	if (!l)
		return pass(STAT_PASS_FLAGS);
	/* A connection the kernel carries: user space takes it back and decides. */
	__builtin_memcpy(key.src, &ip->saddr, 4);
	__builtin_memcpy(key.dst, &ip->daddr, 4);
	__builtin_memcpy(&key.sport, old, 2);
	__builtin_memcpy(&key.dport, old + 2, 2);
	if (bpf_map_lookup_elem(&flows, &key))
		return pass(STAT_PASS_FLAGS);
	if (parse_syn_options(old, hl, &opt))
		return pass(STAT_PASS_TCP_OPTIONS);

	now = cc->clock_ns ? cc->clock_ns : bpf_ktime_get_ns();
	st = bpf_map_lookup_elem(&syn_stats, &lkey);
	if (!opt.ts_at) {
		if (python_takes(l, st, now))
			return pass(STAT_PASS_FLAGS);
		/* No timestamps: nowhere to keep window scale and SACK (as _cookie_syn_ack). */
		opt.wscale = -1;
		opt.sack = 0;
	}

	/* The cookie (netstack/syncookie.py's SynCookies.make). */
	client_mss = opt.mss < 0 ? DEFAULT_MSS : (opt.mss < MIN_MSS ? MIN_MSS : opt.mss);
	index = mss_index(client_mss);
	counter = now / TICK_NS;
	hash = cookie_hash(cc, counter, ip, old, index);
	isn = (__u32)(hash & 0xffffff) << 8 | (counter & 31) << 3 | index;
	if (opt.ts_at) {
		/* The timestamp base (the hash's high half) plus milliseconds, as _our_tsval. */
		tsval = encode_ts_options((__u32)(hash >> 32) + (__u32)(now / MS_NS), opt.wscale, opt.sack);
		tsecr = get32(old, opt.ts_at);
	}

	/* The SYN-ACK's TCP header, the checksum field kept for the incremental update. */
	__builtin_memcpy(h, old + 2, 2);
	__builtin_memcpy(h + 2, old, 2);
	put32(h, 4, isn);
	put32(h, 8, get32(old, 4) + 1);
	out_hl = syn_ack_options(h, cc, &opt, tsval, tsecr);
	h[12] = (out_hl / 4) << 4;
	h[13] = TCPF_SYN | TCPF_ACK;
	put16(h, 14, cc->window);
	h[16] = old[16];
	h[17] = old[17];

	/* RFC 1624: the checksum moves by what the header's words and the
	 * pseudo-header's length moved; swapping the addresses moves nothing. */
	diff = bpf_csum_diff((__be32 *)old, hl & 60, (__be32 *)h, out_hl & 60, 0);
	len_old = bpf_htonl(hl);
	len_new = bpf_htonl(out_hl);
	pseudo = bpf_csum_diff(&len_old, 4, &len_new, 4, 0);
	if (diff < 0 || pseudo < 0)
		return pass(STAT_PASS_ERROR);

	/* netstack/ip.py's build_ipv4_header: no DF at this size, TTL 64. */
	out.version = 4;
	out.ihl = 5;
	out.tot_len = bpf_htons(sizeof(out) + out_hl);
	out.id = bpf_htons(bpf_get_prandom_u32() & 0xffff);
	out.ttl = 64;
	out.protocol = IPPROTO_TCP;
	out.saddr = ip->daddr;
	out.daddr = ip->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&out, sizeof(out), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	out.check = ~sum & 0xffff;

	if (bpf_skb_change_tail(skb, off + out_hl, 0))
		return pass(STAT_PASS_ERROR);
	if (bpf_skb_store_bytes(skb, l3, &out, sizeof(out), BPF_F_RECOMPUTE_CSUM))
		return shot();
	if (bpf_skb_store_bytes(skb, off, h, out_hl & 60, BPF_F_RECOMPUTE_CSUM))
		return shot();
	if (bpf_l4_csum_replace(skb, off + 16, 0, pseudo, BPF_F_PSEUDO_HDR))
		return shot();
	if (bpf_l4_csum_replace(skb, off + 16, 0, diff, 0))
		return shot();
	if (st)
		st->cookies++;
	return bpf_redirect(cfg->redirect_ifindex, BPF_F_INGRESS);
}

/* to_host's answer for a bare SYN: the caller hands it to syn_to_listener. */
#define TO_LISTENER -1
/* to_host's and to_client's answer for a UDP datagram: for udp_to_host or udp_to_client. */
#define TO_UDP -2

/* Client to host: IPv4 in, IPv6 out (RFC 7915 §4). */
static __noinline int to_host(struct __sk_buff *skb, const struct xlat_config *cfg)
{
	__u32 l3 = cfg->l3_offset & 63;
	__u8 old[HDR_SIZE] = {}, h[HDR_SIZE] = {};
	struct tcp_options opt;
	struct flow_key key = { .family = 4 };
	struct flow_value *f;
	struct iphdr ip;
	struct ipv6hdr ip6 = {};
	__u32 tot_len, tcp_len, hl, payload;
	__u8 flags;
	__s64 pseudo;

	if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
		return pass(STAT_PASS_LENGTH);
	if (ip.protocol == IPPROTO_UDP)
		return TO_UDP;
	if (ip.protocol != IPPROTO_TCP)
		return pass(STAT_PASS_NOT_TCP);
	if (ip.ihl != 5)
		return pass(STAT_PASS_IP_OPTIONS);
	if (bpf_ntohs(ip.frag_off) & IPV4_MF_OFFSET)
		return pass(STAT_PASS_FRAGMENT);
	tot_len = bpf_ntohs(ip.tot_len);
	/* BIG TCP (tot_len 0) and trailing padding are for user space. */
	if (tot_len != skb->len - l3)
		return pass(STAT_PASS_LENGTH);
	tcp_len = tot_len - sizeof(ip);
	/* A bare SYN: for syn_to_listener (see "SYN cookies"). */
	if (tcp_len >= TCP_MIN && !bpf_skb_load_bytes(skb, l3 + sizeof(ip) + 13, &flags, 1) &&
	    (flags & (TCPF_SYN | TCPF_ACK | TCPF_RST | TCPF_FIN)) == TCPF_SYN)
		return TO_LISTENER;
	/* kracauer routes: a packet that would leave with TTL 0 is user space's to drop. */
	if (ip.ttl <= 1)
		return pass(STAT_PASS_TTL);
	hl = load_tcp(skb, l3 + sizeof(ip), tcp_len, h, &opt);
	if (!hl)
		return TC_ACT_OK;

	__builtin_memcpy(key.src, &ip.saddr, 4);
	__builtin_memcpy(key.dst, &ip.daddr, 4);
	__builtin_memcpy(&key.sport, h, 2);
	__builtin_memcpy(&key.dport, h + 2, 2);
	f = bpf_map_lookup_elem(&flows, &key);
	/* Client to host: the new source is prefix::client. */
	if (!f || f->family != 6 || !same_client(f->src + 12, key.src))
		return pass(STAT_PASS_NO_FLOW);
	/* Segments must still fit the IPv6 side once the header grows. */
	if (skb->gso_size && skb->gso_size + hl > (__u32)f->mss + TCP_MIN)
		return pass(STAT_PASS_GSO);

	__builtin_memcpy(old, h, HDR_SIZE);
	payload = tcp_len - hl;
	track(f, h, h[13], payload);
	rewrite_tcp(h, h[13], &opt, f);
	pseudo = bpf_csum_diff((__be32 *)&ip.saddr, 8, (__be32 *)f->src, 32, 0);

	/* RFC 7915 §4.1: traffic class from TOS, flow label 0, hop limit from TTL
	 * (decremented: kracauer is a router), next header from protocol. */
	ip6.version = 6;
	ip6.priority = ip.tos >> 4;
	ip6.flow_lbl[0] = (ip.tos & 0x0f) << 4;
	ip6.payload_len = bpf_htons(tcp_len);
	ip6.nexthdr = IPPROTO_TCP;
	ip6.hop_limit = ip.ttl - 1;
	__builtin_memcpy(&ip6.saddr, f->src, 16);
	__builtin_memcpy(&ip6.daddr, f->dst, 16);

	if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0))
		return pass(STAT_PASS_ERROR);
	if (bpf_skb_store_bytes(skb, l3, &ip6, sizeof(ip6), BPF_F_RECOMPUTE_CSUM))
		return shot();	/* half rewritten: nothing sane to pass on */
	if (store_tcp(skb, l3 + sizeof(ip6), old, h, hl, pseudo))
		return shot();

	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, payload);
	count(STAT_TO_HOST_PACKETS, 1);
	count(STAT_TO_HOST_BYTES, payload);
	return bpf_redirect(cfg->redirect_ifindex, BPF_F_INGRESS);
}

/* Host to client: IPv6 in, IPv4 out (RFC 7915 §5). */
static __noinline int to_client(struct __sk_buff *skb, const struct xlat_config *cfg)
{
	__u32 l3 = cfg->l3_offset & 63;
	__u8 old[HDR_SIZE] = {}, h[HDR_SIZE] = {};
	struct tcp_options opt;
	struct flow_key key = { .family = 6 };
	struct flow_value *f;
	struct ipv6hdr ip6;
	struct iphdr ip = {};
	__u32 tcp_len, hl, payload, tos;
	__s64 pseudo;
	__u64 sum;

	if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)))
		return pass(STAT_PASS_LENGTH);
	if (ip6.nexthdr == IPPROTO_UDP)
		return TO_UDP;
	/* Hosts send TCP without extension headers; anything else is user space's. */
	if (ip6.nexthdr != IPPROTO_TCP)
		return pass(STAT_PASS_NOT_TCP);
	tcp_len = bpf_ntohs(ip6.payload_len);
	/* BIG TCP (payload length 0, a jumbogram) does not fit IPv4 at all. */
	if (!tcp_len || tcp_len != skb->len - l3 - sizeof(ip6) || tcp_len + sizeof(ip) > 0xffff)
		return pass(STAT_PASS_LENGTH);
	if (ip6.hop_limit <= 1)
		return pass(STAT_PASS_TTL);
	hl = load_tcp(skb, l3 + sizeof(ip6), tcp_len, h, &opt);
	if (!hl)
		return TC_ACT_OK;

	__builtin_memcpy(key.src, &ip6.saddr, 16);
	__builtin_memcpy(key.dst, &ip6.daddr, 16);
	__builtin_memcpy(&key.sport, h, 2);
	__builtin_memcpy(&key.dport, h + 2, 2);
	f = bpf_map_lookup_elem(&flows, &key);
	/* Host to client: the packet goes to prefix::client, and out to the client. */
	if (!f || f->family != 4 || !same_client(f->dst, key.dst + 12))
		return pass(STAT_PASS_NO_FLOW);
	/* Segments must fit the client's MSS, which counts no options. */
	if (skb->gso_size && skb->gso_size + hl > (__u32)f->mss + TCP_MIN)
		return pass(STAT_PASS_GSO);

	__builtin_memcpy(old, h, HDR_SIZE);
	payload = tcp_len - hl;
	track(f, h, h[13], payload);
	rewrite_tcp(h, h[13], &opt, f);

	/* RFC 7915 §5.1: TOS from traffic class, TTL from hop limit (decremented),
	 * DF only above 1260 bytes. RFC 6864 §4: the Identification need only be
	 * unique per flow, so it counts the flow's packets (as netstack/flow.py). */
	tos = ip6.priority << 4 | ip6.flow_lbl[0] >> 4;
	ip.version = 4;
	ip.ihl = 5;
	ip.tos = tos;
	ip.tot_len = bpf_htons(tcp_len + sizeof(ip));
	ip.id = bpf_htons(f->packets & 0xffff);
	ip.frag_off = tcp_len + sizeof(ip) > DF_THRESHOLD ? bpf_htons(IPV4_DF) : 0;
	ip.ttl = ip6.hop_limit - 1;
	ip.protocol = IPPROTO_TCP;
	__builtin_memcpy(&ip.saddr, f->src, 4);
	__builtin_memcpy(&ip.daddr, f->dst, 4);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip.check = ~sum & 0xffff;
	/* saddr and daddr sit side by side in the header, as in the pseudo-header. */
	pseudo = bpf_csum_diff((__be32 *)&ip6.saddr, 32, (__be32 *)&ip.saddr, 8, 0);

	if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0))
		return pass(STAT_PASS_ERROR);
	if (bpf_skb_store_bytes(skb, l3, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM))
		return shot();
	if (store_tcp(skb, l3 + sizeof(ip), old, h, hl, pseudo))
		return shot();

	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, payload);
	count(STAT_TO_CLIENT_PACKETS, 1);
	count(STAT_TO_CLIENT_BYTES, payload);
	return bpf_redirect(cfg->redirect_ifindex, BPF_F_INGRESS);
}

/* -------------------------------------------------------------------- UDP */

/*
 * A quic listener's flow, once user space has bound it to a host and seen
 * the host's handshake (netstack/udptracker.py puts it in the map at the
 * host's first short-header packet): every datagram of it is translated here
 * as netstack/udp.py translates it, byte for byte. The program reads no QUIC:
 * the Initials, the hello, refusals, NAT rebinding (a new 4-tuple has no
 * entry) and ICMP stay with user space.
 *
 * Passed on to user space, the entries left in place: IPv4 options and
 * fragments (RFC 7915 §4.1 drops options; QUIC sets DF), a UDP length that is
 * not the IP payload's, TTL or hop limit 1, GSO super-packets, and a zero
 * checksum: IPv4's "no checksum" must become a computed one in IPv6 (RFC 8200
 * §8.1, RFC 7915 §4.5), which needs the whole datagram; IPv6's 0 is invalid
 * and user space drops it.
 */

/* The checksum moves by the pseudo-header's addresses (RFC 1624; under
 * CHECKSUM_PARTIAL that is all the field holds) and by the ports, the only
 * words of the datagram that change. BPF_F_MARK_MANGLED_0: a result of 0 is
 * sent as 0xFFFF (RFC 768). */
static __always_inline int store_udp(struct __sk_buff *skb, __u32 off, const struct udphdr *old,
				     const struct udphdr *new, __s64 pseudo_diff)
{
	__s64 diff = bpf_csum_diff((__be32 *)old, 4, (__be32 *)new, 4, 0);

	if (diff < 0 || pseudo_diff < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off, new, 4, BPF_F_RECOMPUTE_CSUM))
		return -1;
	if (bpf_l4_csum_replace(skb, off + 6, 0, pseudo_diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return -1;
	return bpf_l4_csum_replace(skb, off + 6, 0, diff, BPF_F_MARK_MANGLED_0);
}

/* The UDP header at `off`, `udp_len` bytes from there to the packet's end:
 * 0 if the program takes the datagram, else the reason it passes. */
static __always_inline __u32 load_udp(struct __sk_buff *skb, __u32 off, __u32 udp_len, struct udphdr *udp)
{
	if (udp_len < sizeof(*udp) || bpf_skb_load_bytes(skb, off, udp, sizeof(*udp)))
		return STAT_PASS_LENGTH;
	if (bpf_ntohs(udp->len) != udp_len)
		return STAT_PASS_LENGTH;
	if (!udp->check)
		return STAT_PASS_UDP_CHECKSUM;
	/* One datagram per skb: a UDP GSO train would need its segments' checksums (user space's). */
	if (skb->gso_size)
		return STAT_PASS_GSO;
	return 0;
}

/* Client to host: IPv4 in, IPv6 out (RFC 7915 §4.1, §4.5). */
static __noinline int udp_to_host(struct __sk_buff *skb, const struct xlat_config *cfg)
{
	__u32 l3 = cfg->l3_offset & 63;
	struct flow_key key = { .family = 4, .l4 = FLOW_L4_UDP };
	struct flow_value *f;
	struct iphdr ip;
	struct ipv6hdr ip6 = {};
	struct udphdr old, udp;
	__u32 tot_len, udp_len, reason;
	__s64 pseudo;

	if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
		return pass(STAT_PASS_LENGTH);
	if (ip.ihl != 5)
		return pass(STAT_PASS_IP_OPTIONS);
	if (bpf_ntohs(ip.frag_off) & IPV4_MF_OFFSET)
		return pass(STAT_PASS_FRAGMENT);
	tot_len = bpf_ntohs(ip.tot_len);
	if (tot_len != skb->len - l3)
		return pass(STAT_PASS_LENGTH);
	udp_len = tot_len - sizeof(ip);
	reason = load_udp(skb, l3 + sizeof(ip), udp_len, &udp);
	if (reason)
		return pass(reason);
	if (ip.ttl <= 1)
		return pass(STAT_PASS_TTL);

	__builtin_memcpy(key.src, &ip.saddr, 4);
	__builtin_memcpy(key.dst, &ip.daddr, 4);
	key.sport = udp.source;
	key.dport = udp.dest;
	f = bpf_map_lookup_elem(&flows, &key);
	if (!f || f->family != 6 || !same_client(f->src + 12, key.src))
		return pass(STAT_PASS_NO_FLOW);

	old = udp;
	udp.source = f->sport;
	udp.dest = f->dport;
	pseudo = bpf_csum_diff((__be32 *)&ip.saddr, 8, (__be32 *)f->src, 32, 0);

	/* RFC 7915 §4.1: traffic class from TOS (the ECN bits with it), flow
	 * label 0, hop limit from TTL less one, next header UDP. */
	ip6.version = 6;
	ip6.priority = ip.tos >> 4;
	ip6.flow_lbl[0] = (ip.tos & 0x0f) << 4;
	ip6.payload_len = bpf_htons(udp_len);
	ip6.nexthdr = IPPROTO_UDP;
	ip6.hop_limit = ip.ttl - 1;
	__builtin_memcpy(&ip6.saddr, f->src, 16);
	__builtin_memcpy(&ip6.daddr, f->dst, 16);

	if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0))
		return pass(STAT_PASS_ERROR);
	if (bpf_skb_store_bytes(skb, l3, &ip6, sizeof(ip6), BPF_F_RECOMPUTE_CSUM))
		return shot();
	if (store_udp(skb, l3 + sizeof(ip6), &old, &udp, pseudo))
		return shot();

	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, udp_len - sizeof(udp));
	f->last_seen = bpf_ktime_get_ns();
	count(STAT_TO_HOST_PACKETS, 1);
	count(STAT_TO_HOST_BYTES, udp_len - sizeof(udp));
	return bpf_redirect(cfg->redirect_ifindex, BPF_F_INGRESS);
}

/* Host to client: IPv6 in, IPv4 out (RFC 7915 §5.1, §5.5). */
static __noinline int udp_to_client(struct __sk_buff *skb, const struct xlat_config *cfg)
{
	__u32 l3 = cfg->l3_offset & 63;
	struct flow_key key = { .family = 6, .l4 = FLOW_L4_UDP };
	struct flow_value *f;
	struct ipv6hdr ip6;
	struct iphdr ip = {};
	struct udphdr old, udp;
	__u32 udp_len, reason;
	__s64 pseudo;
	__u64 sum;

	if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)))
		return pass(STAT_PASS_LENGTH);
	udp_len = bpf_ntohs(ip6.payload_len);
	/* A jumbogram (payload length 0) does not fit IPv4. */
	if (!udp_len || udp_len != skb->len - l3 - sizeof(ip6) || udp_len + sizeof(ip) > 0xffff)
		return pass(STAT_PASS_LENGTH);
	reason = load_udp(skb, l3 + sizeof(ip6), udp_len, &udp);
	if (reason)
		return pass(reason);
	if (ip6.hop_limit <= 1)
		return pass(STAT_PASS_TTL);

	__builtin_memcpy(key.src, &ip6.saddr, 16);
	__builtin_memcpy(key.dst, &ip6.daddr, 16);
	key.sport = udp.source;
	key.dport = udp.dest;
	f = bpf_map_lookup_elem(&flows, &key);
	if (!f || f->family != 4 || !same_client(f->dst, key.dst + 12))
		return pass(STAT_PASS_NO_FLOW);

	old = udp;
	udp.source = f->sport;
	udp.dest = f->dport;

	/* RFC 7915 §5.1 as for TCP: TOS from traffic class, TTL from hop limit
	 * less one, DF above 1260 bytes, the Identification the flow's count. */
	ip.version = 4;
	ip.ihl = 5;
	ip.tos = ip6.priority << 4 | ip6.flow_lbl[0] >> 4;
	ip.tot_len = bpf_htons(udp_len + sizeof(ip));
	ip.id = bpf_htons(f->packets & 0xffff);
	ip.frag_off = udp_len + sizeof(ip) > DF_THRESHOLD ? bpf_htons(IPV4_DF) : 0;
	ip.ttl = ip6.hop_limit - 1;
	ip.protocol = IPPROTO_UDP;
	__builtin_memcpy(&ip.saddr, f->src, 4);
	__builtin_memcpy(&ip.daddr, f->dst, 4);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip.check = ~sum & 0xffff;
	pseudo = bpf_csum_diff((__be32 *)&ip6.saddr, 32, (__be32 *)&ip.saddr, 8, 0);

	if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0))
		return pass(STAT_PASS_ERROR);
	if (bpf_skb_store_bytes(skb, l3, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM))
		return shot();
	if (store_udp(skb, l3 + sizeof(ip), &old, &udp, pseudo))
		return shot();

	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, udp_len - sizeof(udp));
	f->last_seen = bpf_ktime_get_ns();
	count(STAT_TO_CLIENT_PACKETS, 1);
	count(STAT_TO_CLIENT_BYTES, udp_len - sizeof(udp));
	return bpf_redirect(cfg->redirect_ifindex, BPF_F_INGRESS);
}

SEC("tc")
int kracauer_xlat(struct __sk_buff *skb)
{
	const struct xlat_config *cfg = flow_config();

	if (!cfg || !(cfg->flags & XLAT_F_ENABLED))
		return pass(STAT_PASS_DISABLED);
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		int verdict = to_host(skb, cfg);

		if (verdict == TO_LISTENER)
			return syn_to_listener(skb, cfg);
		return verdict == TO_UDP ? udp_to_host(skb, cfg) : verdict;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		int verdict = to_client(skb, cfg);

		return verdict == TO_UDP ? udp_to_client(skb, cfg) : verdict;
	}
	return pass(STAT_PASS_NOT_TCP);
}

/* SPDX-License-Identifier: MIT */
/*
 * The flow map: one entry per direction of a connection the kernel carries.
 *
 * The key is the 4-tuple the packet carries when it reaches the TUN's egress
 * (before translation) and its transport; the value says how to rewrite it
 * and collects what user space needs back (the highest ACK and sequence
 * number, the window, counters). A UDP entry uses only the addresses, the
 * ports, the family and the counters: its sequence, timestamp and window
 * fields stay 0. User space mirrors these layouts once, in netstack/flow.py, and a
 * test checks sizes and offsets against this header's BTF.
 *
 * All multi-byte protocol fields are kept in host order except where the
 * name says be16 (ports, copied into the header as they are).
 */
#ifndef KRACAUER_FLOW_H
#define KRACAUER_FLOW_H

#include <linux/types.h>

#define FLOW_MAX_DEFAULT 200000

/* flow_value.flags */
#define FLOW_F_WSCALE_MASK 0x0f   /* the sender's own window scale, 15: none */
#define FLOW_F_TIMESTAMPS  0x10   /* timestamps are on, both sides */
#define FLOW_F_SACK        0x20   /* the client allowed SACK */

/* xlat_config.flags */
#define XLAT_F_ENABLED     0x01   /* translate; otherwise pass everything on */

/* flow_key.l4: which transport the entry is for. TCP is 0, so that entries
 * made before the field existed (it was padding) still read as TCP. */
#define FLOW_L4_TCP        0
#define FLOW_L4_UDP        17  /* a quic listener's flow (netstack/udptracker.py) */

struct flow_key {
	__u8 family;        /* 4 or 6: the packet's IP version */
	__u8 l4;            /* FLOW_L4_* */
	__u8 pad[2];
	__u8 src[16];       /* IPv4: four bytes, then zeros */
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
};                          /* 40 bytes */

struct flow_value {
	/* The rewrite: written by user space, read by the program. */
	__u8 src[16];       /* 0: the new source address (IPv4: four bytes, then zeros) */
	__u8 dst[16];       /* 16: the new destination address */
	__be16 sport;       /* 32: the new ports */
	__be16 dport;       /* 34 */
	__u32 seq_add;      /* 36: added to SEG.SEQ (host to client: -delta) */
	__u32 ack_add;      /* 40: added to SEG.ACK and to SACK edges (client to host: +delta) */
	__u32 tsval_add;    /* 44: added to TSval (host to client: -offset) */
	__u32 tsecr_add;    /* 48: added to TSecr (client to host: +offset) */
	__s8 wscale_shift;  /* 52: window << shift, or >> -shift rounded up */
	__u8 family;        /* 53: the IP version out, 4 or 6 */
	__u16 mss;          /* 54: gso_size + TCP options must fit mss + 20 */
	__u32 flags;        /* 56: FLOW_F_* */
	__u32 seq_base;     /* 60: the sender's ISN + 1, for byte counts */
	__u64 start_ns;     /* 64: when the connection began (CLOCK_MONOTONIC) */
	/* Tracking: written by the program, read by user space. */
	__u32 ack_max;      /* 72: highest SEG.ACK seen (sender's space, before rewrite) */
	__u32 seq_next;     /* 76: highest SEG.SEQ + SEG.LEN seen (sender's space) */
	__u16 window;       /* 80: the latest SEG.WND, unscaled */
	__u16 window_max;   /* 82: the largest SEG.WND, unscaled */
	__u32 pad;          /* 84 */
	__u64 packets;      /* 88: frames translated (a GSO super-packet is one) */
	__u64 bytes;        /* 96: TCP payload (UDP: datagram payload) bytes translated */
	__u64 last_seen;    /* 104: bpf_ktime_get_ns() of the latest packet */
};                          /* 112 bytes */

struct xlat_config {
	__u32 flags;            /* XLAT_F_* */
	__u32 l3_offset;        /* where the IP header starts: 0 at a TUN, 14 in BPF_PROG_TEST_RUN */
	__u32 redirect_ifindex; /* translated packets go to this device's ingress (the TUN) */
	__u32 pad;
};

/*
 * SYN cookies (xlat.bpf.c answers SYNs to listeners; netstack/syncookie.py
 * makes and checks the same cookies). Written by user space, not pinned:
 * each kracauer sets them at start and on reload.
 */
#define LISTENERS_MAX 1024

/* cookie_config.flags */
#define COOKIE_F_ENABLED   0x01   /* answer SYNs to listeners; otherwise pass them on */

struct cookie_config {
	__u64 key[2];           /* 0: the SipHash key (k0, k1), the secret's two little-endian words */
	__u64 clock_ns;         /* 16: 0: bpf_ktime_get_ns(); else this time (for BPF_PROG_TEST_RUN) */
	__u16 mss;              /* 24: the MSS announced, kracauer's clamp (mtu - 60) */
	__u16 window;           /* 26: the SYN-ACK's window (unscaled, RFC 7323 §2.2) */
	__u8 wscale;            /* 28: the window scale kracauer announces */
	__u8 flags;             /* 29: COOKIE_F_* */
	__u16 pad;              /* 30 */
};                              /* 32 bytes */

struct listener_key {
	__u8 addr[4];           /* the service address */
	__be16 port;            /* the service port, network order */
	__u16 pad;
};                              /* 8 bytes */

struct listener_value {
	/* SYNs without timestamps a second, per CPU, handed to user space (which
	 * answers them with state and keeps window scale and SACK); past it the
	 * program answers them with cookies too. 0: the program answers all. */
	__u32 python_syn_rate;
	__u32 pad;
};

/* Per CPU, per listener (the syn_stats map). */
struct syn_stats {
	__u64 cookies;          /* SYNs the program answered with a cookie */
	__u64 passed;           /* SYNs without timestamps handed to user space */
	__u64 second;           /* the budget's second (clock / 1e9) */
	__u64 used;             /* SYNs handed on in that second */
};

/* Per-CPU counters, indexes into the stats array. */
enum xlat_stat {
	STAT_TO_HOST_PACKETS,
	STAT_TO_HOST_BYTES,
	STAT_TO_CLIENT_PACKETS,
	STAT_TO_CLIENT_BYTES,
	/* Packets passed on to user space, by reason. */
	STAT_PASS_DISABLED,
	STAT_PASS_NOT_TCP,  /* neither TCP nor UDP */
	STAT_PASS_IP_OPTIONS,
	STAT_PASS_FRAGMENT,
	STAT_PASS_LENGTH,
	STAT_PASS_TTL,
	STAT_PASS_FLAGS,
	STAT_PASS_TCP_OPTIONS,
	STAT_PASS_NO_FLOW,
	STAT_PASS_GSO,
	STAT_PASS_ERROR,
	STAT_DROP_ERROR,    /* dropped: a helper failed half way */
	STAT_PASS_UDP_CHECKSUM,  /* a UDP datagram without a checksum (0): user space's */
	STAT_MAX,
};

#endif /* KRACAUER_FLOW_H */

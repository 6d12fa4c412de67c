// SPDX-License-Identifier: MIT
/*
 * A tc program for tests/test_bpf_plumbing.py, small enough to reason about:
 * it reads a u32 key from the 4 bytes after the Ethernet header, counts the
 * run in a per-CPU array (slot 0: every run, slot 1: key not in the map), and
 * returns the verdict stored for the key, also writing it over the 4 bytes
 * after the key so that the test sees the packet change. A packet too short
 * for key and verdict, or a key not in the map, gets TC_ACT_OK untouched.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#define ETH_HLEN 14

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &slot);

	if (n)
		*n += 1;
}

SEC("tc")
int probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 *key = data + ETH_HLEN;
	__u32 *verdict;

	count(0);
	if ((void *)(key + 2) > data_end)
		return TC_ACT_OK;
	verdict = bpf_map_lookup_elem(&verdicts, key);
	if (!verdict) {
		count(1);
		return TC_ACT_OK;
	}
	key[1] = *verdict;
	return *verdict;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";

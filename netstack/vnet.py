"""The virtio_net_hdr that a TUN opened with IFF_VNET_HDR puts before each packet.

With offloads on (TUNSETOFFLOAD with TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) the
kernel hands over TCP super-packets of up to 64 KiB with a partial checksum,
and takes them back the same way: one read, one translation, one write for up
to 45 segments. The header says how to finish the job (include/uapi/linux/
virtio_net.h; Virtio 1.2 §5.1.6 "Device Operation"):

    flags        NEEDS_CSUM: the checksum at csum_start + csum_offset holds
                 only the pseudo-header sum; whoever sends the packet on sums
                 from csum_start to the end and stores the complement there.
                 DATA_VALID: the checksum was already verified.
    gso_type     NONE, TCPV4 or TCPV6 (| ECN): how the packet is cut into
                 segments of gso_size payload bytes, each with the same headers
                 (sequence numbers advanced; FIN and PSH on the last only).
    hdr_len      length of the headers (a hint to the kernel).
    csum_start   offset of the TCP header from the start of the packet.
    csum_offset  offset of the checksum field within it (16 for TCP).

The TUN device uses little-endian fields (virtio 1.0 and TUNSETVNETLE).
Translating between IPv4 and IPv6 moves the TCP header by the difference of
the IP header lengths; the partial checksum only changes by the addresses of
the pseudo-header, since the fields after csum_start are summed when the
segments are finally made.
"""

from __future__ import annotations

import struct

VNET_HEADER = struct.Struct("<BBHHHH")
VNET_HEADER_LEN = VNET_HEADER.size  # 10: no num_buffers field (no IFF_VNET_HDR size change)

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

TCP_CSUM_OFFSET = 16

# A frame for the kernel that needs nothing done: full checksum, one segment.
PLAIN = VNET_HEADER.pack(0, GSO_NONE, 0, 0, 0, 0)


class VnetError(ValueError):
    """The virtio_net_hdr does not describe a packet kracauer can translate."""


def gso_type_for(version: int, gso_type: int) -> int:
    """The gso_type of the translated packet: TCPV4 ⇄ TCPV6, keeping the ECN bit."""
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return gso_type
    if kind not in (GSO_TCPV4, GSO_TCPV6):
        raise VnetError(f"gso_type {gso_type:#x} is not TCP")
    return (GSO_TCPV6 if version == 6 else GSO_TCPV4) | (gso_type & GSO_ECN)

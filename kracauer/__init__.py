"""kracauer: route IPv4 connections by name to IPv6 hosts, client address embedded."""

__version__ = "0.1.0"

"""Configuration texts and the parser call the config unit tests share."""

from __future__ import annotations

from kracauer.config import Config, parse_config

# The smallest valid configuration but for a route: one tls listener, lines 1-7. Tests append
# tables to it, and the line numbers in their expected error messages count from it.
BASE = """\
[translate]
prefix = "64:ff9b:1::/96"

[[listen]]
address = "192.0.2.10"
port = 443
protocol = "tls"
"""


def parse(text: str) -> Config:
    """`text` as kracauer reads a file called k.toml (the name error messages start with)."""
    return parse_config(text, source="k.toml")

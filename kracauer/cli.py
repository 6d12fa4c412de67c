"""Command line: run the daemon, check a configuration, encode/decode addresses.

    kracauer --config FILE [--log-level LEVEL] [--no-keep-tun]   run in the foreground
    kracauer check-config FILE                              validate a configuration
    kracauer status [--metrics URL | --config FILE]         what a running kracauer is doing
    kracauer cleanup --config FILE                          remove the TUN and state a stop with [state] left
    kracauer decode ADDR [ADDR ...]                         64:ff9b:1::cb00:7107 -> 203.0.113.7
    kracauer encode (--prefix P | --config FILE) IPV4 ...   203.0.113.7 -> 64:ff9b:1::cb00:7107
    kracauer agent --config FILE [--log-level LEVEL]         a host behind NAT: dial the box, serve its names
    kracauer agent-token                                    print a new agent token and its sha256
    kracauer --version

Exit status: 0 on success, 2 for bad arguments, configuration or input;
`status` exits 1 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from kracauer import __version__
from kracauer.config import Config, ConfigError, load_agent_config, load_config, parse_prefix
from netstack.addr import embed_address, extract_address

__all__ = ["main"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2


class _Failure(Exception):
    """A user error: printed as ``kracauer: <message>``, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kracauer",
        description="Route IPv4 TLS/HTTP connections by name to IPv6 hosts, "
                    "with the client's IPv4 address embedded in the source address.",
        epilog="Without a command, runs the daemon in the foreground with --config FILE.",
    )
    parser.add_argument("--version", action="version", version=f"kracauer {__version__}")
    parser.add_argument("--config", metavar="FILE", help="configuration file (TOML)")
    parser.add_argument("--log-level", choices=tuple(LOG_LEVELS), default=None,
                        help="logging threshold (default: [log] level in the config, else info)")
    parser.add_argument("--no-keep-tun", action="store_true",
                        help="stop for good: with [state], do not save the state and remove the TUN at exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check-config", help="validate a configuration file",
                                description="Validate a configuration file and summarize it.")
    check.add_argument("file", metavar="FILE")

    decode = commands.add_parser(
        "decode", help="print the IPv4 address embedded in IPv6 addresses",
        description="Print the IPv4 address in the low 32 bits of each IPv6 address, one per line.")
    decode.add_argument("addresses", metavar="ADDR", nargs="+")

    encode = commands.add_parser(
        "encode", help="print the IPv6 address that embeds IPv4 addresses",
        description="Print the IPv6 address (translate prefix + IPv4 address) for each IPv4 address.")
    encode.add_argument("--prefix", metavar="P", help="the /96 translate prefix, e.g. 64:ff9b:1::/96")
    encode.add_argument("--config", metavar="FILE", dest="encode_config",
                        help="take the prefix from this configuration file's [translate] prefix")
    encode.add_argument("addresses", metavar="IPV4", nargs="+")

    status = commands.add_parser(
        "status", help="show what a running kracauer is doing (from its metrics endpoint)",
        description="Print active connections by route and host, drops by reason and uptime, "
                    "read from the daemon's [metrics] endpoint.")
    status.add_argument("--metrics", metavar="URL",
                        help="the /metrics URL (default: from --config, else http://127.0.0.1:9477/metrics)")
    status.add_argument("--config", metavar="FILE", dest="status_config",
                        help="take the endpoint from this configuration file's [metrics] listen")

    cleanup = commands.add_parser(
        "cleanup", help="remove the persistent TUN and state file left by a stop with [state]",
        description="Stop for good after kracauer stopped with [state]: remove the TUN it left in place "
                    "(and its routes) and the state file. Fails if a kracauer still uses the TUN.")
    cleanup.add_argument("--config", metavar="FILE", dest="cleanup_config", help="the configuration file")

    agent = commands.add_parser(
        "agent", help="run on a host behind NAT: dial the box and serve names through the tunnel",
        description="Dial the kracauer box named in [agent] box (TLS 1.3), register [agent] names with the "
                    "token from token_file, and carry their connections through a TUN on this host "
                    "(docs/agents.md). Exit status 2 if the box refuses the token or a name.")
    agent.add_argument("--config", metavar="FILE", dest="agent_config", help="the agent's configuration file")
    agent.add_argument("--log-level", choices=tuple(LOG_LEVELS), default=None, dest="agent_log_level",
                       help="logging threshold (default info)")

    commands.add_parser(
        "agent-token", help="print a new agent token and the sha256 the box's [[agents.token]] needs",
        description="Print a new random token (256 bits) for an agent's token_file, and its SHA-256 for the "
                    "box's [[agents.token]] sha256. The box never stores the token itself.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "decode":
            return _decode(args.addresses)
        if args.command == "encode":
            return _encode(args)
        if args.command == "status":
            return _status(args)
        if args.command == "cleanup":
            return _cleanup(args)
        if args.command == "agent":
            return _agent(args)
        if args.command == "agent-token":
            return _agent_token()
        if args.config is None:
            parser.print_usage(sys.stderr)
            print("kracauer: error: --config FILE is required to run the daemon "
                  "(or give a command: check-config, status, cleanup, decode, encode)", file=sys.stderr)
            return EXIT_USAGE
        return _run(args.config, args.log_level, keep_tun=not args.no_keep_tun)
    except (ConfigError, _Failure) as e:
        print(f"kracauer: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(path: str, log_level: str | None, keep_tun: bool = True) -> int:
    config = load_config(path)
    logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT, level=LOG_LEVELS[log_level or config.log.level])
    from kracauer.daemon import run  # imported late: pulls in the TUN/netlink code

    try:
        # --no-keep-tun is passed only when given, so run(config) stays the common call.
        status = run(config) if keep_tun else run(config, keep_tun=False)
    except KeyboardInterrupt:
        return 130
    return EXIT_OK if status is None else int(status)


def _agent(args: argparse.Namespace) -> int:
    path = args.agent_config or args.config
    if path is None:
        raise _Failure("agent: needs --config FILE (the agent's [agent] table)")
    config = load_agent_config(path)
    logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT,
                        level=LOG_LEVELS[args.agent_log_level or args.log_level or "info"])
    from kracauer.agent import run  # imported late: pulls in the TUN/netlink code

    return run(config)


def _agent_token() -> int:
    from kracauer.agents import new_token, token_sha256

    token = new_token()
    print(f"token:  {token}")
    print(f"sha256: {token_sha256(token)}")
    print("# the token goes (alone) into the agent's token_file; the sha256 into the box's [[agents.token]]",
          file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from kracauer import status as st  # imported late: pulls in prometheus_client

    config_path = args.status_config or args.config
    if args.metrics is not None and config_path is not None:
        raise _Failure("status: give --metrics or --config, not both")
    try:
        if args.metrics is not None:
            url = args.metrics
        elif config_path is not None:
            url = st.metrics_url(load_config(config_path))
        else:
            url = st.DEFAULT_URL
    except st.StatusError as e:
        raise _Failure(f"status: {e}") from None
    try:
        status = st.parse(st.fetch(url))
    except st.StatusError as e:
        print(f"kracauer: status: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(st.format_status(status, url))
    return EXIT_OK


def _cleanup(args: argparse.Namespace) -> int:
    config_path = args.cleanup_config or args.config
    if config_path is None:
        raise _Failure("cleanup: needs --config FILE (the TUN name and state file come from it)")
    config = load_config(config_path)
    from kracauer.daemon import DaemonError, cleanup
    from kracauer.tun import TunError

    try:
        done = cleanup(config)
    except (TunError, DaemonError) as e:
        raise _Failure(f"cleanup: {e}") from None
    print("\n".join(done) if done else f"nothing to clean up: no TUN {config.tun.name}"
          + (f" and no state file {config.state.file}" if config.state is not None else ""))
    return EXIT_OK


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _check_config(path: str) -> int:
    config = load_config(path)
    resolving = [route for route in config.routes if route.resolve]
    print(f"{path}: OK ({_plural(len(config.listeners), 'listener')}, "
          f"{_plural(len(config.routes), 'route')}, "
          f"fallback: {'yes' if config.fallback is not None else 'no'})")
    if resolving:
        servers = ", ".join(f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}" for a, p in config.resolver.servers)
        print(f"  {_plural(len(resolving), 'route')} by DNS (AAAA records, looked up when the hello arrives) "
              f"via {servers or 'the nameservers of /etc/resolv.conf'}:")
        for route in resolving:
            print(f"    {route.name}{f' (alpn {route.alpn})' if route.alpn else ''}: "
                  f"hosts inside {', '.join(map(str, route.networks))}")
    agents = config.agents
    if agents is not None:
        print(f"  agents dial in on {agents.listen} (TLS 1.3), addresses from {agents.network} on {agents.tun}, "
              f"keepalive {agents.keepalive:g} s; {_plural(len(agents.tokens), 'token')}:")
        for token in agents.tokens:
            print(f"    {token.sha256[:12]}…: may register {', '.join(token.names)}")
    return EXIT_OK


def _decode(texts: list[str]) -> int:
    # Check everything first: the output is one line per argument or nothing.
    out = []
    for text in texts:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise _Failure(f"decode: not an IPv6 address: {text!r}") from None
        if address.version != 6:
            raise _Failure(f"decode: expected an IPv6 address, got IPv4 address {text!r}")
        out.append(str(extract_address(address)))
    print("\n".join(out))
    return EXIT_OK


def _encode(args: argparse.Namespace) -> int:
    config_path = args.encode_config or args.config
    if args.prefix is not None and config_path is not None:
        raise _Failure("encode: give --prefix or --config, not both")
    if args.prefix is not None:
        try:
            prefix = parse_prefix(args.prefix)
        except ValueError as e:
            raise _Failure(f"encode: --prefix: {e}") from None
    elif config_path is not None:
        config: Config = load_config(config_path)
        prefix = config.prefix
    else:
        raise _Failure("encode: needs --prefix P or --config FILE")
    out = []
    for text in args.addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            raise _Failure(f"encode: not an IPv4 address: {text!r}") from None
        out.append(str(embed_address(prefix, address)))
    print("\n".join(out))
    return EXIT_OK

"""Small programs that scripts/bench.py runs inside the lab's namespaces.

Standard library only; each is bounded in time and count and exits by itself.

    sink     (host)   an HTTP upload sink: reads a request body of
                      Content-Length bytes, answers 204.
    holder   (host)   accepts connections on some ports, sends one byte on
                      each, and holds them until the peer goes away.
    connect  (client) opens N connections (non-blocking, epoll) through a
                      proxy to a holder, spread over several source
                      addresses; waits for "close" on stdin, then resets them.
    latency  (client) N sequential HTTP requests, each on a new connection;
                      per-request times (connect to end of response).
    curls    (client) P curl downloads or uploads at once; wall time and bytes.
    synflood (client) spoofed SYNs (sources inside 198.51.100.0/24 only) at a
                      rate or as fast as one raw socket goes, for some seconds.
    legit    (client) one HTTP request on a new connection every interval,
                      each in a thread; how many were served, how fast.

Every command prints one JSON object (``connect`` prints progress lines
first) on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

# linux/in.h: reserve the source address but pick the port at connect() time,
# so one address serves ~28 000 connections per destination, not in total.
IP_BIND_ADDRESS_NO_PORT = 24


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile(n: int) -> int:
    """Raise RLIMIT_NOFILE towards ``n``; the new soft limit.

    Above the hard limit only with CAP_SYS_RESOURCE (up to fs.nr_open);
    without it (containers) the hard limit is as far as it goes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    if n > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return n
        except (ValueError, OSError):
            pass
    want = min(n, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def dual_stack_listener(port: int, backlog: int = 4096) -> socket.socket:
    """One socket on [::]:port that takes IPv4 (as ::ffff:a.b.c.d) and IPv6."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(backlog)
    return s


def deadline_guard(seconds: float) -> None:
    """Exit (status 3) if the program is still running after ``seconds``."""
    def on_alarm(signum, frame):
        emit({"error": f"gave up after {seconds:g}s"})
        os._exit(3)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


# -- sink ---------------------------------------------------------------------


def _sink_connection(conn: socket.socket, bufsize: int) -> None:
    buf = bytearray(bufsize)
    view = memoryview(buf)
    try:
        conn.settimeout(120)
        while True:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
                if len(head) > 65536:
                    return
            header, _, rest = head.partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            length = int(fields.get("content-length", "0"))
            if fields.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            remaining = length - len(rest)
            while remaining > 0:
                n = conn.recv_into(view[:min(bufsize, remaining)])
                if n == 0:
                    return
                remaining -= n
            close = fields.get("connection", "").lower() == "close"
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n"
                         + (b"Connection: close\r\n" if close else b"") + b"\r\n")
            if close:
                return
    except (OSError, ValueError):
        return
    finally:
        conn.close()


def cmd_sink(args: argparse.Namespace) -> int:
    """Threads, one per connection: recv_into a big buffer releases the GIL."""
    listeners = [dual_stack_listener(p, 1024) for p in args.ports]
    deadline_guard(args.max_time)

    def serve(lst: socket.socket) -> None:
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=_sink_connection, args=(conn, args.bufsize), daemon=True).start()

    for lst in listeners[1:]:
        threading.Thread(target=serve, args=(lst,), daemon=True).start()
    serve(listeners[0])
    return 0


# -- holder -------------------------------------------------------------------


def _write_status(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def cmd_holder(args: argparse.Namespace) -> int:
    raise_nofile(args.max_conns + 1024)
    deadline_guard(args.max_time)
    ep = select.epoll()
    listeners = {}
    for port in args.ports:
        lst = dual_stack_listener(port, 65535)
        lst.setblocking(False)
        listeners[lst.fileno()] = lst
        ep.register(lst.fileno(), select.EPOLLIN)
    conns: set[int] = set()
    accepted = 0
    linger = struct.pack("ii", 1, 0)
    last = 0.0
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        for fd, ev in ep.poll(0.1, 1024):
            lst = listeners.get(fd)
            if lst is not None:
                for _ in range(256):
                    try:
                        cfd, _ = lst._accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            break
                        raise
                    accepted += 1
                    conns.add(cfd)
                    try:
                        os.write(cfd, b"x")
                    except OSError:
                        pass
                    ep.register(cfd, select.EPOLLIN | select.EPOLLRDHUP)
                continue
            # The peer closed or reset: drop our side at once (RST, no TIME-WAIT).
            try:
                ep.unregister(fd)
            except OSError:
                pass
            conns.discard(fd)
            s = socket.socket(fileno=fd)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            s.close()
        now = time.monotonic()
        if now - last >= 0.1:
            last = now
            _write_status(args.status, {"accepted": accepted, "open": len(conns)})
    # Whatever is left goes with an RST: no orphaned FIN_WAIT sockets on the host.
    for fd in conns:
        s = socket.socket(fileno=fd)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()
    _write_status(args.status, {"accepted": accepted, "open": 0, "reset_at_exit": len(conns)})
    return 0


# -- connect ------------------------------------------------------------------


def cmd_connect(args: argparse.Namespace) -> int:
    """Open ``count`` connections, at most ``window`` not yet answered at a time.

    A connection counts once the holder's byte arrived: the whole path, proxy
    to host, is up (kracauer answers the client's handshake itself).
    """
    raise_nofile(args.count + 1024)
    deadline_guard(args.max_time)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    sources = args.sources.split(",")
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    started = time.monotonic()
    opened = failures = 0
    max_failures = args.count // 10 + 100
    last_error = ""
    deadline = started + args.timeout
    last_report = started
    while len(done) < args.count and time.monotonic() < deadline:
        while len(pending) < args.window and len(done) + len(pending) < args.count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((sources[opened % len(sources)], 0))
            s.setblocking(False)
            err = s.connect_ex(target)
            opened += 1
            if err not in (0, errno.EINPROGRESS):
                s.close()
                failures += 1
                last_error = f"connect: {os.strerror(err)}"
                if failures > max_failures:
                    break
                continue
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        for fd, ev in ep.poll(0.05, 1024):
            s = pending.pop(fd, None)
            if s is None:
                continue
            ep.unregister(fd)
            ok = False
            if not ev & (select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP):
                try:
                    ok = s.recv(16) == b"x"
                except OSError:
                    ok = False
            if ok:
                done.append(s)
            else:
                s.close()
                failures += 1
                last_error = "closed or reset before the host's byte"
        if failures > max_failures:
            break
        now = time.monotonic()
        if now - last_report >= 1.0:
            last_report = now
            emit({"progress": len(done), "pending": len(pending), "failures": failures})
    elapsed = time.monotonic() - started
    for s in pending.values():
        s.close()
    emit({"established": len(done), "failures": failures, "last_error": last_error, "seconds": round(elapsed, 3)})
    # Hold them until told to close (or until the deadline guard fires).
    sys.stdin.readline()
    linger = struct.pack("ii", 1, 0)
    # Reset them in paced batches so the proxy (and its TUN queue) keeps up.
    for i, s in enumerate(done):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()
        if i % args.close_batch == args.close_batch - 1:
            time.sleep(args.close_pause)
    emit({"closed": len(done)})
    return 0


# -- latency ------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cmd_latency(args: argparse.Namespace) -> int:
    deadline_guard(args.max_time)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: kracauer-bench\r\n"
               "Connection: close\r\n\r\n").encode()
    times = []
    errors = 0
    for _ in range(args.count):
        t0 = time.perf_counter()
        try:
            with socket.create_connection(target, timeout=5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(request)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
        except OSError:
            errors += 1
            continue
        t1 = time.perf_counter()
        if not got.startswith(b"HTTP/1.1 200"):
            errors += 1
            continue
        times.append((t1 - t0) * 1e3)
    emit({
        "count": len(times), "errors": errors,
        "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90), "p99_ms": percentile(times, 99),
        "mean_ms": statistics.fmean(times) if times else float("nan"),
    })
    return 0 if times else 1


# -- curls --------------------------------------------------------------------


def cmd_curls(args: argparse.Namespace) -> int:
    """``parallel`` curls at once; aggregate rate = bytes / wall time of the slowest."""
    deadline_guard(args.max_time + 10)
    base = ["curl", "-sS", "--max-time", str(args.max_time), "-o", "/dev/null", "-H", f"Host: {args.host}",
            "-w", "%{http_code} %{size_download} %{size_upload} %{time_total}\n"]
    if args.upload:
        base += ["-H", "Expect:", "-T", args.upload]
    procs = []
    t0 = time.perf_counter()
    for _ in range(args.parallel):
        procs.append(subprocess.Popen(base + [args.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate()
        results.append((p.returncode, out.strip(), err.strip()))
    wall = time.perf_counter() - t0
    total = 0
    errors = []
    for rc, out, err in results:
        fields = out.split()
        if rc != 0 or len(fields) != 4 or not fields[0].startswith("2"):
            errors.append(f"rc={rc} out={out!r} err={err!r}")
            continue
        total += int(fields[2] if args.upload else fields[1])
    emit({"bytes": total, "seconds": wall, "bits_per_second": total * 8 / wall if wall else 0.0,
          "errors": errors, "per_curl": [r[1] for r in results]})
    return 1 if errors else 0


# -- synflood and legit ----------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def cmd_synflood(args: argparse.Namespace) -> int:
    """Prebuilt SYNs with Linux's options (timestamps on) from spoofed sources of the lab's client subnet."""
    import random

    first, last = args.sources.split("-")
    first, last = int(first), int(last)
    if not 3 <= first <= last <= 254:
        raise SystemExit("synflood: sources must be inside 198.51.100.3-254 (the lab's client subnet)")
    seconds = min(args.seconds, 30.0)
    rng = random.Random(args.seed)
    dst = socket.inet_aton(args.dst)
    sources = [socket.inet_aton(f"198.51.100.{i}") for i in range(first, last + 1)]
    packets = []
    for i in range(1 << 14):
        src = sources[i % len(sources)]
        options = struct.pack("!BBHBBBBIIBBBB", 2, 4, 1460, 4, 2, 8, 10, rng.getrandbits(32), 0, 1, 3, 3, 7)
        tcp = struct.pack("!HHIIBBHHH", 1024 + rng.randrange(64000), args.port, rng.getrandbits(32), 0,
                          (20 + len(options)) // 4 << 4, 0x02, 64240, 0, 0) + options
        tcp = tcp[:16] + struct.pack("!H", _checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
        packets.append(ip + tcp)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sendto, addr, sent, errors = s.sendto, (args.dst, 0), 0, 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        for i in range(0, len(packets), 1024):
            for p in packets[i:i + 1024]:
                try:
                    sendto(p, addr)
                except OSError:
                    errors += 1
            sent += 1024
            if args.rate:
                ahead = t0 + sent / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            if time.monotonic() >= deadline:
                break
    elapsed = time.monotonic() - t0
    emit({"sent": sent, "errors": errors, "seconds": elapsed, "rate": sent / elapsed})
    return 0


def cmd_legit(args: argparse.Namespace) -> int:
    """A request on a new connection every ``interval`` s for ``seconds``, each given ``timeout`` s."""
    deadline_guard(args.seconds + args.timeout + 10)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    request = (f"GET / HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: kracauer-bench\r\n"
               "Connection: close\r\n\r\n").encode()
    results: list[float | None] = []
    lock = threading.Lock()

    def attempt() -> None:
        t0 = time.monotonic()
        took = None
        try:
            with socket.create_connection(target, timeout=args.timeout) as s:
                s.settimeout(max(args.timeout - (time.monotonic() - t0), 0.1))
                s.sendall(request)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            if got.startswith(b"HTTP/1.1 200"):
                took = time.monotonic() - t0
        except OSError:
            pass
        with lock:
            results.append(took)

    threads = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        threads.append(t)
        time.sleep(args.interval)
    for t in threads:
        t.join(args.timeout + 5)
    ok = sorted(r for r in results if r is not None)
    emit({"attempts": len(threads), "served": len(ok),
          "served_pct": 100.0 * len(ok) / len(threads) if threads else 0.0,
          "p50_ms": percentile([x * 1e3 for x in ok], 50) if ok else None,
          "max_ms": ok[-1] * 1e3 if ok else None})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("sink")
    p.add_argument("--ports", type=int, nargs="+", required=True)
    p.add_argument("--bufsize", type=int, default=1 << 20)
    p.add_argument("--max-time", type=float, default=3600)

    p = sub.add_parser("holder")
    p.add_argument("--ports", type=int, nargs="+", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--max-conns", type=int, default=200_000)
    p.add_argument("--max-time", type=float, default=900)

    p = sub.add_parser("connect")
    p.add_argument("--target", required=True, help="IPv4:port")
    p.add_argument("--sources", required=True, help="comma-separated source addresses")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--close-batch", type=int, default=100)
    p.add_argument("--close-pause", type=float, default=0.02)
    p.add_argument("--max-time", type=float, default=600)

    p = sub.add_parser("latency")
    p.add_argument("--target", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--max-time", type=float, default=120)

    p = sub.add_parser("curls")
    p.add_argument("--url", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--upload", help="file to PUT (else GET to /dev/null)")
    p.add_argument("--max-time", type=float, default=120)

    p = sub.add_parser("synflood")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rate", type=float, default=0.0, help="SYNs a second; 0: unpaced")
    p.add_argument("--sources", default="100-254", help="last octets of the spoofed 198.51.100.x sources")
    p.add_argument("--seed", type=int, default=1)

    p = sub.add_parser("legit")
    p.add_argument("--target", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=5)

    args = parser.parse_args(argv)
    return {"sink": cmd_sink, "holder": cmd_holder, "connect": cmd_connect, "latency": cmd_latency,
            "curls": cmd_curls, "synflood": cmd_synflood, "legit": cmd_legit}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

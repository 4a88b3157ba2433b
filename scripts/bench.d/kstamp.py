"""Kernel receive timestamps for the samplers of scripts/bench (freshness.py, feed.py).

A sampler that takes time.perf_counter() after Python has been scheduled, read the
socket and parsed the answer measures its own wait for a CPU too: on two busy cores
that was a p99 of 3-10 ms. These helpers ask the kernel for the time each segment
arrived (SO_TIMESTAMPNS, CLOCK_REALTIME in integer nanoseconds), so a sample runs
from the arrival of one answer to the arrival of another whenever the sampler gets
to read them.

Client speaks HTTP/1.1 with keep-alive over a plain socket and answers
(status, body, arrived_ns, sent_ns): arrived_ns is the kernel's receive time of the
segment that completed the answer (None when the kernel gave none), sent_ns the wall
clock just before the request was written (time.time_ns(), the same clock)."""
import socket, struct, time

SO_TIMESTAMPNS = 35  # Linux, asm-generic/socket.h (SO_TIMESTAMPNS_OLD = SCM_TIMESTAMPNS)
_TIMESPEC = struct.Struct("@qq")  # struct timespec on a 64-bit Linux
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def stamping(sock):
    """Ask the kernel to stamp every segment sock receives."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


UNSTAMPED = [0]  # reads that came without a kernel time (counted, see recv_stamped)


def recv_stamped(sock, n=65536):
    """(data, arrived_ns) of one recvmsg on a stamping socket. arrived_ns is None at EOF,
    and when the kernel left the time out (it does now and then: a segment queued
    without one), which UNSTAMPED[0] counts; the samplers then take the bound that
    makes their sample longer (the request's sending for an answer a sample starts
    from, the reading for one it ends with)."""
    data, ancillary, _, _ = sock.recvmsg(n, _ANCILLARY)
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(raw[:_TIMESPEC.size])
            return data, sec * 1_000_000_000 + nsec
    if data:
        UNSTAMPED[0] += 1
    return data, None


class _Closed(OSError):
    """The connection was closed before any byte of the answer arrived."""


class Client:
    def __init__(self, port, timeout=15):
        self.port, self.timeout = int(port), timeout
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stamping(self.sock)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, method, path, body=None, headers=None):
        """One request on the kept-alive connection. Sent again (once, on a new
        connection) only when a connection that had served an earlier request was found
        closed before any byte of the answer came: never a request the server may
        have answered (a POST is not repeated after a timeout or a broken answer)."""
        payload = body.encode() if isinstance(body, str) else (body or b"")
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1",
                 "Content-Length: %d" % len(payload)]
        lines += ["%s: %s" % kv for kv in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        for attempt in (1, 2):
            reused = self.sock is not None
            if not reused:
                self._connect()
            try:
                sent_ns = time.time_ns()
                try:
                    self.sock.sendall(request)
                except (ConnectionResetError, BrokenPipeError):
                    raise _Closed("the connection was closed before the request went")
                return self._answer() + (sent_ns,)
            except _Closed:
                self.close()
                if attempt == 2 or not reused:
                    raise
            except (OSError, ValueError):
                self.close()
                raise

    def _answer(self):
        buf, arrived = b"", None
        while b"\r\n\r\n" not in buf:
            try:
                data, arrived = recv_stamped(self.sock)
            except (ConnectionResetError, BrokenPipeError):
                if buf:
                    raise
                raise _Closed("the connection was reset before the answer")
            if not data:
                if buf:
                    raise OSError("the server closed the connection inside an answer")
                raise _Closed("the server closed the connection before answering")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" not in fields:
            raise ValueError("an answer without Content-Length: %r" % lines[0])
        length = int(fields["content-length"])
        while len(rest) < length:
            data, arrived = recv_stamped(self.sock)
            if not data:
                raise OSError("the server closed the connection inside an answer")
            rest += data
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, rest[:length], arrived

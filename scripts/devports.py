"""Loopback ports for a private `scripts/dev up` stack (scripts/chaos, the contract test).

A stack takes DAYBOOK_DEV_PORT_BASE + 1 .. + 6. Its ports stay below the kernel's
ephemeral range, as lib.sh's dbk_pick_free_port keeps below it too: a port freed by a
killed service could otherwise go to another test's outgoing connection meanwhile, and
the restart would find it taken.
"""

import random
import socket

LOW = 20000


def ephemeral_low():
    """The lowest port the kernel hands out for port 0 and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return min(low, 32768) if low > LOW + 100 else 32768


def free_port_base(count=6):
    """A base B such that B+1 .. B+count are free loopback ports right now."""
    for _ in range(200):
        base = random.randrange(LOW, ephemeral_low() - count - 4, 10)
        ok = True
        for off in range(1, count + 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free range of loopback ports found")

#!/usr/bin/env python3
"""What the Redis store's reserve script costs Redis per reservation, split.

    python3 -m pip install redis && python3 benches/redis_script_cost.py

Starts its own redis-server (no persistence, so the append-only log's share
is left out) on an ephemeral port, loads RESERVE_LUA from
src/store/redis.rs, and times warm reservations of one 3-block token, 1 and
14 per call (14 is what the load benchmark's 64 connections batch), through
Redis's own `usec_per_call`. The variants take the script apart: without its
HEXISTS lookups, only the three HINCRBY, and only the argument loop.
"""
import re
import secrets
import socket
import subprocess
import tempfile
import time

import redis

SRC = open(__file__.rsplit("/benches/", 1)[0] + "/src/store/redis.rs").read()
LUA = re.search(r'const RESERVE_LUA: &str = r#"(.*?)"#;', SRC, re.S).group(1)

VARIANTS = {
    "reserve script": LUA,
    "without HEXISTS (warm only)": LUA.replace(
        "redis.call('HEXISTS', key(f, 2), id) == 0", "false"
    ),
    "only the 3 HINCRBY": "local o={} local b=3 while b < #ARGV do for s=0,2 do "
    "local a=b+1+s*5 o[#o+1]=redis.call('HINCRBY',KEYS[1],ARGV[a+2],'1') end "
    "b=b+16 end return o",
    "only the argument loop": "local o={} local b=3 while b < #ARGV do for s=0,2 do "
    "local a=b+1+s*5 o[#o+1]=1 end b=b+16 end return o",
}


def main():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = tempfile.mkdtemp()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        for _ in range(50):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        family = secrets.token_hex(64)
        ids = [family, secrets.token_hex(64), secrets.token_hex(64)]
        keys = [f"till:{{{family}}}:{c}" for c in "nmuex"]

        def args(meta, n):
            a = [str(int(time.time())), "100000", "3600"]
            for _ in range(n):
                a.append("3")
                for i in ids:
                    a += ["1", i, meta, "0", "0"]
            return a

        # The first reservation sends the metadata; the timed ones are warm.
        r.evalsha(r.script_load(LUA), 5, *keys, *args('{"family":"f"}', 1))
        for name, code in VARIANTS.items():
            sha = r.script_load(code)
            for n in (1, 14):
                r.config_resetstat()
                a = args("", n)
                for _ in range(3000):
                    r.evalsha(sha, 5, *keys, *a)
                us = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
                print(f"{name:30s} {n:2d} per call: {us:6.1f} µs a call, {us / n:5.2f} µs a reservation")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where a process's kernel time goes, from a `perf record` with call graphs.

Usage (after `cargo bench --bench load -- --seconds 5 --no-overload --perf /tmp/p.data`):

    perf script -i /tmp/p.data -F ip,sym,dso --no-inline | python3 benches/kernel_share.py
    perf script -i /tmp/p.data.hyper-baseline -F ip,sym,dso --no-inline | python3 benches/kernel_share.py

Each sample is put under the system call it is in (the frame above
`do_syscall_64`), or the interrupt or page fault that entered the kernel;
shares are of all samples, so share x CPU per request (the load benchmark's
figure) gives microseconds per request.
"""
import collections
import re
import sys

ENTRY = re.compile(
    r"(asm_sysvec_\w+|asm_common_interrupt|asm_exc_page_fault|__do_softirq|schedule)"
)


def classify(frames):
    """frames: (symbol, dso), innermost first. None for a user-space sample."""
    if not any("[kernel.kallsyms]" in dso for _, dso in frames):
        return None
    outer = list(reversed(frames))
    for i, (sym, _) in enumerate(outer):
        if sym == "do_syscall_64" and i + 1 < len(outer):
            return "syscall " + outer[i + 1][0]
    for sym, _ in outer:
        m = ENTRY.match(sym)
        if m:
            return m.group(1)
    return "other kernel"


def main():
    shares = collections.Counter()
    total = 0
    frames = []

    def flush():
        nonlocal total
        if frames:
            total += 1
            c = classify(frames)
            if c:
                shares[c] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            frames = []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            m = re.match(r"(.*) \((.*)\)$", parts[1])
            if m:
                frames.append((m.group(1).split("+")[0], m.group(2)))
    flush()
    if total == 0:
        sys.exit("no samples on stdin (see the usage at the top of this file)")
    kernel = sum(shares.values())
    print(f"samples {total}, in the kernel {kernel} ({100 * kernel / total:.1f}%)")
    for k, v in shares.most_common(20):
        print(f"  {100 * v / total:5.1f}%  {k}")


if __name__ == "__main__":
    main()

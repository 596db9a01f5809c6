#!/usr/bin/env python3
"""Instruction mix of each loop in `cuobjdump -sass` output (used by sass-report.sh).

A loop is the range from a backward branch's target to the branch (branches back from
the out-of-line code for divergent warps are left out). For each function it
prints the whole function's mix, then one line per loop: static instruction count,
FFMA, shared loads by width, global loads, MUFU (special functions), shuffles, other.
Static counts: multiply a loop's line by its trip count for per-call totals.
"""
import collections
import re
import sys


def mix(ops):
    c = collections.Counter(o.split(".")[0] for o in ops)
    lds = collections.Counter(o for o in ops if o.startswith("LDS"))
    main = c["FFMA"] + c["LDS"] + c["LDG"] + c["MUFU"] + c["SHFL"]
    widths = ", ".join(f"{k} {v}" for k, v in sorted(lds.items()))
    return (f"{len(ops)} instr: FFMA {c['FFMA']} ({100 * c['FFMA'] / max(len(ops), 1):.0f} %), "
            f"LDS {c['LDS']} [{widths}], LDG {c['LDG']}, MUFU {c['MUFU']}, SHFL {c['SHFL']}, "
            f"other {len(ops) - main}")


def main(path):
    funcs = []  # (name, [(addr, op, text)])
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            funcs.append((m.group(1), []))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and funcs:
            text = m.group(2).strip()
            op = re.sub(r"^@!?U?P[0-9T]\s+", "", text).split()[0]
            if op != "NOP":
                funcs[-1][1].append((int(m.group(1), 16), op, text))
    for name, ins in funcs:
        print(f"== {name}: {mix([o for _, o, _ in ins])}")
        index = {a: i for i, (a, _, _) in enumerate(ins)}
        # Out-of-line code for divergent warps (targets of BRA.DIV) sits after the main
        # body and branches back into it: those branches are not loops.
        div = [int(m.group(1), 16) for _, op, t in ins if op == "BRA.DIV"
               for m in [re.search(r"0x([0-9a-f]+)\s*$", t)] if m]
        fallback = min(div) if div else None
        for i, (a, op, text) in enumerate(ins):
            if fallback is not None and a >= fallback:
                break
            m = re.search(r"0x([0-9a-f]+)\s*$", text)
            if op.startswith("BRA") and m:
                target = int(m.group(1), 16)
                if target <= a and target in index:
                    body = [o for _, o, _ in ins[index[target]:i + 1]]
                    print(f"   loop 0x{target:x}-0x{a:x}: {mix(body)}")


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python3
"""Lists the Rust source files over 500 lines and the functions over 80 lines, outside tests.

    python3 scripts/check-sizes.py [DIR ...]      # default: src crates
    python3 scripts/check-sizes.py --all src      # also files and functions of tests

A function is counted from its `fn` line to its closing brace (comments and blank lines
included); functions inside `#[cfg(test)]` modules or files under `tests/` are left out
unless --all. Exits 1 when anything is over, so it can run in CI.
"""
import os
import re
import sys

MAX_FILE, MAX_FN = 500, 80
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip(line):
    """The line without string literals and // comments (good enough for brace counting)."""
    line = re.sub(r"'(\\.|[^'\\])'", "' '", line)  # char literals such as '{'
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    return line.split("//", 1)[0]


def functions(lines):
    """(name, first line, last line, in a test module) of each fn with a body."""
    out, test_depth, depth = [], [], 0
    pending_test = False
    stack = []  # (name, start, depth at its opening brace)
    for i, raw in enumerate(lines):
        line = strip(raw)
        if re.match(r"^\s*#\[cfg\(test\)\]", raw):
            pending_test = True
        m = FN.match(line)
        if m:
            stack.append([m.group(7), i, None])
        for ch in line:
            if ch == "{":
                depth += 1
                if pending_test and re.match(r"^\s*(pub(\([^)]*\))?\s+)?mod\s", line):
                    test_depth.append(depth)
                    pending_test = False
                if stack and stack[-1][2] is None:
                    stack[-1][2] = depth
            elif ch == "}":
                if stack and stack[-1][2] == depth:
                    name, start, _ = stack.pop()
                    out.append((name, start + 1, i + 1, bool(test_depth)))
                if test_depth and test_depth[-1] == depth:
                    test_depth.pop()
                depth -= 1
            elif ch == ";" and stack and stack[-1][2] is None:
                stack.pop()  # a declaration without a body (trait method)
        if pending_test and not re.match(r"^\s*(#|$)", raw) and "mod" not in line:
            pending_test = False
    return out


def main():
    args = sys.argv[1:]
    everything = "--all" in args
    roots = [a for a in args if a != "--all"] or ["src", "crates"]
    over = 0
    for root in roots:
        for d, _, files in os.walk(root):
            for f in sorted(files):
                if not f.endswith(".rs") or "/target" in d:
                    continue
                path = os.path.join(d, f)
                in_tests = "/tests" in "/" + path or f in ("tests.rs",) or "/tests/" in path
                if in_tests and not everything:
                    continue
                lines = open(path, encoding="utf-8").read().split("\n")
                n = len(lines) - (lines[-1] == "")
                if n > MAX_FILE:
                    print(f"{path}: {n} lines")
                    over += 1
                for name, a, b, test in functions(lines):
                    if b - a + 1 > MAX_FN and (everything or not test):
                        print(f"{path}:{a}: fn {name}: {b - a + 1} lines")
                        over += 1
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()

"""Print which pinned packages moved between two `pip freeze` files: `python .ci/moved.py OLD NEW`."""

import re
import sys


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return out


def main(old_path: str, new_path: str) -> None:
    old, new = pins(old_path), pins(new_path)
    rows = [(name, old.get(name, "-"), new.get(name, "-")) for name in sorted(old.keys() | new.keys())]
    moved = [r for r in rows if r[1] != r[2]]
    print(f"{len(moved)} of {len(rows)} packages moved against {old_path}:")
    for name, a, b in moved:
        print(f"  {name:32} {a:>16} -> {b}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

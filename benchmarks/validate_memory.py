"""Peak memory of validating a large upload: what `slmtune data validate` and the service's upload
check hold while reading a file (issue: validation used to take ~100x the file's size).

    python benchmarks/validate_memory.py --mb 50

Writes a file of `--mb` MB in three shapes (all valid chat lines; all invalid lines; half and
half), validates each in a fresh process, and prints next to the file size the peak of Python allocations made while
validating (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GOOD = json.dumps({"messages": [{"role": "user", "content": "How long does the battery last? " * 4},
                                {"role": "assistant", "content": "About ten hours on a full charge. " * 4}]})
BAD = '{"messages": [{"role": "user", "content": "a line that is cut off'


def write(path: Path, mb: int, shape: str) -> None:
    lines = {"valid": [GOOD], "invalid": [BAD], "mixed": [GOOD, BAD]}[shape]
    target, written, i = mb * 2**20, 0, 0
    with path.open("w") as f:
        while written < target:
            line = lines[i % len(lines)] + "\n"
            f.write(line)
            written += len(line)
            i += 1


def measure(path: Path) -> tuple[float, int]:
    """(peak MB of Python allocations while validating, errors), in a fresh process (tracemalloc:
    every allocation the validation makes, whatever the imports left behind)."""
    code = ("import sys, json, tracemalloc; from slmtune.data.validate import validate_file;"
            "tracemalloc.start(); r = validate_file(sys.argv[1]);"
            "print(json.dumps([tracemalloc.get_traced_memory()[1] / 2**20, r.n_errors]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    print(f"{'file':<10}{'size MB':>9}{'errors':>10}{'peak allocated MB':>19}{'x file size':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("valid", "invalid", "mixed"):
            path = Path(tmp) / f"{shape}.jsonl"
            write(path, args.mb, shape)
            size = path.stat().st_size / 2**20
            peak, errors = measure(path)
            print(f"{shape:<10}{size:>9.1f}{errors:>10}{peak:>19.2f}{peak / size:>12.3f}x")
            path.unlink()


if __name__ == "__main__":
    main()

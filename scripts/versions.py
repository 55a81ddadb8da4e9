"""The versions installed in this interpreter's environment, against constraints.txt.

Standard library only (it runs in any of the project's virtual environments):

    python scripts/versions.py --short                 # the versions that matter most, one line
    python scripts/versions.py --diff constraints.txt  # what differs from the tested set
    python scripts/versions.py --freeze constraints.txt  # write the tested set (scripts/lock)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import platform
import re
import sys
from pathlib import Path

#: the packages whose releases have broken or may break the suite, shown first
KEY_PACKAGES = ("torch", "transformers", "transformer-lens", "tokenizers", "huggingface-hub",
                "accelerate", "datasets", "numpy", "pyarrow", "dadapy", "sphinx")
#: never pinned: the project itself, and the installer's own tools
NOT_PINNED = {"tl-vlm", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Canonical name -> version, without local labels (``2.13.0+cpu`` -> ``2.13.0``: the
    pin then matches the CPU and the CUDA build alike)."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version.split("+")[0]
    return found


def read_constraints(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def short() -> str:
    have = installed()
    return ", ".join(f"{p} {have[p]}" for p in KEY_PACKAGES if p in have)


def diff(path: Path) -> int:
    """Print the packages whose installed version differs from the constraints."""
    pins, have = read_constraints(path), installed()
    rows = [(name, pins.get(name, "-"), have.get(name, "-"))
            for name in sorted(set(pins) | set(have) - NOT_PINNED)
            if pins.get(name) != have.get(name)]
    rows.sort(key=lambda r: (r[0] not in KEY_PACKAGES, r[0]))
    if not rows:
        print(f"none: every installed version is the one in {path}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'package':<{width}}  {path.name:<14}  installed")
    for name, pinned, version in rows:
        print(f"{name:<{width}}  {pinned:<14}  {version}")
    return 0


def freeze(path: Path) -> int:
    have = installed()
    pins = sorted((n, v) for n, v in have.items() if n not in NOT_PINNED)
    header = (
        "# The versions the test suite passed on: scripts/test, scripts/narrow-gate,\n"
        "# scripts/docs and .ci/run install with them (pip install -c constraints.txt).\n"
        "# pyproject.toml keeps open ranges for users. Refresh: bash scripts/test --latest,\n"
        "# fix what fails, then bash scripts/lock .venv-latest (README, \"Versions\").\n"
        f"# Written {datetime.date.today().isoformat()} on Python {platform.python_version()}"
        f" ({sys.platform}); torch is the CPU build there (the pin matches any build).\n")
    path.write_text(header + "".join(f"{n}=={v}\n" for n, v in pins))
    print(f"wrote {path}: {len(pins)} pins ({short()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--short", action="store_true")
    group.add_argument("--diff", type=Path, metavar="CONSTRAINTS")
    group.add_argument("--freeze", type=Path, metavar="CONSTRAINTS")
    args = parser.parse_args(argv)
    if args.short:
        print(short())
        return 0
    return diff(args.diff) if args.diff else freeze(args.freeze)


if __name__ == "__main__":
    sys.exit(main())

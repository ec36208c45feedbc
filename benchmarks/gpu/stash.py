"""On the offline machine, with an upload that is not the last: `python3 -m benchmarks.gpu.stash`.

Moves the parts this command carried (`.gpu/upload-N/`) out of the checkout into the stash
(/tmp/mimo-mlx-gpu), checked against the manifest, where they wait for the rest. Standard library
only: nothing is installed yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bundle import STASH, BundleError, stash

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=REPO / ".gpu")
    parser.add_argument("--stash", type=Path, default=STASH)
    args = parser.parse_args(argv)
    try:
        manifest, waiting = stash(args.prepared, args.stash)
    except BundleError as err:
        sys.exit(f"stash: {err}")
    parts = manifest["parts"]
    print(f"stash: {len(waiting)} of {len(parts)} parts in {args.stash}: {', '.join(waiting)}")


if __name__ == "__main__":
    main()

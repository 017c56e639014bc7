"""Plot tokens per large-model forward against wall time per token for every method of some bench runs.

    python scripts/plot_variants.py runs/variants-humaneval/results.json runs/variants-de-en/results.json \
        --out docs/variants.png

Each ``results.json`` is one `bild bench` run (e.g. of ``configs/variants/*.yaml``); each gets its own colour.
"""

from __future__ import annotations

import argparse
import json

from bild.bench.plot import plot_variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files written by `bild bench`")
    parser.add_argument("--out", default="variants.png", help="the PNG to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = [json.loads(open(path, encoding="utf-8").read()) for path in args.results]
    print(f"wrote {plot_variants(results, args.out)}")


if __name__ == "__main__":
    main()

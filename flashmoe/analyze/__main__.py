"""`python -m flashmoe.analyze PATH [--format md|csv] [--out DIR]`: table out, files to DIR."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashmoe.analyze.report import summarize, to_csv, to_markdown, write_plot
from flashmoe.analyze.runs import AnalyzeError, load_runs
from flashmoe.errors import FlashMoeError

PROG = "flashmoe.analyze"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="One row per run under PATH (a run dir, a sweep dir, or a folder of them), "
        "sorted by the swept config keys; writes summary.csv and summary.png.",
    )
    p.add_argument("path", type=Path, help="run dir, multirun sweep dir, or a folder holding them")
    p.add_argument("--format", choices=("md", "csv"), default="md",
                   help="what to print (default md)")
    p.add_argument("--out", type=Path, default=None,
                   help="where summary.csv and summary.png go (default PATH)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    runs = load_runs(args.path)
    for r in runs:
        for warning in r.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    rows = summarize(runs)
    csv_text = to_csv(rows)
    out = args.out or (args.path.parent if args.path.is_file() else args.path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.csv").write_text(csv_text, encoding="utf-8")
        write_plot(rows, out / "summary.png")
    except OSError as e:
        reason = e.strerror or e
        raise AnalyzeError(f"cannot write summary.csv/summary.png to --out={out}: {reason}") from e
    sys.stdout.write(csv_text if args.format == "csv" else to_markdown(rows))
    print(f"{PROG}: wrote {out / 'summary.csv'} and {out / 'summary.png'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except FlashMoeError as e:
        # One line, no traceback: the message already says what to fix.
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

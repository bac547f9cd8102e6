"""Regenerate the README's benchmark table from ``benchmarks/results/*.json`` (figures are never typed).

    python -m benchmarks.report            # rewrites the block between the markers in README.md
    python -m benchmarks.report --check    # exit 1 if README.md is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cdface.core.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _meets(record: dict) -> str:
    """'yes' / 'no' for targets of the form '[ratio|value] >=|<= X [(comment)]'; blank for compound ones."""
    match = re.fullmatch(r"\s*(ratio|value)?\s*(>=|<=)\s*([0-9.eE+-]+)\s*(\(.*\))?\s*", record.get("target", ""))
    if not match:
        return ""
    subject = record.get("value") if match.group(1) == "value" else record.get("ratio")
    if subject is None:
        return ""
    bound = float(match.group(3))
    ok = subject >= bound if match.group(2) == ">=" else subject <= bound
    return "yes" if ok else "**no**"


def table(results_dir: Path = RESULTS) -> str:
    rows = ["| benchmark | metric | value | baseline | ratio | target | met | machine | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        m = r.get("machine", {})
        machine = f"{m.get('cores')} cores {m.get('cpu', '')}" + (f", {m['gpu']}" if m.get("gpu") else "")
        rows.append(f"| {r['name']} | {r['metric']} | {_number(r['value'])} | {_number(r.get('baseline'))} | "
                    f"{_number(r.get('ratio'))} | {r.get('target', '')} | {_meets(r)} | {machine}, {r.get('date', '')[:10]}"
                    f" @ {r.get('git', '')} | `{r.get('command', '')}` |")
    return "\n".join(rows)


def render(readme: str, results_dir: Path = RESULTS) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(results_dir)}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text()
    updated = render(current)
    if args.check:
        sys.exit(0 if updated == current else 1)
    if updated != current:
        atomic_write_text(README, updated)
    print(f"README benchmark table: {len(list(RESULTS.glob('*.json')))} results")


if __name__ == "__main__":
    main()

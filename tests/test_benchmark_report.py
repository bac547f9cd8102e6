"""The README's benchmark table is generated from benchmarks/results, never typed: it must be in step."""

import json

from benchmarks import report


def test_readme_table_matches_the_result_files():
    readme = report.README.read_text()
    assert report.render(readme) == readme, "run: python -m benchmarks.report"


def test_every_result_has_the_required_fields():
    required = {"name", "metric", "value", "baseline", "ratio", "target", "command", "machine", "date", "git"}
    files = sorted(report.RESULTS.glob("*.json"))
    assert files
    for path in files:
        record = json.loads(path.read_text())
        assert required <= record.keys(), path.name
        assert record["name"] == path.stem


def test_target_verdicts():
    assert report._meets({"target": ">= 1.5", "ratio": 1.6}) == "yes"
    assert report._meets({"target": "<= 1.25", "ratio": 1.3}) == "**no**"
    assert report._meets({"target": "value >= 0.75 (chance 0.5)", "value": 0.8, "ratio": 0.9}) == "yes"
    assert report._meets({"target": "ratio <= 0.2 with recall >= 0.99", "ratio": 0.1}) == ""

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


def _readme_commands() -> set[str]:
    """The commands of the README's benchmark block (``python -m benchmarks...`` lines, comments dropped)."""
    section = report.README.read_text().split("## Benchmarks", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return {line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("python -m")}


def test_every_result_was_made_by_a_command_the_readme_gives():
    listed = _readme_commands()
    for path in sorted(report.RESULTS.glob("*.json")):
        command = json.loads(path.read_text())["command"]
        assert command in listed, f"{path.name} was made by `{command}`, which the README's benchmark block lacks"

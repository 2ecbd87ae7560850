"""`foundex demo` output when it is not on a terminal: plain lines, no bars, no colour codes."""

from __future__ import annotations

import re

from tests.conftest import ROOT, copy_feature_repo


def test_demo_output_is_plain_when_not_a_terminal(tmp_path, redis_url, capfd):
    """Progress asked for, but stdout and stderr are captured (not terminals): no carriage
    returns, no ANSI escapes from our bars or from Feast's materialize, and one heading plus one
    `done in` line per stage, in README's order."""
    from api.pipeline import STAGES, DemoSize, run_demo
    from store_bridge.repo import FeatureRepo

    path = copy_feature_repo(tmp_path / "feature_repo")
    yaml_path = path / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: demo_out"))
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line)  # as the CLI's typer.echo would: onto the captured stdout

    run_demo(FeatureRepo(path), redis_url, DemoSize.tiny(), progress=True, say=say)
    out, err = capfd.readouterr()
    for name, text in [("stdout", out), ("stderr", err)]:
        assert "\r" not in text, f"carriage return on {name}: {text[-500:]!r}"
        assert "\x1b[" not in text, f"ANSI escape on {name}: {text[-500:]!r}"
    headings = [s for s in lines if re.match(r"\d+/\d+ ", s)]
    assert headings == [f"{i}/{len(STAGES)} {title}" for i, title in enumerate(STAGES, 1)]
    assert len([s for s in lines if re.fullmatch(r" {4}done in \d+\.\d+s", s)]) == len(STAGES)
    # The live stage, last: events replayed and their rate, consumers caught up, visibility.
    live = lines[lines.index(headings[-1]) + 1 :]
    assert re.fullmatch(r" {4}replayed [\d,]+ events \(the log's last 5%, re-timed to now, as "
                        r"new users: id \+ 100\): ingested in \d+\.\d+s \([\d,]+ events/s\)",
                        live[0]), live
    assert re.fullmatch(r" {4}histories and offline log caught up \d+\.\d+s after ingestion "
                        r"began", live[1]), live
    assert re.fullmatch(r" {4}event-to-TAE visibility \(FM v1, 20 probes\): p50 \d+\.\d ms, "
                        r"p99 \d+\.\d ms", live[2]), live


def test_stages_match_the_readme():
    """The demo prints as many stages as README's "What `foundex demo` does" lists."""
    from api.pipeline import STAGES

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What `foundex demo` does", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^(\d+)\. ", section, flags=re.MULTILINE)
    assert steps == [str(i) for i in range(1, len(STAGES) + 1)]


def test_transfer_ratio_is_na_when_the_second_fm_is_not_better():
    """TR is a ratio of two NE gains: where the larger FM is worse, it is shown as n/a rather
    than as the (meaningless) ratio of two regressions."""
    from api.pipeline import DemoReport, ne_table

    report = DemoReport(
        windows={},
        fm_ne={"v1": {"click": 0.90, "like": 0.95}, "v2": {"click": 0.80, "like": 0.97}},
        expert_ne={"e1": {"click": 0.92, "like": 0.96, "hide": 0.99},
                   "e2": {"click": 0.86, "like": 0.98, "hide": 0.98}},
        experts={"e1": "v1", "e2": "v2"},
        unseen_tasks=["hide"],
    )
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip()
            for line in ne_table(report).splitlines()[2:]}
    assert rows["click"] == "0.6000"  # (0.92 - 0.86) / (0.90 - 0.80)
    assert rows["like"] == "n/a"  # FM v2 is worse on like: 0.97 > 0.95
    assert rows["hide (unseen by FM)"] == "-"  # no FM head

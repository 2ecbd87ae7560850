"""`foundex paper-tables` as a user runs it: through the CLI, on a MovieLens-format ratings file
that the test writes, and its errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_ratings(path: Path, n_users: int = 120, n_items: int = 150, per_user: int = 40) -> None:
    """ml-100k `u.data` (user, item, rating, unix time; tab separated). Ratings follow user and
    item factors, so there is something to learn; users rate over a month, some per session."""
    rng = np.random.default_rng(11)
    u_f, i_f = rng.normal(size=(n_users, 4)), rng.normal(size=(n_items, 4))
    lines = []
    for u in range(n_users):
        items = rng.choice(n_items, per_user, replace=False)
        score = (u_f[u] @ i_f[items].T) / 2 + rng.normal(0, 0.5, per_user)
        rating = np.clip(np.round(3 + score), 1, 5).astype(int)
        ts = 880_000_000 + np.sort(rng.integers(0, 30 * 86_400, per_user)) // 600 * 600
        lines += [f"{u + 1}\t{i + 1}\t{r}\t{t}" for i, r, t in zip(items, rating, ts, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def foundex(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def test_paper_tables_on_movielens_through_the_cli(tmp_path):
    ratings = tmp_path / "u.data"
    write_ratings(ratings)
    out_dir = tmp_path / "out"
    proc = foundex(
        "paper-tables", "--data", "movielens", "--data-path", str(ratings), "--seeds", "0", "1",
        "--time-budget", "30", "--out", str(out_dir), "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["data"] == "movielens" and result["seeds"] == [0, 1]
    tables = result["tables"]
    # MovieLens: one surface; `dislike` is kept from the FM, so it is the unseen task.
    t1 = tables["table1_ne_diff_vs_nofm"]
    assert {(r["surface"], r["task"]) for r in t1} == {("movielens", "like"), ("movielens", "love")}
    for row in t1:
        for variant in ("ue", "tae", "ue_tae"):
            assert math.isfinite(row[variant]["mean"]) and row[variant]["n"] == 2
    assert [r["task"] for r in tables["table3_unseen_tasks"]] == ["dislike"]
    assert {r["task"] for r in tables["table2_fm_small_vs_large"]} == {"like", "love"}
    for row in tables["table2_fm_small_vs_large"]:  # a TR only where the large FM is better
        assert (row["tr"]["mean"] is not None) == row["fm_improved"], row
        assert row["fm_improved"] or row["tr_status"] == "n/a (FM did not improve)"
    targets = result["targets"]
    assert targets["transfer_ratio"]["meeting"] <= sum(
        r["fm_improved"] for r in tables["table2_fm_small_vs_large"]
    )
    failing = targets["ne_below_base_rate"]["failing"]
    assert all(c["ne"] >= 1 for c in failing)
    assert not (failing and targets["ne_below_base_rate"]["met"])  # NE >= 1 never passes
    (flops,) = tables["table4_flops"]
    assert 0 < flops["expert_flops"] < flops["one_stage_flops"]
    for png in result["plots"]:
        assert (out_dir / png).stat().st_size > 1000
    report = (out_dir / "report.md").read_text()
    assert report.startswith("# Paper tables: movielens") and report in proc.stdout
    assert json.loads((out_dir / "result.json").read_text())["tables"].keys() == tables.keys()


def test_paper_tables_names_bad_input(tmp_path):
    proc = foundex("paper-tables", "--data", "netflix", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--data" in proc.stderr and "movielens" in proc.stderr
    proc = foundex("paper-tables", "--data", "kuairand", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--data-path" in proc.stderr
    proc = foundex("paper-tables", "--data", "movielens", "--data-path", str(tmp_path / "nope"),
                   "--out", str(tmp_path))
    assert proc.returncode != 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    csv_dir = tmp_path / "ml-latest-small"  # --path (alias of --data-path) finds ratings.csv
    csv_dir.mkdir()
    (csv_dir / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,7.0,9\n")
    proc = foundex("paper-tables", "--data", "movielens", "--path", str(csv_dir),
                   "--out", str(tmp_path))
    assert proc.returncode != 0 and "ratings.csv" in proc.stderr and "half stars" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "u.data"
    bad.write_text("not\ta\tratings\tfile\n")
    proc = foundex("paper-tables", "--data", "movielens", "--data-path", str(bad), "--out", str(tmp_path))
    assert proc.returncode != 0 and "not a MovieLens ratings file" in proc.stderr
    assert "Traceback" not in proc.stderr

"""Real-data loaders on small files written here in the official formats."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from store_bridge.events.files import read_dataset, write_dataset
from store_bridge.events.kuairand import load_kuairand
from store_bridge.events.movielens import load_movielens

LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)
BASIC_HEADER = (
    "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
    "server_width,server_height,music_id,music_type,tag"
)


def write_kuairand(d, *, gz: bool) -> None:
    rows = [
        # user, video, date, hourmin, time_ms, click, like, follow, comment, forward, hate,
        # long_view, play, dur, pstay, cstay, profile_enter, rand, tab
        (1, 3, 20220425, 1100, 1650855600000, 1, 1, 0, 0, 0, 0, 1, 9, 9, 0, 0, 0, 0, 1),
        (1, 4, 20220425, 1100, 1650855600000, 0, 0, 0, 0, 0, 1, 0, 9, 9, 0, 0, 0, 0, 1),
        (2, 3, 20220425, 1230, 1650861000000, 1, 0, 1, 0, 0, 0, 0, 9, 9, 0, 0, 1, 0, 4),
        (2, 3, 20220425, 1230, 1650861000000, 1, 0, 1, 0, 0, 0, 0, 9, 9, 0, 0, 1, 0, 4),
        (1, 0, 20220426, 900, 1650934800000, 0, 0, 0, 0, 0, 0, 0, 9, 9, 0, 0, 0, 0, 1),
    ]
    text = LOG_HEADER + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    name = "log_standard_4_22_to_5_08_pure.csv"
    if gz:
        with gzip.open(d / f"{name}.gz", "wt") as f:
            f.write(text)
    else:
        (d / name).write_text(text)
    basic = [
        "0,1,NORMAL,2022-04-10,x,0.0,1.0,1.0,1.0,1,1.0,39",
        "3,1,NORMAL,2022-04-10,x,0.0,1.0,1.0,1.0,1,1.0,\"2,7\"",
        "4,1,AD,2022-04-10,x,0.0,1.0,1.0,1.0,1,1.0,",
    ]
    (d / "video_features_basic_pure.csv").write_text(BASIC_HEADER + "\n" + "\n".join(basic) + "\n")


@pytest.mark.parametrize("gz", [False, True])
def test_kuairand_loader(tmp_path, gz):
    write_kuairand(tmp_path, gz=gz)
    events, items, spec, report = load_kuairand(tmp_path)
    assert report.rows_read == 5 and report.duplicates_dropped == 1 and len(events) == 4
    assert spec.surfaces == ["tab1", "tab4"] and spec.unseen_tasks == ["hate"]
    assert set(spec.surface_tasks["tab4"]) == {
        "click", "long_view", "like", "follow", "comment", "forward", "profile_enter", "hate"
    }
    assert "hate" not in spec.fm_aux_tasks("tab1") and "like" in spec.fm_aux_tasks("tab1")
    assert str(events["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert events["event_timestamp"].iloc[0] == pd.Timestamp(1650855600000, unit="ms", tz="UTC")
    # the two impressions of user 1 at one instant are one request; the others are their own
    assert events["request_id"].tolist() == [0, 0, 1, 2]
    first = events.iloc[0]
    assert (first["click"], first["like"], first["long_view"], first["action"]) == (1, 1, 1, 7)
    assert events.iloc[1]["hate"] == 1 and events.iloc[1]["action"] == 0  # hate is never an action
    assert events.iloc[2]["action"] == 1 + 8  # click + social (follow / profile enter)
    assert events["hour"].tolist() == [11, 11, 12, 9]
    # category: first tag + 1 (0 = no tag)
    assert items.set_index("item_id").loc[[0, 3, 4], "category"].tolist() == [40, 3, 0]
    write_dataset(tmp_path / "out", events, items, spec)
    ev2, it2, spec2 = read_dataset(tmp_path / "out")
    pd.testing.assert_frame_equal(ev2, events[ev2.columns], check_dtype=False)
    assert spec2 == spec


def test_kuairand_hour_is_the_local_hour_of_time_ms(tmp_path):
    """KuaiRand's users are in China: the spec says Asia/Shanghai, and `hour` is the hour of
    `time_ms` there (what the FM derives), not `hourmin`, which rounds (16:45 UTC = 00:45 in
    Beijing reads hourmin 100 in the log) nor the UTC hour."""
    write_kuairand(tmp_path, gz=False)
    log = tmp_path / "log_standard_4_22_to_5_08_pure.csv"
    t = 1650905100000  # 2022-04-25 16:45:00 UTC
    log.write_text(log.read_text() + f"3,4,20220426,100,{t},0,0,0,0,0,0,0,9,9,0,0,0,0,4\n")
    events, _, spec, _ = load_kuairand(tmp_path)
    assert spec.time_zone == "Asia/Shanghai" and spec.fm_fields()["time_zone"] == "Asia/Shanghai"
    assert events["hour"].tolist() == [11, 11, 12, 0, 9]  # in time order
    assert events["event_timestamp"].iloc[3] == pd.Timestamp(t, unit="ms", tz="UTC")


def test_movielens_spec_is_utc(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t-3600\n2\t11\t3\t880000000\n")
    events, _, spec = load_movielens(tmp_path)
    assert spec.time_zone == "UTC"
    assert events["hour"].tolist() == [23, 4]  # 1969-12-31 23:00 and 1997-11-20 04:26 UTC


def test_kuairand_loader_names_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="log_"):
        load_kuairand(tmp_path)
    (tmp_path / "log_standard_x_pure.csv").write_text("user_id,video_id\n1,2\n")
    with pytest.raises(ValueError, match="columns missing"):
        load_kuairand(tmp_path)


def test_kuairand_shared_copy_if_present():
    """The partial KuaiRand-Pure copy beside the repo loads with its documented counts."""
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuairand-pure"
    if not d.exists():
        pytest.skip("shared/data/kuairand-pure is not beside this checkout")
    events, _, spec, report = load_kuairand(d)
    assert report.rows_read == 228_329
    assert len(spec.surfaces) == 15 and report.users == 25_156
    assert abs(events["click"].mean() - 0.442) < 0.01


@pytest.mark.parametrize("fmt", ["u.data", "ratings.dat"])
def test_movielens_loader(tmp_path, fmt):
    rows = [(1, 10, 5, 880000000), (1, 11, 2, 880000000), (2, 10, 4, 880000100), (2, 12, 3, 880000200)]
    sep = "\t" if fmt == "u.data" else "::"
    (tmp_path / fmt).write_text("\n".join(sep.join(map(str, r)) for r in rows) + "\n")
    events, items, spec = load_movielens(tmp_path)
    assert len(events) == 4 and spec.surfaces == ["movielens"]
    assert events["request_id"].tolist() == [0, 0, 1, 2]
    np.testing.assert_array_equal(events["like"], [1, 0, 1, 0])
    np.testing.assert_array_equal(events["love"], [1, 0, 0, 0])
    np.testing.assert_array_equal(events["dislike"], [0, 1, 0, 0])
    np.testing.assert_array_equal(events["action"], [5, 2, 4, 3])
    assert len(items) == 13


@pytest.mark.parametrize(
    "text", ["a\tb\tc\n", "not\ta\tratings\tfile\n", "1\t2\t9\t880000000\n", "", "1,2,3,4\n"]
)
def test_movielens_rejects_other_files(tmp_path, text):
    (tmp_path / "u.data").write_text(text)
    with pytest.raises(ValueError, match="not a MovieLens ratings file"):
        load_movielens(tmp_path)

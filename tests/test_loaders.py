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


# ---- MovieLens ratings.csv (ml-latest-small's format) -------------------------------------

T0 = 1_000_000_000  # 2001-09-09 01:46:40 UTC
CSV_ROWS = [  # userId, movieId, rating, timestamp; users rate batches within one second
    (42, 193609, "4.5", T0),  # user 42 rates three movies at T0: one request
    (42, 5, "5.0", T0),
    (42, 50, "2.0", T0),
    (7, 5, "0.5", T0),  # another user at the same second: a request of its own
    (7, 50, "3.5", T0 + 599),
    (7, 193609, "2.5", T0 + 600),  # a batch exactly at the FM window's end (see below)
    (7, 77, "4.0", T0 + 600),
    (1000, 5, "1.5", T0 + 800),  # a batch exactly at the eval window's start
    (1000, 77, "3.0", T0 + 800),
    (42, 77, "5", T0 + 1000),
]


def write_ratings_csv(path, rows, *, gz: bool) -> None:
    """The official layout: header, CRLF line ends (as in the GroupLens zip)."""
    text = "userId,movieId,rating,timestamp\r\n" + "".join(
        f"{u},{m},{r},{t}\r\n" for u, m, r, t in rows
    )
    if gz:
        with gzip.open(path, "wt", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, newline="")


@pytest.mark.parametrize("name", ["ratings.csv", "ratings.csv.gz"])
def test_movielens_ratings_csv(tmp_path, name):
    write_ratings_csv(tmp_path / name, CSV_ROWS, gz=name.endswith(".gz"))
    events, items, spec = load_movielens(tmp_path)  # the folder: the file is found by name
    assert len(events) == 10 and spec.surfaces == ["movielens"]
    # Dense ids in the order of the raw ids: users 7, 42, 1000; movies 5, 50, 77, 193609.
    assert (spec.n_users, spec.n_items, len(items)) == (3, 4, 4)
    assert items["item_id"].tolist() == [0, 1, 2, 3]
    # Time-ordered; inside one second by user, then item.
    assert events["user_id"].tolist() == [0, 1, 1, 1, 0, 0, 0, 2, 2, 1]
    assert events["item_id"].tolist() == [0, 0, 1, 3, 1, 2, 3, 0, 2, 2]
    # Tasks from the rating in stars: like >= 4, love == 5, dislike <= 2 (half stars too).
    rating = [0.5, 5.0, 2.0, 4.5, 3.5, 4.0, 2.5, 1.5, 3.0, 5.0]
    np.testing.assert_array_equal(events["like"], [r >= 4 for r in rating])
    np.testing.assert_array_equal(events["love"], [r == 5 for r in rating])
    np.testing.assert_array_equal(events["dislike"], [r <= 2 for r in rating])
    assert events["action"].tolist() == [int(r * 2) for r in rating]  # half stars 1..10
    assert spec.n_actions == 11 and spec.unseen_tasks == ["dislike"] and spec.time_zone == "UTC"
    # Microsecond UTC timestamps of the epoch seconds.
    assert str(events["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert events["event_timestamp"].iloc[0] == pd.Timestamp("2001-09-09 01:46:40", tz="UTC")
    assert events["event_timestamp"].iloc[-1] == pd.Timestamp(T0 + 1000, unit="s", tz="UTC")
    # One request per user and second: user 7 and user 42 at T0 are two requests.
    assert events["request_id"].tolist() == [0, 1, 1, 1, 2, 3, 3, 4, 4, 5]
    write_dataset(tmp_path / "out", events, items, spec)
    ev2, _, spec2 = read_dataset(tmp_path / "out")
    pd.testing.assert_frame_equal(ev2, events[ev2.columns], check_dtype=False)
    assert spec2 == spec


def test_movielens_ratings_csv_ties_are_one_request_on_one_side_of_the_split(tmp_path):
    """Ratings of one user at one second are one request whatever the file's row order, none
    of them is history for another, and no time window splits them."""
    from fm.history import UserHistories
    from store_bridge.events.schema import time_windows, timestamps_us

    write_ratings_csv(tmp_path / "ratings.csv", CSV_ROWS, gz=False)
    events, _, spec = load_movielens(tmp_path / "ratings.csv")
    shuffled = tmp_path / "shuffled" / "ratings.csv"
    shuffled.parent.mkdir()
    write_ratings_csv(shuffled, CSV_ROWS[::-1], gz=False)
    pd.testing.assert_frame_equal(load_movielens(shuffled)[0], events)  # deterministic

    # The FM window ends, and the eval window starts, exactly on a batch's second: the whole
    # batch is on the later side.
    windows = time_windows(events)
    assert windows["fm"][1] == pd.Timestamp(T0 + 600, unit="s", tz="UTC")
    assert windows["eval"][0] == pd.Timestamp(T0 + 800, unit="s", tz="UTC")
    ts = events["event_timestamp"]
    window = np.select(
        [ts < windows["fm"][1], ts < windows["eval"][0]], ["fm", "expert_train"], "eval"
    )
    assert window.tolist() == ["fm"] * 5 + ["expert_train"] * 2 + ["eval"] * 3
    assert (pd.Series(window).groupby(events["request_id"]).nunique() == 1).all()

    # History is strictly before the request's second: user 42's batch at T0 sees nothing,
    # user 7's batch at T0 + 600 sees the two earlier ratings and neither of its own.
    hist = UserHistories.from_events(events, spec.surfaces)
    rows = events[events["request_id"].isin([1, 3])]
    _, length = hist.lookup(rows["user_id"].to_numpy(), timestamps_us(rows["event_timestamp"]), 10)
    assert length.tolist() == [0, 0, 0, 2, 2]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("user,movie,rating,timestamp\n1,2,3.0,5\n", "header"),
        ("userId,movieId,rating,timestamp\n1,2,5.5,5\n", "half stars"),
        ("userId,movieId,rating,timestamp\n1,2,3.25,5\n", "half stars"),
        ("userId,movieId,rating,timestamp\n1,2,0,5\n", "half stars"),
        ("userId,movieId,rating,timestamp\n1,x,3.0,5\n", "not a number"),
        ("userId,movieId,rating,timestamp\n1.5,2,3.0,5\n", "integers"),
        ("userId,movieId,rating,timestamp\n", "empty"),
        ("", "not a MovieLens"),
    ],
)
def test_movielens_csv_rejects_other_files(tmp_path, text, problem):
    (tmp_path / "ratings.csv").write_text(text)
    with pytest.raises(ValueError, match="not a MovieLens ratings file") as err:
        load_movielens(tmp_path)
    assert problem in str(err.value)


def test_movielens_names_the_files_it_looks_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings.csv.gz"):
        load_movielens(tmp_path)


def test_movielens_latest_small_shared_copy_if_present():
    """The byte-original ml-latest-small beside the repo loads with its documented counts."""
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-latest-small"
    if not d.exists():
        pytest.skip("shared/data/movielens-latest-small is not beside this checkout")
    events, _, spec = load_movielens(d)
    assert (len(events), spec.n_users, spec.n_items) == (100_836, 610, 9_724)
    assert events["request_id"].nunique() == 85_046  # distinct (userId, timestamp)
    assert events["like"].sum() == 48_580  # ratings >= 4.0

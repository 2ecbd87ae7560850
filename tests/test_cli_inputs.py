"""The CLI at its edges: bad input gets one line (`error: ...`, exit 2) before anything heavy
starts; clean shutdowns stop the embedded Redis a command started; `foundex redis --detach`
returns and `--stop` stops it; training sets by extension, with times checked and said how
they were read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, copy_feature_repo, free_port, wait_for
from typer.testing import CliRunner

from api.cli import app
from store_bridge.redis_server import redis_client

T0 = pd.Timestamp("2026-01-05T00:45:00Z")  # every TAE in the test repo is logged at T0
DIM = 4


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """The CLI's callback turns SIGTERM/SIGHUP into an exit; keep pytest's own handlers."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _no_redis_env() -> dict[str, str]:
    """The environment of a subprocess that must use the embedded Redis."""
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FOUNDEX_REPO")}


def cli(*args: str, env: dict[str, str] | None = None):
    """The real `foundex` app, in-process, without REDIS_URL (the embedded Redis, if any)."""
    env = {"REDIS_URL": None, "FOUNDEX_REPO": None, **(env or {})}
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


# --- shutdown: what foundex started, it stops -------------------------------------------------


def test_sigterm_on_serve_stops_its_embedded_redis(tmp_path):
    repo = copy_feature_repo(tmp_path / "repo")
    state_file = repo / "data" / "redis" / "server.json"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--repo", str(repo), "--port", str(port)],
        cwd=ROOT, env=_no_redis_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "the service to answer", proc, timeout=120)
        state = json.loads(state_file.read_text())
        assert state["owner"] == proc.pid and redis_client(state["url"]).ping()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/fm-versions").json() == {"versions": []}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert not _alive(state["pid"]), "redis-server outlived `foundex serve`"
    assert not state_file.exists()
    # One log line per request (foundex's JSON line), no uvicorn access line beside it.
    assert out.count("/v1/fm-versions") == 1, out


def test_foreground_redis_is_stopped_by_sigterm_and_guarded_from_stop(tmp_path):
    repo = copy_feature_repo(tmp_path / "repo")
    state_file = repo / "data" / "redis" / "server.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "redis", "--repo", str(repo)],
        cwd=ROOT, env=_no_redis_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(state_file.exists, "server.json", proc, timeout=120)
        state = json.loads(state_file.read_text())
        # `--stop` leaves alone a server that a running foundex process owns.
        r = cli("redis", "--stop", "--repo", str(repo))
        assert one_line_error(r) == (
            f"error: the embedded redis at {state['url']} belongs to foundex process "
            f"{proc.pid}; stop that process and it stops the server"
        )
        assert redis_client(state["url"]).ping()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"export REDIS_URL={state['url']}" in out
    assert not _alive(state["pid"]) and not state_file.exists()


def test_a_server_left_by_a_killed_command_is_named_when_reused(tmp_path):
    """SIGKILL gives foundex no chance to stop its Redis: the next command reuses the server
    (its data is the repo's online store) and says whose it was and how to stop it."""
    repo = copy_feature_repo(tmp_path / "repo")
    state_file = repo / "data" / "redis" / "server.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "redis", "--repo", str(repo)],
        cwd=ROOT, env=_no_redis_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(state_file.exists, "server.json", proc, timeout=120)
        state = json.loads(state_file.read_text())
        proc.kill()
        proc.wait(timeout=30)
        assert redis_client(state["url"]).ping()  # orphaned, still serving
        again = subprocess.run(
            [sys.executable, "-m", "api.cli", "redis", "--detach", "--repo", str(repo)],
            cwd=ROOT, env=_no_redis_env(), capture_output=True, text=True, timeout=60,
        )
        assert again.returncode == 0, again.stderr
        assert again.stderr.splitlines() == [
            f"using embedded redis at {state['url']} (data in {state_file.parent})",
            f"note: foundex process {proc.pid} started it and exited without stopping it; "
            "`foundex redis --stop` stops it",
            f"`foundex redis --stop --repo {repo}` stops it.",
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
        if state_file.exists():
            from store_bridge.redis_server import stop_embedded

            stop_embedded(state_file.parent)


def test_redis_detach_returns_and_stop_stops(tmp_path):
    repo = copy_feature_repo(tmp_path / "repo")
    state_file = repo / "data" / "redis" / "server.json"
    cmd = [sys.executable, "-m", "api.cli", "redis", "--repo", str(repo)]
    # Output captured through pipes: the run returns only if the server holds none of them.
    first = subprocess.run([*cmd, "--detach"], cwd=ROOT, env=_no_redis_env(),
                           capture_output=True, text=True, timeout=60)
    try:
        assert first.returncode == 0, first.stderr
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in first.stdout.splitlines())
        url = exports["REDIS_URL"]
        port = url.rsplit(":", 1)[1].split("/")[0]
        assert exports == {"REDIS_URL": url, "FOUNDEX_FEAST_REDIS": f"127.0.0.1:{port},db=0"}
        assert redis_client(url).ping()
        state = json.loads(state_file.read_text())
        assert state["owner"] is None and _alive(state["pid"])
        assert first.stderr.startswith(f"started embedded redis at {url}")
        # Another command reuses it and leaves it running when it ends.
        again = subprocess.run([*cmd, "--detach"], cwd=ROOT, env=_no_redis_env(),
                               capture_output=True, text=True, timeout=60)
        assert again.stdout == first.stdout and again.stderr.startswith("using embedded redis")
        assert redis_client(url).ping()

        stop = subprocess.run([*cmd, "--stop"], cwd=ROOT, env=_no_redis_env(),
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and stop.stderr.strip() == f"stopped embedded redis at {url}"
        assert not _alive(state["pid"]) and not state_file.exists()
        stop = subprocess.run([*cmd, "--stop"], cwd=ROOT, env=_no_redis_env(),
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and stop.stderr.strip() == f"no embedded redis running for {repo}"
    finally:
        if state_file.exists():
            from store_bridge.redis_server import stop_embedded

            stop_embedded(state_file.parent)


# --- cheap checks come first ------------------------------------------------------------------


def test_wrong_arguments_fail_before_torch_feast_or_redis(tmp_path):
    """`fm retire v9` used to take ~10 s (torch, Feast, an embedded Redis) to say v9 is
    unknown; now nothing heavy loads and no server starts before the checks pass."""
    repo = copy_feature_repo(tmp_path / "repo")
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'feast') if m in sys.modules)))\n"
        "from api.cli import app\n"
        "app(sys.argv[1:], prog_name='foundex')\n"
    )
    cases = [
        (["fm", "retire", "v9"], "error: unknown FM version 'v9' (known: none)"),
        (["fm", "gc", "v9"], "error: unknown FM version 'v9' (known: none)"),
        (["fm", "retire", "latest"], "error: 'latest' is not an FM version name (v1, v2, ...)"),
        (["fm", "publish", str(tmp_path / "nope.pt"), "--train-start", "2026-01-01",
          "--train-end", "2026-01-02"], f"error: checkpoint not found: {tmp_path / 'nope.pt'}"),
    ]
    for args, message in cases:
        out = subprocess.run(
            [sys.executable, "-c", script, *args, "--repo", str(repo)],
            cwd=ROOT, env=_no_redis_env(), capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 2 and out.stderr.strip() == message, (args, out.stderr)
        assert out.stdout.strip() == "[]", (args, out.stdout)  # neither torch nor feast loaded
    assert not (repo / "data" / "redis").exists()


# --- fm publish -------------------------------------------------------------------------------


def _checkpoint(path: Path, seed: int) -> Path:
    import torch

    from fm import FMConfig, FoundationModel, save_checkpoint
    from fm.testing import toy_config_kwargs

    torch.manual_seed(seed)
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12, content_dim=3)
    return save_checkpoint(FoundationModel(cfg, torch.randn(40, 3)), path)


def test_publish_refuses_bad_windows_and_foreign_files_in_one_line(tmp_path):
    import torch

    repo = copy_feature_repo(tmp_path / "repo")
    ckpt = _checkpoint(tmp_path / "fm.pt", 0)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # loadable only by running code from the file
    tensors = tmp_path / "tensors.pt"
    torch.save({"w": torch.ones(2)}, tensors)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")

    def publish(path: Path, start: str, end: str, *more: str):
        return cli("fm", "publish", str(path), "--train-start", start, "--train-end", end,
                   "--repo", str(repo), *more)

    ok = ("2026-01-01", "2026-01-08")
    cases = [
        (ckpt, "notadate", ok[1],
         "error: train-start 'notadate' is not an ISO 8601 time (e.g. 2026-01-05 or "
         "2026-01-05T10:00:00Z)"),
        (ckpt, "2026-01-08", "2026-01-01",
         "error: training window is empty or reversed: train-end 2026-01-01T00:00:00+00:00 is "
         "not after train-start 2026-01-08T00:00:00+00:00"),
        (ckpt, "2026-01-08T02:00:00+02:00", "2026-01-08T00:00:00Z",  # the same instant
         "error: training window is empty or reversed: train-end 2026-01-08T00:00:00+00:00 is "
         "not after train-start 2026-01-08T00:00:00+00:00"),
        (ckpt, "1767225600", ok[1],
         "error: train-start '1767225600' is a number; give an ISO 8601 time such as "
         "2026-01-05T00:00:00Z (epoch numbers are not accepted: their unit is ambiguous)"),
        (ckpt, "1969-12-31", ok[1],
         "error: train-start '1969-12-31' is outside the supported range 1970-01-01 .. "
         "2262-04-10 (UTC)"),
        (ckpt, "9999-01-01", "9999-01-02",
         "error: train-start '9999-01-01' is outside the supported range 1970-01-01 .. "
         "2262-04-10 (UTC)"),
        (notes, *ok, f"error: {notes} is not an FM checkpoint: not a PyTorch archive"),
        (module, *ok,
         f"error: {module} is not a foundex-fm/1 checkpoint: it holds Python objects other "
         "than tensors and plain data, which foundex does not load"),
        (tensors, *ok, f"error: {tensors} is not a foundex-fm/1 checkpoint"),
    ]
    for path, start, end, message in cases:
        r = publish(path, start, end)
        assert one_line_error(r) == message, (start, end, path)
        assert "weights_only" not in r.output
    future = publish(ckpt, "2026-01-01", "2100-01-01")
    assert one_line_error(future).startswith(
        "error: train-end 2100-01-01T00:00:00+00:00 is in the future"
    )
    assert not (repo / "data" / "redis").exists() and not (repo / "data" / "checkpoints").exists()
    helps = cli("fm", "publish", "--help").output
    for words in ("TTL of the version's Feast", "shown by `foundex fm list`", "--allow-duplicate",
                  "without an offset it is UTC"):
        assert words in " ".join(helps.replace("│", " ").split()), words
    demo_help = " ".join(cli("demo", "--help").output.replace("│", " ").split())
    assert "no progress bars" in demo_help and "about 40 s on 2 CPU cores" in demo_help


# --- training-set -----------------------------------------------------------------------------


@pytest.fixture
def ts_repo(tmp_path) -> Path:
    """A repo with v1 (active, TAEs for users 1-2 x items 10-11 at T0) and v2 (retired), an
    expert pinning each, and item features; no Redis is involved."""
    from experts import ExpertConfig, save_expert_config
    from store_bridge.repo import FeatureRepo, FMVersion, Manifest

    path = copy_feature_repo(tmp_path / "repo")
    repo = FeatureRepo(path)
    versions = {
        v: FMVersion(version=v, dim=DIM, checkpoint=f"checkpoints/{v}.pt", digest=f"d{v}",
                     status=status, training_window=("2026-01-01", "2026-01-02"),
                     created_at="2026-01-02", ttl_seconds=86400)
        for v, status in (("v1", "active"), ("v2", "retired"))
    }
    repo.save_manifest(Manifest(versions=versions))
    for name, v in (("e1", "v1"), ("e2", "v2")):
        save_expert_config(
            ExpertConfig(name=name, surface="feed", tasks=["click", "like"], fm_version=v),
            repo.experts_dir,
        )
    users, items = np.array([1, 1, 2, 2]), np.array([10, 11, 10, 11])
    matrix = np.arange(len(users) * DIM, dtype=np.float32).reshape(-1, DIM) / 7
    day = repo.tae_dir("v1") / "2026-01-05"
    day.mkdir(parents=True)
    flat = pa.array(matrix.reshape(-1))
    pq.write_table(
        pa.table({
            "user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
            "event_timestamp": pa.array(np.full(4, T0.value // 1000), pa.timestamp("us", tz="UTC")),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, DIM).cast(pa.list_(pa.float32())),
        }),
        day / "part-0.parquet",
    )
    pq.write_table(
        pa.table({
            "item_id": pa.array([10, 11], pa.int64()), "category": pa.array([1, 2], pa.int64()),
            "quality": pa.array([0.5, 0.25], pa.float32()),
            "event_timestamp": pa.array(np.zeros(2, np.int64), pa.timestamp("us", tz="UTC")),
        }),
        repo.data / "items.parquet",
    )
    return path


def _labels(times, **extra) -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame({"user_id": [1, 2, 1][:n], "item_id": [10, 11, 11][:n],
                         "event_timestamp": times, "click": [1.0, 0.0, 1.0][:n],
                         "like": [0.0, np.nan, 1.0][:n], **extra})


def _training_set(repo: Path, entities: Path, out: Path, expert: str = "e1"):
    return cli("training-set", "--expert", expert, "--entities", str(entities), "--out",
               str(out), "--repo", str(repo))


def test_training_set_refuses_bad_files_in_one_line(ts_repo, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = inputs / "labels.parquet"
    _labels(pd.to_datetime(["2026-01-05T01:00Z"] * 3)).to_parquet(good)
    not_parquet = inputs / "labels2.parquet"
    not_parquet.write_text("user_id,item_id\n1,2\n")
    missing = inputs / "missing.parquet"
    a_file = tmp_path / "ts"
    a_file.write_text("not a folder")
    (tmp_path / "x.parquet").mkdir()
    cases = [
        (missing, tmp_path / "ts.parquet", "e1", f"error: entities file not found: {missing}"),
        (good, tmp_path / "nowhere" / "ts.parquet", "e1",
         f"error: --out folder does not exist: {tmp_path / 'nowhere'}"),
        (good, tmp_path / "ts.txt", "e1",
         f"error: --out {tmp_path / 'ts.txt'}: the extension picks the format: .parquet or "
         ".csv for one file, none for a folder of parquet parts"),
        (good, inputs, "e1", f"error: --out {inputs} holds files that are not training-set "
         "parts (labels.parquet, labels2.parquet); choose a new or empty folder"),
        (good, a_file, "e1",
         f"error: --out {a_file} is a file; without an extension the output is a folder"),
        (good, tmp_path / "x.parquet", "e1",
         f"error: --out {tmp_path / 'x.parquet'} is a folder; a .parquet output is one file"),
        (good, good, "e1",
         f"error: --out {good} is the --entities file; write the training set elsewhere"),
        (good, ts_repo / "data" / "items.parquet", "e1",
         f"error: --out {ts_repo / 'data' / 'items.parquet'} is inside the repo's data folder "
         f"{ts_repo / 'data'} (the store's own files); write the training set elsewhere"),
        (not_parquet, tmp_path / "ts.parquet", "e1",
         f"error: {not_parquet}: not a readable parquet file (ArrowInvalid)"),
        (good, tmp_path / "ts.parquet", "nobody", "error: unknown expert 'nobody' (known: e1, e2)"),
        (good, tmp_path / "ts.parquet", "e2",
         "error: expert e2 pins FM version 'v2', which is retired (active: v1); re-pin it to an "
         "active version"),
    ]
    for entities, out, expert, message in cases:
        assert one_line_error(_training_set(ts_repo, entities, out, expert)) == message
    assert not (tmp_path / "ts.parquet").exists()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"user_id": [1], "item_id": [10],
                       "event_timestamp": pd.to_datetime(["2026-01-05T01:00Z"])}),
         "label rows lack label columns ['click', 'like'] for the expert's tasks "
         "['click', 'like'] (have: ['user_id', 'item_id', 'event_timestamp'])"),
        (_labels(pd.to_datetime(["2026-01-05T01:00Z"])).assign(like=["yes"]),
         "label columns ['like'] must be numeric (0/1, NaN where not applicable)"),
        (_labels(["2026-01-05T01:00:00Z", "yesterday"]),
         "event_timestamp holds text that is not an ISO 8601 time (row 1: 'yesterday'); use "
         "e.g. 2026-01-05T10:00:00Z or a timestamp column"),
        (_labels([1767575100, 1767575200]),
         "event_timestamp holds numbers (int64), not timestamps; epoch numbers are refused "
         "because their unit is ambiguous: convert them, e.g. pd.to_datetime(col, unit='s', "
         "utc=True)"),
        (_labels(["1767575100"]),
         "event_timestamp value '1767575100' (row 0) is a number; epoch numbers are refused "
         "because their unit is ambiguous: give ISO 8601 times or timestamps"),
        (_labels(pd.to_datetime(["2026-01-05T01:00Z", "1969-07-20T20:17Z"])),
         "event_timestamp 1969-07-20T20:17:00+00:00 (row 1) is outside the supported range "
         "1970-01-01 .. 2262-04-10 UTC (1 of 2 rows)"),
        (_labels(pd.Series(np.array(["2026-01-05", "9999-12-31"], "datetime64[us]"))
                 .dt.tz_localize("UTC")),
         "event_timestamp 9999-12-31T00:00:00+00:00 (row 1) is outside the supported range "
         "1970-01-01 .. 2262-04-10 UTC (1 of 2 rows)"),
        (_labels(pd.to_datetime(["2026-01-05T01:00Z", None])),
         "event_timestamp is missing on 1 of 2 rows (first: row 1)"),
        (_labels(pd.to_datetime(["2026-01-05T01:00Z"]), user_id=[1.5]),
         "user_id must hold whole numbers, got 1.5 (row 0)"),
    ],
    ids=["no-labels", "text-label", "not-iso", "int-epoch", "epoch-text", "before-1970",
         "far-future", "missing-time", "fractional-id"],
)
def test_training_set_refuses_bad_label_rows(ts_repo, tmp_path, frame, message):
    entities = tmp_path / "labels.parquet"
    frame.to_parquet(entities)
    got = one_line_error(_training_set(ts_repo, entities, tmp_path / "ts.parquet"))
    assert got == f"error: {entities}: {message}"
    assert not (tmp_path / "ts.parquet").exists()


def test_training_set_reads_times_as_stated_and_writes_by_extension(ts_repo, tmp_path):
    """TAEs are logged at 00:45 UTC. Naive 01:00 is UTC (after: an embedding); 01:30 in
    Berlin is 00:30 UTC (before: none); both outputs hold the same rows."""
    naive = _labels(pd.to_datetime(["2026-01-05 01:00", "2026-01-05 01:00", "2026-01-05 00:30"]))
    berlin = _labels(pd.to_datetime(["2026-01-05 02:00", "2026-01-05 02:00", "2026-01-05 01:30"])
                     .tz_localize("Europe/Berlin"))
    text = _labels(["2026-01-05T01:00:00Z", "2026-01-05T02:00:00+01:00", "2026-01-05 00:30"])
    outputs = {}
    for name, frame in (("naive", naive), ("berlin", berlin), ("text", text)):
        entities = tmp_path / f"{name}.parquet"
        frame.to_parquet(entities)
        for ext in (".parquet", ".csv"):
            out = tmp_path / f"{name}_ts{ext}"
            r = _training_set(ts_repo, entities, out)
            assert r.exit_code == 0, r.output
            assert r.stdout.strip() == f"wrote 3 rows to {out} (1 without an embedding)"
            outputs[name, ext] = out
        notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
        assert notes == {
            "naive": ["note: event_timestamp has no time zone; its times are taken as UTC"],
            "berlin": [],
            "text": ["note: event_timestamp: 1 of 3 times have no offset; taken as UTC"],
        }[name]

    want_times = pd.to_datetime(["2026-01-05T01:00Z", "2026-01-05T01:00Z", "2026-01-05T00:30Z"])
    want = np.arange(16, dtype=np.float32).reshape(4, DIM) / 7  # rows (1,10) (1,11) (2,10) (2,11)
    for name in ("naive", "berlin", "text"):
        got = pd.read_parquet(outputs[name, ".parquet"])
        assert got["event_timestamp"].dt.tz is not None
        assert list(got["event_timestamp"]) == list(want_times), name
        np.testing.assert_array_equal(got["embedding"][0], want[0])  # user 1, item 10
        np.testing.assert_array_equal(got["embedding"][1], want[3])  # user 2, item 11
        assert got["embedding"][2] is None  # 00:30 UTC is before the TAE's 00:45
        assert list(got["category"]) == [1, 2, 2] and list(got["click"]) == [1.0, 0.0, 1.0]

        csv = pd.read_csv(outputs[name, ".csv"], keep_default_na=False)
        assert pq.ParquetFile(outputs[name, ".parquet"]).metadata.num_rows == 3
        assert csv["embedding"][2] == ""
        for k in (0, 1):  # full float32 precision survives the text form
            np.testing.assert_array_equal(
                np.asarray(json.loads(csv["embedding"][k]), np.float32), got["embedding"][k]
            )
        assert list(pd.to_datetime(csv["event_timestamp"])) == list(want_times)
    helps = " ".join(cli("training-set", "--help").output.replace("│", " ").split())
    for words in ("user_id, item_id (integers), event_timestamp", "without a time zone it is UTC",
                  "one numeric column per expert task", "a .parquet or .csv file",
                  "a folder (no extension) of parquet parts"):
        assert words in helps, words


def test_training_set_joins_agree_and_auto_says_which_ran(ts_repo, tmp_path):
    """--join in-memory, --join bounded and a folder output give the same rows; a parquet or
    CSV file from the bounded join is in the input order, as in memory; auto with a tiny
    budget takes the bounded join and says so."""
    times = pd.to_datetime(["2026-01-05T01:00Z", "2026-01-05T01:00Z", "2026-01-05T00:30Z"])
    entities = tmp_path / "labels.parquet"
    _labels(times).to_parquet(entities)
    got = {}
    for join in ("in-memory", "bounded"):
        for ext in (".parquet", ".csv"):
            out = tmp_path / f"{join}{ext}"
            r = cli("training-set", "--expert", "e1", "--entities", str(entities), "--out",
                    str(out), "--repo", str(ts_repo), "--join", join)
            assert r.exit_code == 0, r.output
            assert f"join: {join} (asked for)" in r.stderr, r.stderr
            got[join, ext] = out
    mem = pd.read_parquet(got["in-memory", ".parquet"])
    bounded = pd.read_parquet(got["bounded", ".parquet"])
    pd.testing.assert_frame_equal(bounded.drop(columns="embedding"),
                                  mem.drop(columns="embedding"))
    assert [None if e is None else list(e) for e in bounded["embedding"]] == \
        [None if e is None else list(e) for e in mem["embedding"]]
    assert got["bounded", ".csv"].read_text() == got["in-memory", ".csv"].read_text()

    folder = tmp_path / "parts"
    r = cli("training-set", "--expert", "e1", "--entities", str(entities), "--out", str(folder),
            "--repo", str(ts_repo))
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith(f"wrote 3 rows to {folder} (")
    parts = pd.read_parquet(folder).sort_values("label_row").reset_index(drop=True)
    assert list(parts["label_row"]) == [0, 1, 2]
    assert [None if e is None else list(e) for e in parts["embedding"]] == \
        [None if e is None else list(e) for e in mem["embedding"]]

    out = tmp_path / "auto.parquet"
    r = cli("training-set", "--expert", "e1", "--entities", str(entities), "--out", str(out),
            "--repo", str(ts_repo), env={"FOUNDEX_TRAINING_SET_MEMORY_GIB": "0.000001"})
    assert r.exit_code == 0, r.output
    assert "join: bounded path: an in-memory join of 3 label rows" in r.stderr, r.stderr
    assert "over the budget" in r.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out), bounded)


def test_training_set_refuses_bad_options_and_settings_in_one_line(ts_repo, tmp_path):
    entities = tmp_path / "labels.parquet"
    _labels(pd.to_datetime(["2026-01-05T01:00Z"] * 3)).to_parquet(entities)
    base = ("training-set", "--expert", "e1", "--entities", str(entities), "--repo", str(ts_repo))
    cases = [
        ((*base, "--out", str(tmp_path / "a.parquet"), "--join", "sideways"), None,
         "error: --join 'sideways': one of auto, in-memory, bounded"),
        ((*base, "--out", str(tmp_path / "a.parquet"), "--engine", "spark"), None,
         "error: --engine 'spark': one of foundex, feast"),
        ((*base, "--out", str(tmp_path / "a.parquet"), "--engine", "feast", "--join", "bounded"),
         None, "error: --join bounded chooses foundex's own join; with --engine feast the "
         "offline store joins (drop --join)"),
        ((*base, "--out", str(tmp_path / "parts"), "--join", "in-memory"), None,
         "error: --join in-memory writes one file: give --out a .parquet or .csv name, or drop "
         f"--join to write {tmp_path / 'parts'} as a folder of parts (bounded join)"),
        ((*base, "--out", str(tmp_path / "a.parquet")), {"FOUNDEX_TRAINING_SET_MEMORY_GIB": "0"},
         "error: FOUNDEX_TRAINING_SET_MEMORY_GIB='0': input should be greater than 0"),
        ((*base, "--out", str(tmp_path / "a.parquet")), {"FOUNDEX_TRAINING_SET_BUCKET_MIB": "abc"},
         "error: FOUNDEX_TRAINING_SET_BUCKET_MIB='abc': input should be a valid integer, unable "
         "to parse string as an integer"),
    ]
    for args, env, message in cases:
        assert one_line_error(cli(*args, env=env)) == message
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "parts").exists()


def test_training_set_sweeps_what_a_killed_run_left(ts_repo, tmp_path):
    """Scratch beside --out named after a process that no longer runs is removed by the next
    run for that --out; a live process's (this one's) is left alone."""
    import subprocess

    entities = tmp_path / "labels.parquet"
    _labels(pd.to_datetime(["2026-01-05T01:00Z"] * 3)).to_parquet(entities)
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "ts.parquet"
    stale = [tmp_path / f".ts.parquet.work-{dead.pid}-ab12cd34",
             tmp_path / f".ts.parquet.partial-{dead.pid}-0123456789ab"]
    for d in stale:
        (d / "parts").mkdir(parents=True)
        (d / "parts" / "part-00000.parquet").write_bytes(b"half")
    (tmp_path / f".ts.parquet.tmp-{dead.pid}").write_bytes(b"half")
    live = tmp_path / f".ts.parquet.work-{os.getpid()}-ffffffff"
    live.mkdir()
    other = tmp_path / f".other.parquet.tmp-{dead.pid}"
    other.write_bytes(b"another output's")
    r = cli("training-set", "--expert", "e1", "--entities", str(entities), "--out", str(out),
            "--repo", str(ts_repo), "--join", "bounded")
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".other.parquet.tmp-{dead.pid}", live.name, "labels.parquet", "repo",
                           "ts.parquet"])

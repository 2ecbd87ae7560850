"""REDIS_URL -> Feast's connection string: every part foundex's own client reads (ACL user,
password with any characters, db, TLS, options) reaches Feast's client unchanged, through the
real path (`${FOUNDEX_FEAST_REDIS}` expanded into feature_store.yaml, Feast's own parser), and
what Feast cannot express is refused at start-up with one line. Authentication is checked on a
real redis-server with a password on the default user and an ACL user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
import redis as redis_py
from conftest import ROOT, copy_feature_repo, free_port

from store_bridge.redis_server import FEAST_ENV, feast_connection_string, redis_client

NASTY = [
    "s3cret", "p,w", "a=b", "x y", "#not a comment", 'q"u\'o', "back\\slash", "true", "null",
    "123", "1.50", "é✓😀", "$HOME", "a: b", "%41", "{[,]}", "pw,db=5,host=evil",
]


def _feast_sees(conn: str, tmp_path: Path, monkeypatch) -> tuple[list[dict], dict]:
    """What Feast 0.67 makes of `conn`: its own yaml loader (with ${VAR} expansion) and its
    Redis store's connection-string parser, exactly as `feast` runs them."""
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.repo_config import load_repo_config

    repo = copy_feature_repo(tmp_path / "cfg")
    monkeypatch.setenv(FEAST_ENV, conn)
    cfg = load_repo_config(repo, repo / "feature_store.yaml")
    return RedisOnlineStore._parse_connection_string(cfg.online_store.connection_string)


@pytest.mark.parametrize("password", NASTY)
def test_password_and_user_reach_feast_unchanged(password, tmp_path, monkeypatch):
    user = "al,ice=1"
    url = f"redis://{quote(user, safe='')}:{quote(password, safe='')}@cache.example:6390/3"
    nodes, params = _feast_sees(feast_connection_string(url), tmp_path, monkeypatch)
    assert nodes == [{"host": "cache.example", "port": "6390"}]
    assert params["password"] == password and isinstance(params["password"], str)
    assert params["username"] == user
    assert params["db"] == 3
    # the same values foundex's own client authenticates with
    from redis.connection import parse_url

    assert (parse_url(url)["username"], parse_url(url)["password"]) == (user, password)


def test_tls_options_and_timeout_reach_feast(tmp_path, monkeypatch):
    url = "rediss://:pw@h:1/0?socket_keepalive=true&ssl_cert_reqs=none&health_check_interval=7"
    nodes, params = _feast_sees(feast_connection_string(url, timeout=0.25), tmp_path, monkeypatch)
    assert nodes == [{"host": "h", "port": "1"}]
    assert params == {
        "db": 0, "password": "pw", "ssl": True, "socket_keepalive": True,
        "ssl_cert_reqs": "none", "health_check_interval": 7,
        "socket_timeout": 0.25, "socket_connect_timeout": 0.25,
    }
    # readable where nothing needs escaping
    assert feast_connection_string("redis://localhost:6390/2") == "localhost:6390,db=2"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:1/0", "must start with redis:// or rediss://"),
        ("localhost:6379", "must start with redis:// or rediss://"),
        ("unix:///tmp/redis.sock", "unix:// sockets cannot be used"),
        ("redis://[::1]:6379/0", "IPv6 address"),
        ("redis://h:1/zero", "database must be a number, got 'zero'"),
        ("redis://h:99999/0", "invalid port"),
        ("redis://h:1/0?retry_on_error=x", "option retry_on_error cannot be passed to Feast"),
    ],
)
def test_urls_feast_cannot_use_are_refused_in_one_line(url, message):
    with pytest.raises(ValueError, match=message) as err:
        feast_connection_string(url)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_url_feast_cannot_use_before_anything_else(tmp_path):
    repo = copy_feature_repo(tmp_path / "repo")
    env = dict(os.environ, REDIS_URL="redis://:hunter2@[::1]:6379/0")
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "apply", "--repo", str(repo)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: REDIS_URL host ::1 is an IPv6 address, which Feast's Redis connection string "
        "cannot express (it splits host:port on ':'); use a host name"
    ]
    assert "hunter2" not in out.stderr


@pytest.fixture
def secured_redis(tmp_path):
    """A real redis-server on a free port: the default user needs a password, and an ACL user
    `al,ice` has another; both passwords hold characters Feast's parser splits on."""
    binary = os.environ.get("FOUNDEX_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        pytest.skip("no redis-server binary (set FOUNDEX_TEST_REDIS_SERVER)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    default_pw, user, user_pw = "p,w=1 #x", "al,ice", 'true,"b=2'
    try:
        plain = redis_py.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 15
        while True:
            try:
                plain.ping()
                break
            except redis_py.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        plain.acl_setuser(user, enabled=True, passwords=[f"+{user_pw}"], keys=["~*"],
                          channels=["&*"], commands=["+@all"])
        plain.config_set("requirepass", default_pw)
        host = f"127.0.0.1:{port}"
        yield {
            "default": f"redis://:{quote(default_pw, safe='')}@{host}/0",
            "acl": f"redis://{quote(user, safe='')}:{quote(user_pw, safe='')}@{host}/0",
            "wrong": f"redis://{quote(user, safe='')}:nope@{host}/0",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_foundex_and_feast_authenticate_with_password_and_acl_user(
    secured_redis, tmp_path, monkeypatch
):
    from feast import FeatureStore

    from store_bridge.feast_objects import build_definitions
    from store_bridge.repo import FeatureRepo

    urls = secured_redis
    for name in ("default", "acl"):
        assert redis_client(urls[name]).ping() is True, name
    with pytest.raises(redis_py.AuthenticationError):
        redis_client(urls["wrong"]).ping()

    repo = copy_feature_repo(tmp_path / "repo")
    yaml_path = repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: auth_t"))

    def store(url: str) -> FeatureStore:
        monkeypatch.setenv(FEAST_ENV, feast_connection_string(url, timeout=5))
        return FeatureStore(repo_path=str(repo))

    writer = store(urls["acl"])
    writer.apply(list(build_definitions(FeatureRepo(repo), []).values()))
    ts = pd.Timestamp("2026-01-05", tz="UTC")
    writer.write_to_online_store(
        "item_features",
        pd.DataFrame({"item_id": [7, 8], "category": [3, 4], "quality": [0.5, 0.25],
                      "event_timestamp": [ts, ts]}),
    )
    for name in ("acl", "default"):  # each reads what the ACL user wrote, through Feast
        got = store(urls[name]).get_online_features(
            ["item_features:category", "item_features:quality"],
            entity_rows=[{"item_id": 8}, {"item_id": 7}],
        ).to_dict()
        assert got["category"] == [4, 3] and got["quality"] == [0.25, 0.5], name
    with pytest.raises(redis_py.AuthenticationError):
        store(urls["wrong"]).get_online_features(
            ["item_features:quality"], entity_rows=[{"item_id": 7}]
        )


def test_exports_survive_the_shell(secured_redis, tmp_path):
    """`eval "$(foundex redis)"` with REDIS_URL set exports exactly what Feast needs."""
    repo = copy_feature_repo(tmp_path / "repo")
    url = secured_redis["acl"]
    script = (f'eval "$("{sys.executable}" -m api.cli redis --repo "{repo}")" && '
              f'printf "%s\\n%s" "$REDIS_URL" "${FEAST_ENV}"')
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=dict(os.environ, REDIS_URL=url),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == [url, feast_connection_string(url)]

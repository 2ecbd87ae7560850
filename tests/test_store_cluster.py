"""RedisEmbeddingStore on a real 3-node Redis Cluster started on loopback by the test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from store_bridge.feast_layout import entity_keys
from store_bridge.online import RedisEmbeddingStore

REDIS_SERVER = "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER), reason=f"{REDIS_SERVER} is absent: no Redis Cluster to start"
)


def _free_ports(n: int) -> list[int]:
    """Ports free on loopback together with their cluster-bus port (port + 10000)."""
    import random
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randrange(20000, 30000)
        if port not in ports and free(port) and free(port + 10000):
            ports.append(port)
    return ports


def _info(client: redis.Redis) -> dict[str, str]:
    raw = client.execute_command("CLUSTER INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


@pytest.fixture
def redis_cluster(tmp_path: Path):
    """Three masters on loopback, the 16384 slots split between them; stopped afterwards."""
    ports = _free_ports(3)
    procs: list[subprocess.Popen] = []
    try:
        for port in ports:
            node_dir = tmp_path / f"node{port}"
            node_dir.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000", "--dir", str(node_dir),
                        "--save", "", "--appendonly", "no", "--daemonize", "no",
                    ],  # fmt: skip
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )
            )
        clients = [redis.Redis(port=p, socket_timeout=2) for p in ports]
        deadline = time.monotonic() + 20
        for c in clients:
            while True:
                try:
                    c.ping()
                    break
                except redis.ConnectionError:
                    assert all(p.poll() is None for p in procs), "a redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
        # Slots split in three, then every node meets the first one.
        bounds = np.linspace(0, 16384, 4).astype(int)
        for c, lo, hi in zip(clients, bounds[:-1], bounds[1:], strict=True):
            c.execute_command("CLUSTER ADDSLOTSRANGE", int(lo), int(hi) - 1)
        for c in clients[1:]:
            c.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + 30
        while not all(
            _info(c).get("cluster_state") == "ok" and _info(c).get("cluster_known_nodes") == "3"
            for c in clients
        ):
            assert time.monotonic() < deadline, "the cluster did not reach state ok"
            time.sleep(0.1)
        for c in clients:
            c.close()
        yield ports
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_read_write_on_a_three_node_cluster(redis_cluster):
    ports = redis_cluster
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports], socket_timeout=5
    )
    try:
        store = RedisEmbeddingStore(client, "cluster_t")
        rng = np.random.default_rng(7)
        dim, user = 128, 42
        items = rng.permutation(10_000)[:500].astype(np.int64)
        m = rng.normal(size=(500, dim)).astype(np.float32)
        stored = np.ones(500, dtype=bool)
        stored[[0, 17, 250, 499]] = False  # never written: must come back missing, by index
        ts = np.full(stored.sum(), 1_767_571_200_000_000, dtype=np.int64)
        written = store.write("v1", np.full(stored.sum(), user), items[stored], ts, m[stored])
        assert written == stored.sum()

        # The keys really are spread over all three nodes.
        keys = entity_keys("cluster_t", {"user_id": np.full(500, user), "item_id": items})
        nodes = {client.get_node_from_key(k).port for k in keys}
        assert nodes == set(ports)

        rows = store.read("v1", dim, user, items)
        assert rows.missing == [0, 17, 250, 499]
        np.testing.assert_array_equal(rows.matrix[stored], m[stored])
        assert np.isnan(rows.matrix[~stored]).all()

        # An older write does not roll values back; a newer one replaces them.
        assert store.write("v1", [user], items[1:2], ts[:1] - 1, np.zeros((1, dim))) == 0
        assert store.write("v1", [user], items[1:2], ts[:1] + 1, np.zeros((1, dim))) == 1
        np.testing.assert_array_equal(store.read("v1", dim, user, items[1:2]).matrix[0], 0)

        # gc's deletion scans every node.
        assert store.delete_version("v1") == stored.sum()
        assert store.read("v1", dim, user, items).missing == list(range(500))
    finally:
        client.close()


def test_bad_rows_and_times_on_a_cluster(redis_cluster):
    """The cluster paths (per-node pipelines) serve bad stored rows as missing and counted,
    read a key that holds no hash as undecodable, and overwrite a garbage stored time."""
    from store_bridge.feast_layout import encode_timestamp_us, ts_field
    from tests.test_store_decode import DIM, TS, USER, _check, _plant

    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", p) for p in redis_cluster], socket_timeout=5
    )
    try:
        store = RedisEmbeddingStore(client, "cluster_bad")
        items, m, _ = _plant(store, "v1")
        keys = entity_keys("cluster_bad", {"user_id": np.full(len(items), USER), "item_id": items})
        assert len({client.get_node_from_key(k).port for k in keys}) > 1
        _check(store.read("v1", DIM, USER, items), m)

        client.delete(keys[0])
        client.set(keys[0], b"a string, not a hash")
        rows = store.read("v1", DIM, USER, items[[0, 4]])
        assert rows.missing == [0] and rows.undecodable == [0]
        twos = np.full((2, DIM), 2.0, dtype=np.float32)
        assert store.write("v1", np.full(2, USER), items[[0, 6]], np.full(2, TS), twos) == 1
        assert client.get(keys[0]) == b"a string, not a hash"
        assert store.read("v1", DIM, USER, items[[6]]).matrix[0].tobytes() == twos[1].tobytes()
        client.delete(keys[0])

        tfield = ts_field("fm_tae_v1")
        client.hset(keys[4], tfield, b"\xff\x00garbage")
        client.hset(keys[11], tfield, encode_timestamp_us(TS + 10**9))  # newer: kept
        ones = np.ones((2, DIM), dtype=np.float32)
        assert store.write("v1", np.full(2, USER), items[[4, 11]], np.full(2, TS + 1), ones) == 1
        got = store.read("v1", DIM, USER, items[[4, 11]])
        np.testing.assert_array_equal(got.matrix[0], ones[0])
        assert got.matrix[1].tobytes() == m[11].tobytes()
        assert client.hget(keys[4], tfield) == encode_timestamp_us(TS + 1)
        store.delete_version("v1")
    finally:
        client.close()

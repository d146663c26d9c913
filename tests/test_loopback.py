"""A local Ray started by the commands (cluster.connect_ray) lives on 127.0.0.1 only."""
import ipaddress
import os

from lsep_tune.cluster import LOOPBACK_ENV, connect_ray, is_loopback


def listening(port: int) -> set[str]:
    """The local addresses TCP sockets of this machine listen on at `port` (from /proc; an IPv6 socket's
    IPv4-mapped address as the IPv4 one)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))  # host order words
            ip = ipaddress.ip_address(raw)
            found.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return found


def test_a_local_ray_binds_loopback(monkeypatch):
    import ray

    ray.shutdown()  # whatever an earlier test of this process left running
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect_ray(None, num_cpus=1, quiet=True)
    try:
        context = ray.get_runtime_context()
        host, port = context.gcs_address.rsplit(":", 1)
        assert host == "127.0.0.1" and listening(int(port)) == {"127.0.0.1"}  # the GCS, on loopback only
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]  # the node and its raylet
        raylet_port = ray.nodes()[0]["NodeManagerPort"]
        assert listening(raylet_port) == {"127.0.0.1"}
        worker_ip = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())
        assert worker_ip == "127.0.0.1"  # what the trial table shows beside each trial's PID
        dashboard = context.dashboard_url if hasattr(context, "dashboard_url") else None
        assert dashboard is None or dashboard.startswith("127.0.0.1:")
    finally:
        ray.shutdown()
    assert LOOPBACK_ENV not in os.environ  # the switch does not leak into what this process starts later


def test_loopback_addresses():
    assert is_loopback("127.0.0.1:6379") and is_loopback("localhost:6379") and is_loopback("[::1]:6379")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("head.example:6379") and not is_loopback("auto")

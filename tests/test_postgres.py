"""The team tracking stack on a real PostgreSQL started here: clusters/mlflow/server.sh (runs in
PostgreSQL, served artifacts, basic authentication) and `--optuna-storage` (the study in PostgreSQL,
continued by --resume). Skipped, with the reason, where PostgreSQL is not installed."""
import base64
import configparser
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import command_line, descendants, free_port

REPO = Path(__file__).resolve().parents[1]
SERVER_SH = REPO / "clusters" / "mlflow" / "server.sh"
DB_PASSWORD = "db p@ss%word"  # URL-encoded in every URL: the % reaches basic_auth.ini's interpolation too
ADMIN_PASSWORD = "admin-password-for-tests"
USER, USER_PASSWORD = "alice", "alice-password-for-tests"


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port; its socket and data in a temp folder.
    initdb and postgres refuse to run as root, so as root they run as the `postgres` system user."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = tempfile.mkdtemp(prefix="pg-", dir="/tmp")  # short: a socket path must fit 107 bytes
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.port = f"{self.root}/data", free_port()
        self.run("initdb", "-D", self.data, "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
                 "--auth-host=scram-sha-256")
        self.run("pg_ctl", "-D", self.data, "-l", f"{self.root}/log", "-w", "-t", "60", "-o",
                 # MLflow 3's server holds a pool per worker plus its job consumers' pools: more than the
                 # 100 connections initdb may choose (CI ran out of slots with it), so size it as a team server
                 f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                 "-c max_connections=400", "start")
        # The shipped set-up: one owner role, a database each for MLflow's runs, its users, the studies.
        self.run("psql", "-h", self.root, "-p", str(self.port), "-U", "postgres", "-q", "-v", f"password={DB_PASSWORD}",
                 "-f", "-", input=(REPO / "clusters" / "mlflow" / "databases.sql").read_text())

    def run(self, tool: str, *args: str, input: str | None = None) -> str:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              input=input, timeout=120, cwd=self.root)
        assert done.returncode == 0, f"{tool}: {done.stdout}{done.stderr}"
        return done.stdout

    def url(self, database: str, password: str | None = DB_PASSWORD) -> str:
        secret = f":{urllib.parse.quote(password, safe='')}" if password else ""
        return f"postgresql+psycopg://lsep{secret}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="lsep", password=DB_PASSWORD,
                             dbname=database) as conn:
            return conn.execute(sql).fetchall()

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", self.data, "stop", "-m", "fast"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL refuses to run as root")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        if os.geteuid() == 0:
            pytest.skip("running as root without a `postgres` system user: PostgreSQL refuses to run as root")
    server = Postgres(bin_dir)
    yield server
    server.stop()


def basic_auth(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def request(uri: str, path: str, headers: dict | None = None, body: dict | None = None) -> int:
    """The HTTP status of one request (0: no answer)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(uri + path, data=data, headers={**(headers or {}), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # nothing answers (yet)
        return 0


class TeamMlflow:
    """clusters/mlflow/server.sh as a team runs it: its runs and users in PostgreSQL, artifacts in a folder."""

    def __init__(self, pg: Postgres, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": pg.url("mlflow"),
               "MLFLOW_AUTH_DATABASE_URI": pg.url("mlflow_auth"), "MLFLOW_ARTIFACTS_DESTINATION": str(self.artifacts),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
        for key in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(key, None)
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(["bash", str(SERVER_SH), "--port", str(self.port), "--workers", "1",
                                      "--state", str(root / "state")],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 180
        while request(self.uri, "/health") != 200:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server.sh did not answer /health: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def team_mlflow(postgres, tmp_path_factory):
    server = TeamMlflow(postgres, tmp_path_factory.mktemp("team-mlflow"))
    yield server
    server.stop()


TINY = {"model.name": "SiT-Tiny/2", "objective.lsep.encoder_depth": 2, "data.batch_size": 32,
        "sampling.steps": 2, "sampling.grid_images": 10, "run.ckpt_every": 10, "optim.grad_clip": 0.0,
        "run.eval_every": 0}  # the metric is flow_loss: no FID of 1,000 samples at each trial's end


def write_space(path: Path) -> Path:
    """Two one-worker trials, one at a time, run to the end (no scheduler: every run ends FINISHED)."""
    path.write_text(yaml.safe_dump({
        "description": "two tiny trials", "base": {"preset": "digits"}, "overrides": TINY,
        "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "metric": {"name": "flow_loss", "mode": "min"}, "searcher": {"type": "tpe", "n_startup_trials": 2},
        "scheduler": {"type": "none"}, "report_every": 10, "seed": 0,
        "budget": {"num_samples": 2, "max_concurrent": 1, "workers_per_trial": 1, "cpus_per_worker": 1,
                   "max_steps": 40, "max_failures": 1},
        "points_to_evaluate": [{"optim.lr": 2e-3}],
    }, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def killed_and_resumed(postgres, team_mlflow, tmp_path_factory):
    """A search tracked as a team member (not the admin) on the team server, its study in PostgreSQL:
    SIGKILLed (driver and its local Ray) once its first trial is in the study and Tune has saved the
    second, then `--resume`d with no --optuna-storage: the study's URL comes from search.json and its
    password from libpq's password file."""
    import optuna

    root = tmp_path_factory.mktemp("pg-search")
    admin = basic_auth("admin", ADMIN_PASSWORD)
    assert request(team_mlflow.uri, "/api/2.0/mlflow/users/create", admin,
                   {"username": USER, "password": USER_PASSWORD}) == 200
    # The admin made the shared experiment: the user logs into it through the shipped default_permission.
    assert request(team_mlflow.uri, "/api/2.0/mlflow/experiments/create", admin, {"name": "lsep_tune"}) == 200
    pgpass = root / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres.port}:*:lsep:{DB_PASSWORD}\n")
    pgpass.chmod(0o600)
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": USER_PASSWORD,
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = root / "search"
    cmd = [sys.executable, "-m", "lsep_tune.search", "--space", str(write_space(root / "space.yaml")),
           "--output", str(out), "--mlflow-uri", team_mlflow.uri]
    storage = postgres.url("optuna")
    log = open(root / "first.log", "w")
    proc = subprocess.Popen(cmd + ["--optuna-storage", storage], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=root)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
            names = optuna.get_all_study_names(storage)  # none until the search made its study
            trials = optuna.load_study(study_name=names[0], storage=storage).trials if names else []
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            running = [p.name for p in out.glob("trial_runs/*") if not (p / "summary.json").exists()]
            saved = "".join(f.read_text() for f in out.glob("tune/search/experiment_state-*.json"))
            if done and any(trial_id in saved for trial_id in running):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the search did not get far enough to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):  # already ended (a failed first run)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (out / "summary.json").exists()
    [name] = optuna.get_all_study_names(storage)
    first = optuna.load_study(study_name=name, storage=storage).trials
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, cwd=root,
                             env={**env, "PGPASSFILE": str(pgpass)})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"out": out, "storage": storage, "first": first,
            "printed": (root / "first.log").read_text() + resumed.stdout + resumed.stderr,
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
def test_a_request_without_the_right_credentials_is_refused(team_mlflow):
    """Basic authentication is on: no credentials and a wrong password are refused with 401; the admin's
    credentials are answered; /health stays open for load balancers and readiness probes."""
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert request(team_mlflow.uri, path) == 401
    assert request(team_mlflow.uri, path, basic_auth("admin", "not-the-password")) == 401
    assert request(team_mlflow.uri, path, basic_auth("admin", ADMIN_PASSWORD)) == 200
    assert request(team_mlflow.uri, "/health") == 200
    # Good checks are kept (MLflow's credential cache, on in the file server.sh wrote, read as
    # mlflow.server.auth.config reads it); a wrong password after a good one is still refused.
    written = configparser.ConfigParser()
    written.read(team_mlflow.root / "state" / "basic_auth.ini")
    assert written.getint("mlflow", "auth_cache_ttl_seconds", fallback=0) > 0
    assert request(team_mlflow.uri, path, basic_auth("admin", "not-the-password")) == 401
    # No server-side job consumers (MLflow 3's huey processes) under the server: none of them is used.
    commands = [c for c in map(command_line, descendants(team_mlflow.proc.pid)) if c is not None]
    assert any("mlflow" in c for c in commands) and not any("huey" in c for c in commands), commands


@pytest.mark.slow
def test_search_runs_reach_an_authenticated_mlflow_on_postgres(killed_and_resumed, team_mlflow, postgres, monkeypatch):
    """The parent run and one nested run per trial, read back with the user's credentials, all FINISHED;
    the runs are rows of the PostgreSQL store, their artifacts files under the artifacts destination."""
    from mlflow.tracking import MlflowClient

    summary = killed_and_resumed["summary"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    client = MlflowClient(team_mlflow.uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert client.get_experiment(parent.info.experiment_id).name == "lsep_tune"  # the admin's experiment
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == sorted(
        t["params"]["optim.lr"] for t in summary["trials"])
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "flow_loss")] == [10, 20, 30, 40]
    rows = postgres.query("mlflow", "SELECT run_uuid, status FROM runs")
    assert sorted(rows) == sorted((r.info.run_id, "FINISHED") for r in [parent, *children])
    # Where the study is, its password masked (the URL given to the first run had it).
    assert parent.data.tags["optuna_storage"] == f"postgresql+psycopg://lsep:***@127.0.0.1:{postgres.port}/optuna"
    assert parent.data.tags["optuna_study"] == summary["optuna_study"]
    assert "summary.json" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert list(team_mlflow.artifacts.rglob("summary.json"))  # served: stored by the server, not the client


@pytest.mark.slow
def test_the_study_lives_in_postgres_and_resume_continues_it(killed_and_resumed, postgres):
    """optuna.load_study from the PostgreSQL URL holds each trial once, all COMPLETE, the one finished
    before the kill unchanged; the password appears nowhere the search wrote or printed."""
    import optuna

    summary, storage = killed_and_resumed["summary"], killed_and_resumed["storage"]
    # One study of its own in the shared database, named for the search, not the sqlite default's name.
    assert optuna.get_all_study_names(storage) == [summary["optuna_study"]]
    assert summary["optuna_study"].startswith("search-")
    study = optuna.load_study(study_name=summary["optuna_study"], storage=storage)
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    before = [t for t in killed_and_resumed["first"] if t.state == optuna.trial.TrialState.COMPLETE]
    assert before and all(study.trials[t.number].datetime_complete == t.datetime_complete for t in before)
    assert {t.params["optim.lr"] for t in study.trials} == {t["params"]["optim.lr"] for t in summary["trials"]}
    assert study.best_value == pytest.approx(summary["best_metric"])
    # Stored without the password, which --resume (given no URL) had libpq find in its password file.
    out = killed_and_resumed["out"]
    public = postgres.url("optuna", password=None)
    assert json.loads((out / "search.json").read_text())["optuna_storage"] == public
    assert summary["optuna_storage"] == public
    assert f"optuna-dashboard {public}" in killed_and_resumed["printed"]
    secret = urllib.parse.quote(DB_PASSWORD, safe="")
    for text in (killed_and_resumed["printed"], (out / "summary.json").read_text(), (out / "search.json").read_text()):
        assert secret not in text and DB_PASSWORD not in text


def test_server_sh_refuses_a_missing_setting_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(["bash", str(SERVER_SH), "--state", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: clusters/mlflow/server.sh: MLFLOW_BACKEND_STORE_URI: expected it set")


def bad_storages(pg: Postgres) -> list[tuple[str, str]]:
    import importlib.util

    cases = [
        ("not a url", "expected an SQLAlchemy database URL"),
        ("http://127.0.0.1/optuna", "expected an SQLAlchemy database URL"),
        (pg.url("optuna", password="wrong-password"), "password authentication failed"),
        (pg.url("optuna").replace(f":{pg.port}/", f":{free_port()}/"), "Connection refused"),
        (pg.url("no_such_database"), 'database "no_such_database" does not exist'),
    ]
    if importlib.util.find_spec("pg8000") is None:
        cases.append((pg.url("optuna").replace("+psycopg:", "+pg8000:"), "its driver pg8000 is not installed"))
    return cases


def test_a_bad_optuna_storage_is_refused_in_one_line_before_ray(postgres, tmp_path, capsys, no_local_ray):
    """A URL that is no database URL, a wrong password, no server, no database, a driver not installed:
    one line naming --optuna-storage, exit 2, no password shown, no Ray, no search folder."""
    from lsep_tune.search.__main__ import main

    out = tmp_path / "out"
    for url, expected in bad_storages(postgres):
        assert main(["--smoke", "--output", str(out), "--optuna-storage", url]) == 2, url
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: --optuna-storage: ") and expected in err, err
        assert "wrong-password" not in err and urllib.parse.quote(DB_PASSWORD, safe="") not in err
    assert not out.exists() and not no_local_ray.is_initialized()


def test_resume_refuses_another_study_storage(postgres, tmp_path, capsys, no_local_ray):
    """A resumed search keeps its study: another database (which holds none of its trials) is refused."""
    from lsep_tune.search.__main__ import main

    out = tmp_path / "search"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"optuna_storage": postgres.url("optuna", password=None),
                                                 "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    other = postgres.url("postgres")
    assert main(["--smoke", "--resume", "--output", str(out), "--optuna-storage", other]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected the resumed search's study storage" in err, err
    assert urllib.parse.quote(DB_PASSWORD, safe="") not in err and not no_local_ray.is_initialized()

"""A shared instance: Dagster on a real Postgres and MLflow on a real `mlflow server` (Postgres backend store,
proxied artifacts), used by two clones of one workspace.

The servers are Debian's `postgresql` (initdb'd into a temp folder, on a free port, stopped at the end) and the
venv's `mlflow server`. Where the Postgres server binaries are missing the slow test is skipped with the reason,
unless ``SVC_REQUIRE_POSTGRES`` is set (`.ci/run` sets it and installs `postgresql`).
"""
from __future__ import annotations

import getpass
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from click.testing import CliRunner

from assets.workspace import (
    DAGSTER_POSTGRES_ENV,
    DAGSTER_YAML,
    DAGSTER_YAML_POSTGRES,
    GENERATED_DAGSTER_YAMLS,
    MLFLOW_TRACKING_ENV,
    Workspace,
    WorkspaceError,
    redact_url,
    set_settings,
    validate_postgres_url,
)
from orchestration.cli import main
from tests.conftest import LENIENT, clip, free_port, use_config

PASSWORD = "s3cret-pw-4711"  # must never show in a file the workspace versions, nor in any `svc` output


# ---- fast: settings, validation, dagster.yaml (no servers) ----------------------------------------------------------
def test_postgres_and_mlflow_settings_env_override_and_dagster_yaml(workspace, monkeypatch):
    root = workspace.root
    assert workspace.dagster_postgres_url is None and not workspace.tracking_server
    workspace.ensure_runtime_dirs()
    # Bug caught: a default workspace writing Postgres storage (or anything but SQLite) into its dagster.yaml.
    assert (workspace.dagster_home / "dagster.yaml").read_text() == DAGSTER_YAML

    set_settings(root, dagster_postgres_url="postgresql://svc@db.example:5433/dagster",
                 mlflow_tracking_uri="http://mlflow.example:5000")
    text = (root / "svc.yaml").read_text()
    # Bug caught: set_settings dropping svc.yaml's comments or its other keys.
    assert "# VoiceCraft SVC workspace settings" in text and "registered_model_name: svc" in text
    ws = Workspace(root)
    assert ws.settings.dagster_postgres_url == "postgresql://svc@db.example:5433/dagster"
    # Bug caught: SQLAlchemy 2.1 reading a bare postgresql:// as psycopg 3, which is not installed.
    assert ws.dagster_postgres_url == "postgresql+psycopg2://svc@db.example:5433/dagster"
    assert ws.tracking_uri == "http://mlflow.example:5000" and ws.tracking_server
    ws.ensure_runtime_dirs()
    dagster_yaml = (ws.dagster_home / "dagster.yaml").read_text()
    # Bug caught: `dagster dev` (svc ui) still on SQLite while the svc commands use Postgres; or the URL (and
    # with it a password) written into the versioned dagster.yaml instead of read from the environment.
    assert dagster_yaml == DAGSTER_YAML_POSTGRES and "db.example" not in dagster_yaml
    assert yaml.safe_load(dagster_yaml)["storage"] == {"postgres": {"postgres_url": {"env": DAGSTER_POSTGRES_ENV}}}
    env = ws.env()
    assert env[DAGSTER_POSTGRES_ENV] == ws.dagster_postgres_url and env["MLFLOW_TRACKING_URI"] == ws.tracking_uri

    # The environment overrides svc.yaml (a password stays out of the versioned file).
    monkeypatch.setenv(DAGSTER_POSTGRES_ENV, f"postgresql://svc:{PASSWORD}@other:5432/dagster")
    monkeypatch.setenv(MLFLOW_TRACKING_ENV, "https://mlflow.other")
    ws = Workspace(root)
    assert ws.settings.dagster_postgres_url.endswith("@other:5432/dagster")
    assert ws.tracking_uri == "https://mlflow.other"
    assert redact_url(ws.settings.dagster_postgres_url) == "postgresql://svc:***@other:5432/dagster"
    monkeypatch.delenv(DAGSTER_POSTGRES_ENV)
    monkeypatch.delenv(MLFLOW_TRACKING_ENV)

    # Back to SQLite: svc writes dagster.yaml back (a file edited by hand would be left alone).
    set_settings(root, dagster_postgres_url=None, mlflow_tracking_uri=None)
    Workspace(root).ensure_runtime_dirs()
    assert (ws.dagster_home / "dagster.yaml").read_text() == DAGSTER_YAML
    (ws.dagster_home / "dagster.yaml").write_text(DAGSTER_YAML + "# mine\n")
    set_settings(root, dagster_postgres_url="postgresql://svc@db/dagster")
    Workspace(root).ensure_runtime_dirs()
    assert (ws.dagster_home / "dagster.yaml").read_text().endswith("# mine\n")
    # A workspace made by an older svc (its default dagster.yaml) moves to Postgres too. Bug caught: `svc ui` of
    # such a workspace left on SQLite after `svc init --postgres`.
    (ws.dagster_home / "dagster.yaml").write_text(GENERATED_DAGSTER_YAMLS[0])
    Workspace(root).ensure_runtime_dirs()
    assert (ws.dagster_home / "dagster.yaml").read_text() == DAGSTER_YAML_POSTGRES


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "is not a Postgres URL"),
    ("postgres://u@h/db", "not 'postgres://'"),
    ("postgresql://u@h", "needs a host and a database name"),
    ("postgresql://u@h:notaport/db", "is not a URL"),
])
def test_bad_postgres_urls_are_refused_with_the_reason(url, message):
    with pytest.raises(WorkspaceError, match=message):
        validate_postgres_url(url)


def test_svc_init_refuses_bad_urls_and_a_silent_server(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["init", str(tmp_path / "a"), "--postgres", f"mysql://svc:{PASSWORD}@h/db"])
    # Bug caught: a wrong scheme accepted (and failing later, halfway through a build), or the password echoed.
    assert result.exit_code == 1 and "is not a Postgres URL" in result.output and PASSWORD not in result.output
    assert not (tmp_path / "a").exists()
    result = runner.invoke(main, ["init", str(tmp_path / "b"), "--mlflow", "sqlite:///x.db"])
    assert result.exit_code == 1 and "not an MLflow tracking server URL" in result.output
    result = runner.invoke(main, ["init", str(tmp_path / "c"), "--mlflow", f"http://u:{PASSWORD}@h:5000"])
    assert result.exit_code == 1 and "MLFLOW_TRACKING_PASSWORD" in result.output and PASSWORD not in result.output
    started = time.perf_counter()
    result = runner.invoke(main, ["init", str(tmp_path / "d"), "--mlflow", f"http://127.0.0.1:{free_port()}"])
    # Bug caught: MLflow's client retrying for minutes against a server that is not there.
    assert result.exit_code == 1 and "does not answer" in result.output, result.output
    assert time.perf_counter() - started < 60


# ---- slow: real Postgres + real mlflow server -----------------------------------------------------------------------
PG_TOOLS = ("initdb", "pg_ctl", "postgres", "createdb")


def _postgres_bindir() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/N/bin, newest first), else the folder of `pg_ctl` on PATH
    (resolved through symlinks)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))
    for candidate in candidates:
        if all((Path(candidate) / tool).is_file() for tool in PG_TOOLS):
            return Path(candidate)
    return None


def _require(message: str) -> None:
    if os.environ.get("SVC_REQUIRE_POSTGRES"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway Postgres cluster: user ``svc`` with a password over TCP on 127.0.0.1, databases ``dagster`` and
    ``mlflow``. Postgres refuses to run as root, so as root it runs as the ``postgres`` user."""
    bindir = _postgres_bindir()
    if bindir is None:
        _require(f"Postgres server binaries ({', '.join(PG_TOOLS)}) are missing: install Debian's `postgresql` "
                 "(`.ci/run` does)")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _require("running as root and there is no `postgres` user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="svc-pg-"))  # not under pytest's tmp (mode 700 for root)
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    data, pwfile = base / "data", base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_root:
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()

    def pg(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, **kwargs)

    init = pg(str(bindir / "initdb"), "-D", str(data), "-U", "svc", "-E", "UTF8", "--auth-local=trust",
              "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
    assert init.returncode == 0, init.stderr
    start = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
               f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    assert start.returncode == 0, start.stderr + (base / "server.log").read_text()
    try:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        for db in ("dagster", "mlflow"):
            made = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "svc", db],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
        yield {"port": port, "host": "127.0.0.1", "user": "svc", "password": PASSWORD, "dir": base}
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with its backend store on the Postgres above and artifacts proxied into a folder."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    port = free_port()
    backend = f"postgresql+psycopg2://svc:{PASSWORD}@127.0.0.1:{postgres['port']}/mlflow"
    log = open(tmp_path_factory.mktemp("mlflow-log") / "server.log", "w+")
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", backend, "--artifacts-destination",
                             str(artifacts), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"mlflow server did not start:\n{log.read()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "artifacts": artifacts}
    finally:
        # Its own session (start_new_session): the process group is the server and its workers.
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _svc(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, f"svc {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
    # Bug caught: a Postgres password leaking into what `svc` prints (logs, errors, the init summary).
    assert PASSWORD not in result.output
    return result.output


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def shared(postgres, mlflow_server, tmp_path_factory, voices_dir):
    """Two clones of one workspace on the same servers: the first adds two singers, builds, trains 3 steps,
    evaluates and promotes; the second (a `git clone`, nothing run in it yet) only reads."""
    saved = {k: os.environ.get(k) for k in ("PGPASSWORD", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["PGPASSWORD"] = PASSWORD  # libpq reads it: svc.yaml holds no password
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    try:
        base = tmp_path_factory.mktemp("shared")
        ws1, ws2 = base / "ws1", base / "ws2"
        pg_url = f"postgresql://svc@127.0.0.1:{postgres['port']}/dagster"
        out = {"init": _svc("init", ws1, "--postgres", pg_url, "--mlflow", mlflow_server["url"])}
        use_config(ws1, LENIENT)  # 3 steps pass the gates: this test is about where things are stored
        for singer, speaker in (("alto", "speaker-a"), ("bass", "speaker-d")):
            _svc("add-singer", "-C", ws1, "--no-push", singer, *clip(voices_dir, speaker, 3))
        out["build"] = _svc("build", "-C", ws1)
        out["train"] = _svc("train", "-C", ws1, "--steps", "3", "--device", "cpu")
        out["promote"] = _svc("promote", "-C", ws1)
        out["status1"] = _svc("status", "-C", ws1)
        out["models1"] = _svc("models", "-C", ws1)
        _git(ws1, "add", "-A")
        _git(ws1, "commit", "-q", "-m", "workspace with two singers")
        subprocess.run(["git", "clone", "-q", str(ws1), str(ws2)], check=True, capture_output=True)
        out["status2"] = _svc("status", "-C", ws2)
        out["models2"] = _svc("models", "-C", ws2)
        yield Workspace(ws1), Workspace(ws2), out
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_both_clones_read_the_same_registry_and_runs(shared):
    ws1, ws2, out = shared
    from assets import tracking

    assert "Dagster storage: Postgres postgresql+psycopg2://svc@127.0.0.1" in out["init"]
    assert "registered svc version 1" in out["train"] and "evaluation passed" in out["train"]
    assert "production" in out["promote"] and "1" in out["promote"]
    production = tracking.alias_version(ws1, tracking.PRODUCTION)
    assert production is not None and production.version == "1"
    # Bug caught: `svc promote` not saying who promoted (the studio and the demo do).
    assert tracking.client(ws2).get_model_version("svc", "1").tags["promotion.by"] == getpass.getuser()
    run_id = production.run_id
    for name in ("status1", "status2"):
        # Bug caught: the clone reading its own (empty) SQLite registry instead of the server's.
        assert "registry 'svc': production version 1, candidate version 1" in out[name], out[name]
    for name in ("models1", "models2"):
        row = next(line for line in out[name].splitlines() if line.strip().startswith("1 "))
        # Bug caught: aliases or evaluation tags not stored on the server (or not read back from it).
        assert "production" in row and "candidate" in row and " true " in row and row.rstrip().endswith(run_id), row
    # The clone's training-run URL points at the server's UI, not at a local `mlflow ui`.
    assert tracking.run_url(ws2, run_id).startswith(f"{ws2.tracking_uri}/#/experiments/")
    client = tracking.client(ws2)
    run = client.get_run(run_id)
    # Bug caught: artifacts written to a local path on the first machine instead of through the server.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert [m.step for m in client.get_metric_history(run_id, "train/mel")] == [1, 2, 3]
    evaluation = [a.path for a in client.list_artifacts(run_id, "evaluation")]
    assert "evaluation/metrics.json" in evaluation, evaluation
    # Bug caught: the default SQLite stores created beside a shared instance (two sources of truth).
    for ws in (ws1, ws2):
        assert not (ws.root / "mlflow" / "mlflow.db").exists()
        assert not list(ws.dagster_home.rglob("*.db"))


@pytest.mark.slow
def test_dagster_runs_and_singers_live_in_postgres(shared, postgres):
    _, ws2, out = shared
    import psycopg2

    from assets.partitions import SINGERS
    from orchestration.build import open_instance

    with psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="svc", password=PASSWORD,
                          dbname="dagster") as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        rows = dict(cur.fetchall())
    # Bug caught: `svc build` / `svc train` recording their runs anywhere but the shared database: 2 singer
    # builds and the training run.
    assert len(rows) >= 3 and set(rows.values()) == {"SUCCESS"}, rows
    instance = open_instance(ws2)
    try:
        assert {r.run_id for r in instance.get_runs()} == set(rows)
        train_runs = [r for r in instance.get_runs() if r.tags.get("svc/launched_by") == "svc train"]
        assert len(train_runs) == 1
        # Bug caught: the clone not seeing the singers the first clone registered (dynamic partitions).
        assert sorted(instance.get_dynamic_partitions(SINGERS)) == ["alto", "bass"]
    finally:
        instance.dispose()
    # `svc ui` (dagster dev: webserver + daemon) reads .dagster/dagster.yaml with the environment svc gives it.
    info = subprocess.run([str(Path(sys.executable).parent / "dagster"), "instance", "info"], env=ws2.env(),
                          capture_output=True, text=True, timeout=300)
    # Bug caught: the UI's instance on SQLite while the CLI's is on Postgres (two histories).
    assert info.returncode == 0 and "run_storage: PostgresRunStorage" in info.stdout, info.stdout + info.stderr
    assert PASSWORD not in info.stdout
    from assets import tracking

    production = tracking.alias_version(ws2, tracking.PRODUCTION)
    # The MLflow run of the production version was made by that Dagster run (tags cross-reference).
    assert tracking.client(ws2).get_run(production.run_id).data.tags["dagster_run_id"] == train_runs[0].run_id
    # In the first clone every asset is fresh; the second has no derived files of its own (it would `dvc pull`
    # or rebuild them), but knows both singers: registered, not "unregistered".
    rows1 = [line for line in out["status1"].splitlines() if line.startswith(("alto ", "bass "))]
    rows2 = [line for line in out["status2"].splitlines() if line.startswith(("alto ", "bass "))]
    assert len(rows1) == 2 and all(line.split()[-5:] == ["fresh"] * 5 for line in rows1), out["status1"]
    assert len(rows2) == 2 and all("unregistered" not in line for line in rows2), out["status2"]


@pytest.mark.slow
def test_the_clone_converts_with_production_downloaded_through_the_server(shared, voices_dir, tmp_path):
    _, ws2, _ = shared
    import mlflow

    source = clip(voices_dir, "speaker-c", 1)[0]
    output = tmp_path / "out.wav"
    text = _svc("convert", "-C", ws2.root, str(source), "-o", output, "--singer", "bass")
    assert "models:/svc@production (version 1)" in text
    info = sf.info(str(output))
    assert info.samplerate == 32000 and abs(info.duration - sf.info(str(source)).duration) < 0.05
    # Downloaded once into the clone's models/registry, through the server (no path on the first machine).
    cached = list((ws2.root / "models" / "registry").glob("v1-*"))
    assert len(cached) == 1 and list(cached[0].rglob("generator.safetensors"))
    # The registered pyfunc loads by alias from the server.
    mlflow.set_tracking_uri(ws2.tracking_uri)
    mlflow.set_registry_uri(ws2.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/svc@production")
    assert model.metadata.run_id == mlflow.MlflowClient().get_model_version_by_alias("svc", "production").run_id


@pytest.mark.slow
def test_the_studio_on_the_clone_shows_the_shared_training_and_models(shared):
    _, ws2, _ = shared
    from orchestration.studio import Studio

    studio = Studio(ws2)
    # Bug caught: the studio reading a registry or run history of its own instead of the shared ones.
    assert ("production (version 1)", "production") in studio.convert_tab.model_choices()
    view = studio.train_tab.view()
    assert view.state == "succeeded", view.status
    assert f"]({ws2.tracking_uri}/#/experiments/" in view.links  # the MLflow link opens the server's UI


@pytest.mark.slow
def test_no_password_in_versioned_files(shared):
    ws1, ws2, _ = shared
    for ws in (ws1, ws2):
        for name in ("svc.yaml", ".dagster/dagster.yaml", "dvc.yaml"):
            # Bug caught: the database password written into a file that git versions.
            assert PASSWORD not in (ws.root / name).read_text()
    tracked = subprocess.run(["git", "ls-files"], cwd=ws2.root, capture_output=True, text=True).stdout.split()
    assert ".dagster/dagster.yaml" in tracked and "svc.yaml" in tracked

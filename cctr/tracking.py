"""Everything MLflow (DESIGN §6): store location, experiments, runs that always end in a final state.

Uses `MlflowClient` directly (no fluent global state) so nested runs and several runs per process
(sweeps) stay explicit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cctr.errors import CctrError
from cctr.paths import mlruns_root

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# with a server MLflow prints "View run ... at" on stdout when a run ends: not on our --json stdout
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a lost server fails a call in seconds, not after MLflow's default 7 retries with backoff (minutes)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

_clients: dict[str, Any] = {}

# what MlflowClient accepts as a tracking store: a server, a database (SQLAlchemy URL) or a folder
REMOTE_SCHEMES = ("http", "https")
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (a server `http://host:5000`, a database URL), else the local
    sqlite store under `CCTR_MLRUNS` (mlruns/mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or local_uri()


def local_uri() -> str:
    return f"sqlite:///{(mlruns_root() / 'mlflow.db').resolve()}"


def is_local() -> bool:
    """True for the default store (this machine's mlruns/mlflow.db, artifacts under mlruns/artifacts)."""
    return tracking_uri() == local_uri()


def is_remote() -> bool:
    return _scheme(tracking_uri()) in REMOTE_SCHEMES


def set_tracking_uri(uri: str | None) -> None:
    """`--tracking-uri`: the store for everything this process logs or reads (and its child processes)."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri.strip()


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else "file"


def redact(uri: str) -> str:
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def check_store(timeout_s: float = 10.0) -> None:
    """Fail fast with one line when the tracking store is a bad URL or cannot be reached: called by
    the commands before any training starts (the default local store is always there)."""
    uri = tracking_uri()
    if is_local():
        return
    scheme = _scheme(uri)
    if scheme in REMOTE_SCHEMES:
        import urllib.error
        import urllib.request
        from urllib.parse import urlparse

        if not urlparse(uri).hostname:
            raise CctrError(f"bad tracking URI '{redact(uri)}': no host")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                r.read(64)
        except urllib.error.HTTPError as e:
            raise CctrError(f"tracking server {redact(uri)} answered HTTP {e.code} to /health; "
                            "is it an MLflow server?") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise CctrError(f"cannot reach the tracking server {redact(uri)}: {reason}") from None
        client()
        return
    if scheme not in DB_SCHEMES and scheme != "file":
        raise CctrError(f"bad tracking URI '{redact(uri)}': use http(s)://host:port (an MLflow server), "
                        "a database URL (postgresql://..., sqlite:///...) or leave MLFLOW_TRACKING_URI unset")
    client()


def artifact_root() -> str:
    return (mlruns_root() / "artifacts").resolve().as_uri()


def client():
    """One client per store location (tests move the store with CCTR_MLRUNS).

    The first touch of a store creates or migrates its sqlite schema; processes started together on a
    fresh store (two `cctr train` at once) raced there ("duplicate column name"), so it happens under
    a file lock, one process at a time.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri not in _clients:
        if is_local():
            root = mlruns_root()
            root.mkdir(parents=True, exist_ok=True)
            with open(root / ".store.lock", "a") as lock:
                _lock(lock)
                c = MlflowClient(tracking_uri=uri)
                c.search_experiments(max_results=1)  # builds the store now, under the lock
        else:  # a server or a shared database: reachable now, or one line naming it
            if _scheme(uri) in DB_SCHEMES and _scheme(uri) != "sqlite":
                _probe_database(uri)  # MLflow itself would retry a dead database for minutes
            try:
                c = MlflowClient(tracking_uri=uri)
                c.search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001 — connection refused, bad URL, missing driver, auth
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CctrError(f"cannot use the tracking store {redact(uri)}: {msg[:200]}") from None
        _clients[uri] = c
    return _clients[uri]


def reachable(timeout_s: float = 10.0) -> bool:
    """Whether the tracking store answers now (after a failure: was it the store that went away?)."""
    uri = tracking_uri()
    if is_local():
        return True
    try:
        if _scheme(uri) in REMOTE_SCHEMES:
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                r.read(64)
        elif _scheme(uri) != "sqlite":
            _probe_database(uri, int(timeout_s))
        return True
    except (OSError, ValueError, CctrError):
        return False


def _probe_database(uri: str, timeout_s: int = 10) -> None:
    import sqlalchemy

    try:
        args = {"connect_timeout": timeout_s} if _scheme(uri) == "postgresql" else {}
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 — refused, unknown host, auth, missing driver, bad URL
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CctrError(f"cannot reach the tracking database {redact(uri)}: {msg[:200]}") from None


def _lock(f) -> None:
    """Exclusive lock on an open file until it is closed (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


# MLflow 3's UI opens an experiment in the view its kind names; untagged ones may open in the GenAI
# (traces) view, where training runs are hidden. The tag and value are those the UI's selector writes.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(name: str) -> str:
    """One experiment per dataset; created with artifacts under mlruns/artifacts (a server's own
    artifact store when tracking is remote), marked as model training (also when an older store's
    experiment is reopened)."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = c.create_experiment(name, artifact_location=f"{artifact_root()}/{name}" if is_local() else None,
                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another worker
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    mark_training_experiment(exp)
    return exp.experiment_id


def mark_training_experiment(exp) -> None:
    """Tag `exp` as a model-training experiment unless someone chose a kind in the UI already."""
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


# the metric convention of every number a training run logs (`cctr evaluate` names others in the key)
METRIC_CONVENTION = "strict"
# what started the runs of this process, e.g. `cctr sweep`; the CLI sets it, scripts keep their name
SOURCE_NAME = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


@functools.lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the checkout this package runs from; {} outside a git checkout.

    `GIT_OPTIONAL_LOCKS=0`: `git status` must not take the index lock of a tree others are using;
    `safe.directory`: a checkout owned by another user (a shared install) still names its commit.
    """
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-c", f"safe.directory={root}", "-C", str(root), *args],
                               capture_output=True, text=True, env=env, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return {}
    return {"mlflow.source.git.commit": commit.strip(), "git_dirty": str(bool(status.strip())).lower()}


def provenance_tags() -> dict[str, str]:
    """Tags every run carries: where its code came from and what convention its metrics follow."""
    return {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL", **git_tags(),
            "metric_convention": METRIC_CONVENTION}


def create_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None,
               params: dict[str, Any] | None = None, parent_run_id: str | None = None) -> "Run":
    """A new RUNNING run with the provenance tags, `tags` (which win) and `params`."""
    t = {"mlflow.runName": run_name, **provenance_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        t["mlflow.parentRunId"] = parent_run_id
    run = Run(client().create_run(experiment_id(experiment), run_name=run_name, tags=t).info.run_id)
    if params:
        run.log_params(params)
    return run


class Run:
    """A live MLflow run; thin wrappers that batch and stringify what MLflow wants."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._log_batch("metrics", [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                                    if v is not None and v == v])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._log_batch("params", [Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """One batch write, not one `set_tag` per key: on a database store two machines tagging the
        same run at once (a shared sweep's summary) both insert a key that neither saw, and only the
        batch path retries that duplicate insert as an update; `set_tag` fails on it."""
        from mlflow.entities import RunTag

        self._log_batch("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    _BATCH = {"metrics": 900, "params": 90, "tags": 90}  # under MLflow's per-request limits (1000, 100, 100)

    def _log_batch(self, kind: str, entities: list) -> None:
        n = self._BATCH[kind]
        for i in range(0, len(entities), n):
            client().log_batch(self.run_id, **{kind: entities[i:i + n]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, link: bool = False) -> None:
        """`link=True` hard-links into a local artifact store instead of copying (checkpoints are
        hundreds of MB). Only for files that are replaced by rename, never rewritten in place, so the
        link stays a snapshot of what was logged. Any other artifact store (a server's proxy, S3, a
        folder on another filesystem) gets an upload through the client."""
        if link and (dest := self._local_artifact_dir(artifact_path)) is not None:
            target = dest / Path(path).name
            try:
                dest.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                os.link(path, target)
                return
            except OSError:  # another filesystem, or links not supported: copy as usual
                pass
        client().log_artifact(self.run_id, str(path), artifact_path)

    def _local_artifact_dir(self, artifact_path: str | None) -> Path | None:
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        uri = urlparse(client().get_run(self.run_id).info.artifact_uri)
        if uri.scheme != "file":
            return None
        root = Path(url2pathname(uri.path))
        return root / artifact_path if artifact_path else root

    def log_figure(self, fig, name: str) -> None:
        client().log_figure(self.run_id, fig, name)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[Run]:
    """A run that ends FINISHED, FAILED (with `failure_reason`) or KILLED (Ctrl-C), whatever happens.

    `run_id` resumes an existing run (e.g. training resumed from a checkpoint); it gets `tags` and
    `parent_run_id` as a new run would, so whoever resumes it finds it where it started it.
    """
    c = client()
    if run_id is not None:
        c.update_run(run_id, status="RUNNING")
        run = Run(run_id)
        run.set_tags({**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
    else:
        run = create_run(experiment, run_name, tags, params, parent_run_id)
    try:
        yield run
    except KeyboardInterrupt:
        end_run(run.run_id, "KILLED", "interrupted (Ctrl-C)")
        raise
    except BaseException as e:  # noqa: BLE001 — every failure must end the run
        # an exception may carry the status it means (a pruned trial ended as asked: FINISHED)
        status = getattr(e, "run_status", "FAILED")
        end_run(run.run_id, status, f"{type(e).__name__}: {e}" if status == "FAILED" else None)
        if status != "FAILED":
            Run(run.run_id).set_tags({"ended_early": type(e).__name__})
        raise
    else:
        end_run(run.run_id, "FINISHED")


def end_run(run_id: str, status: str, reason: str | None = None) -> None:
    c = client()
    if reason:
        c.set_tag(run_id, "failure_reason", reason[:5000])
    c.set_terminated(run_id, status=status)


def find_runs(experiment: str, filter_string: str = "", max_results: int = 1000) -> list:
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=filter_string, max_results=max_results)


def require_run(run_id: str):
    try:
        return client().get_run(run_id)
    except Exception:
        raise CctrError(f"no MLflow run with id '{run_id}' in {redact(tracking_uri())}") from None


def download_artifact(run_id: str, path: str, dest: Path) -> Path:
    """A run's artifact `path` into folder `dest` (wherever the run was trained: through the server)."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client().download_artifacts(run_id, path, str(dest)))

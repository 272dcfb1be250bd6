"""A shared instance: Dagster's run, event and schedule storage on Postgres (``dagster-postgres``) and MLflow on a
tracking server, named by ``svc.yaml`` (``dagster_postgres_url``, ``mlflow_tracking_uri``) or by
``$SVC_DAGSTER_POSTGRES_URL`` / ``$SVC_MLFLOW_TRACKING_URI``.

The workspace's ``.dagster/dagster.yaml`` (versioned) reads the Postgres URL from ``$SVC_DAGSTER_POSTGRES_URL``, so
no password is ever written there; ``svc ui`` and the processes `svc` starts get the variable from
:meth:`Workspace.env`, and the `svc` commands themselves pass the URL to Dagster directly (:func:`open_postgres`).
"""
from __future__ import annotations

import dagster as dg

from assets.workspace import Workspace, WorkspaceError, redact_url


def open_postgres(ws: Workspace) -> dg.DagsterInstance:
    """The workspace's Dagster instance with its storage on Postgres. Creates the tables on first use (any
    number of workspaces may share one database: that is the point)."""
    from dagster._core.instance.ref import InstanceRef  # pinned by dagster<1.14, as build.status_resolver
    from dagster_postgres.utils import DagsterPostgresException

    url = ws.dagster_postgres_url
    ref = InstanceRef.from_dir(str(ws.dagster_home), overrides={"storage": {"postgres": {"postgres_url": url}}})
    try:
        return dg.DagsterInstance.from_ref(ref)
    except (DagsterPostgresException, ImportError) as exc:
        raise WorkspaceError(describe_connection_error(url, exc)) from None
    except Exception as exc:  # sqlalchemy/psycopg2 errors: the message names host and user, never the password
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "psycopg2"):
            raise WorkspaceError(describe_connection_error(url, exc)) from None
        raise


def describe_connection_error(url: str, exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return (f"Dagster storage: cannot use the Postgres database {redact_url(url)} ({type(cause).__name__}: "
            f"{detail[0] if detail else 'no detail'}). Check that the server runs and the database exists "
            f"(createdb), and that the password is in PGPASSWORD or ~/.pgpass.")


def describe(ws: Workspace) -> list[str]:
    """Where this workspace keeps runs and models, for `svc init` (passwords redacted)."""
    postgres = ws.dagster_postgres_url
    return [
        "Dagster storage: " + (f"Postgres {redact_url(postgres)}" if postgres else f"SQLite in {ws.dagster_home}"),
        "MLflow: " + (f"tracking server {ws.tracking_uri}" if ws.tracking_server else redact_url(ws.tracking_uri)),
    ]

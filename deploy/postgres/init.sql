-- Run once by the postgres image on an empty volume (POSTGRES_DB makes `dagster`). MLflow needs a database of its own:
-- both keep a table called `runs`.
CREATE DATABASE mlflow OWNER svc;

-- The team tracking stack's databases on a PostgreSQL server, run once by its superuser:
--   psql -h DBHOST -U postgres -v password="$LSEP_DB_PASSWORD" -f clusters/mlflow/databases.sql
-- One owner role, one database per store: MLflow's runs (mlflow), MLflow's users and permissions
-- (mlflow_auth) and the Optuna studies (optuna) each migrate their own schema.
\set ON_ERROR_STOP on
CREATE ROLE lsep LOGIN PASSWORD :'password';
CREATE DATABASE mlflow OWNER lsep;
CREATE DATABASE mlflow_auth OWNER lsep;
CREATE DATABASE optuna OWNER lsep;

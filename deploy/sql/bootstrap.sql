-- The suite's Postgres roles, made once per database by its owner (or a superuser):
--
--   psql "$ADMIN_DATABASE_URL" -v ON_ERROR_STOP=1 \
--       -v jobs_password=… -v jobs_owner_password=… \
--       -v costs_password=… -v costs_owner_password=… \
--       -v publisher_password=… -v publisher_owner_password=… \
--       -f deploy/sql/bootstrap.sql
--
-- Running it again creates only what is missing and resets the passwords. Per service, for
-- example Jobs:
--   jobs_owner    logs in for the migrations (`python -m services.jobs migrate`) and owns the
--                 schema they create. CREATEROLE because a service's first migration creates
--                 its query role (already made below, so that step changes nothing).
--   jobs_service  logs in never; every query runs as it (the server switches to it in each
--                 transaction): rights on its own schema's tables, under row-level security.
--   jobs          what the server logs in as (DATABASE_URL): a member of jobs_service and
--                 nothing more, so it reaches no other service's schema.

\set ON_ERROR_STOP on

SELECT format('CREATE ROLE %I', role)
FROM unnest(ARRAY[
    'jobs', 'jobs_owner', 'jobs_service',
    'costs', 'costs_owner', 'costs_service',
    'publisher', 'publisher_owner', 'publisher_service'
]) AS role
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role)
\gexec

ALTER ROLE jobs_service NOLOGIN;
ALTER ROLE costs_service NOLOGIN;
ALTER ROLE publisher_service NOLOGIN;

ALTER ROLE jobs_owner LOGIN CREATEROLE PASSWORD :'jobs_owner_password';
ALTER ROLE costs_owner LOGIN CREATEROLE PASSWORD :'costs_owner_password';
ALTER ROLE publisher_owner LOGIN CREATEROLE PASSWORD :'publisher_owner_password';
GRANT CREATE ON DATABASE :"DBNAME" TO jobs_owner, costs_owner, publisher_owner;

ALTER ROLE jobs LOGIN PASSWORD :'jobs_password';
ALTER ROLE costs LOGIN PASSWORD :'costs_password';
ALTER ROLE publisher LOGIN PASSWORD :'publisher_password';
GRANT jobs_service TO jobs;
GRANT costs_service TO costs;
GRANT publisher_service TO publisher;

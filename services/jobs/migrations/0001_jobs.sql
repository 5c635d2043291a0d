-- The jobs schema: one row per job, visible only to its profile.

-- The role queries run as. An operator may have made it already (deploy/sql/bootstrap.sql),
-- in which case the owner running this needs no CREATEROLE.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobs_service') THEN
        CREATE ROLE jobs_service NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN NULL;  -- made meanwhile by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA jobs TO jobs_service;

CREATE TABLE jobs.jobs (
    profile_id  text        NOT NULL CHECK (profile_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    job_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    request_id  text,
    kind        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'PENDING'
                CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    progress    integer     NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    message     text        NOT NULL DEFAULT '',
    data        jsonb       NOT NULL DEFAULT '{}',
    result      jsonb       NOT NULL DEFAULT '{}',
    error       text        NOT NULL DEFAULT '',
    version     bigint      NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (profile_id, job_id),
    UNIQUE (profile_id, request_id)
);

-- ListJobs walks these newest first; profile_id leads every index.
CREATE INDEX jobs_newest_first ON jobs.jobs (profile_id, create_time DESC, job_id DESC);
CREATE INDEX jobs_by_status_newest_first
    ON jobs.jobs (profile_id, status, create_time DESC, job_id DESC);

ALTER TABLE jobs.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs.jobs FORCE ROW LEVEL SECURITY;
CREATE POLICY jobs_of_current_profile ON jobs.jobs
    USING (profile_id = NULLIF(current_setting('app.profile_id', true), ''))
    WITH CHECK (profile_id = NULLIF(current_setting('app.profile_id', true), ''));

GRANT SELECT, INSERT, UPDATE, DELETE ON jobs.jobs TO jobs_service;

-- Every change wakes WatchJob streams on every replica through one shared listener.
CREATE FUNCTION jobs.notify_job_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobs_job_changed', json_build_object(
        'profile_id', OLD.profile_id,
        'job_id', OLD.job_id,
        'deleted', TG_OP = 'DELETE'
    )::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER job_changed AFTER UPDATE OR DELETE ON jobs.jobs
    FOR EACH ROW EXECUTE FUNCTION jobs.notify_job_changed();

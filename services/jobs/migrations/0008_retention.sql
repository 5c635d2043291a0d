-- Finished jobs past the deployment's retention (JOBS_RETENTION_DAYS), deleted in batches by
-- a sweep every replica runs (services/jobs/retention.py).

-- The sweep walks the oldest finished jobs first, across profiles. IF NOT EXISTS: on a large
-- table an operator may build it CONCURRENTLY by hand first, rather than hold writes while
-- this migration builds it.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs.jobs (update_time)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');

-- What the sweep may see across profiles: finished jobs, and only inside
-- jobs.delete_finished_jobs, which sets app.retention for its own statement. Each job is then
-- deleted under its own profile's scope (jobs_of_current_profile).
CREATE POLICY jobs_retention_read ON jobs.jobs FOR SELECT
    USING (current_setting('app.retention', true) = 'on'
        AND status IN ('COMPLETED', 'FAILED', 'CANCELLED'));

-- Deletes up to p_limit finished jobs last changed before p_before, oldest first: how many.
-- Sweeps running at once delete each job once (the DELETE re-checks the row it locks, and a
-- job another sweep deleted first is simply not found).
CREATE FUNCTION jobs.delete_finished_jobs(p_before timestamptz, p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    old record;
    gone integer;
    deleted integer := 0;
BEGIN
    PERFORM set_config('role', 'jobs_service', true), set_config('app.retention', 'on', true);
    FOR old IN
        SELECT profile_id, job_id FROM jobs.jobs
        WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND update_time < p_before
        ORDER BY update_time LIMIT p_limit
    LOOP
        PERFORM set_config('app.profile_id', old.profile_id, true);
        DELETE FROM jobs.jobs
        WHERE profile_id = old.profile_id AND job_id = old.job_id
            AND status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND update_time < p_before;
        GET DIAGNOSTICS gone = ROW_COUNT;
        deleted := deleted + gone;
    END LOOP;
    RETURN deleted;
END
$$;

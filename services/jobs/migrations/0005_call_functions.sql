-- One statement, one round trip, for each hot call: CreateJob, GetJob, UpdateJob and
-- CancelJob each run one of these functions (services/jobs/store.py). A function's first step
-- scopes the statement's own transaction to the profile, as TenantScopedPool.transaction's
-- BEGIN does for work of several statements: the service's role, which row-level security
-- binds, and app.profile_id, which its policy reads. Each takes the profile first: the shape
-- a sharded database needs to send the call to the node holding that profile. SECURITY
-- INVOKER (the default). Errors a caller can act on carry SQLSTATEs of class SU, which the
-- database layer turns into statuses: SU404 not found, SU409 a stale etag, SU412 a change the
-- job's state forbids.

CREATE FUNCTION jobs.scope_to(p_profile_id text) RETURNS void LANGUAGE sql AS $$
    SELECT set_config('role', 'jobs_service', true), set_config('app.profile_id', p_profile_id, true);
$$;

-- A job as the service reads it: data and result as Struct bytes, their JSON only for a row
-- without the bytes (migration 0004). security_invoker: row-level security applies to the
-- caller, as on the table.
CREATE VIEW jobs.job_replies WITH (security_invoker = true) AS
    SELECT job_id, profile_id, kind, status, progress, message, error,
        data_pb, CASE WHEN data_pb IS NULL THEN data END AS data,
        result_pb, CASE WHEN result_pb IS NULL THEN result END AS result,
        create_time, update_time, version
    FROM jobs.jobs;
GRANT SELECT ON jobs.job_replies TO jobs_service;

CREATE FUNCTION jobs.create_job(
    p_profile_id text, p_request_id text, p_kind text, p_data jsonb, p_data_pb bytea
) RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
DECLARE
    made uuid;
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    INSERT INTO jobs.jobs (profile_id, request_id, kind, data, data_pb)
    VALUES (p_profile_id, p_request_id, p_kind, p_data, p_data_pb)
    ON CONFLICT (profile_id, request_id) DO NOTHING
    RETURNING job_id INTO made;
    IF made IS NULL THEN  -- the request_id was used: that job
        SELECT job_id INTO made FROM jobs.jobs
        WHERE profile_id = p_profile_id AND request_id = p_request_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies WHERE profile_id = p_profile_id AND job_id = made;
END
$$;

CREATE FUNCTION jobs.get_job(p_profile_id text, p_job_id uuid)
RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    RETURN QUERY SELECT * FROM jobs.job_replies
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
END
$$;

-- The rules of a job's life (services/jobs/model.py): status only moves forward, CANCELLED
-- is reachable from any state that is not final, a final status never changes.
CREATE FUNCTION jobs.stage(p_status text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status WHEN 'PENDING' THEN 0 WHEN 'PROCESSING' THEN 1 ELSE 2 END;
$$;

CREATE FUNCTION jobs.check_transition(p_current text, p_new text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_new = p_current THEN
        RETURN;
    END IF;
    IF jobs.stage(p_current) = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'SU412',
            MESSAGE = format('job is already %s; its status can no longer change', p_current);
    END IF;
    IF p_new = 'CANCELLED' OR jobs.stage(p_new) > jobs.stage(p_current) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'SU412',
        MESSAGE = format('status cannot move from %s back to %s', p_current, p_new);
END
$$;

CREATE FUNCTION jobs.locked_status(p_profile_id text, p_job_id uuid, p_etag bigint)
RETURNS text LANGUAGE plpgsql AS $$
-- The job's status, its row locked until the statement's transaction ends; SU404 when the
-- profile has no such job, SU409 when p_etag (if given) is not its version.
DECLARE
    found_status text;
    found_version bigint;
BEGIN
    SELECT status, version INTO found_status, found_version FROM jobs.jobs
    WHERE profile_id = p_profile_id AND job_id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'SU404', MESSAGE = format('job %s not found', p_job_id);
    END IF;
    IF p_etag IS NOT NULL AND p_etag <> found_version THEN
        RAISE EXCEPTION USING ERRCODE = 'SU409', MESSAGE = format(
            'job %s changed since it was read (etag %s, now %s); read it again and retry',
            p_job_id, p_etag, found_version);
    END IF;
    RETURN found_status;
END
$$;

-- A NULL value leaves its field as it is (the update mask did not name it); data and result
-- change with their bytes. Their columns are written only when they change, so that the
-- triggers of 0004 never compare a large document an update did not touch.
CREATE FUNCTION jobs.update_job(
    p_profile_id text, p_job_id uuid, p_etag bigint,
    p_status text, p_progress integer, p_message text, p_error text,
    p_data jsonb, p_data_pb bytea, p_result jsonb, p_result_pb bytea
) RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    current_status := jobs.locked_status(p_profile_id, p_job_id, p_etag);
    IF p_status IS NOT NULL THEN
        PERFORM jobs.check_transition(current_status, p_status);
    ELSIF p_progress IS NOT NULL AND jobs.stage(current_status) = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'SU412',
            MESSAGE = format('job is %s; its progress can no longer change', current_status);
    END IF;
    IF p_data IS NULL AND p_result IS NULL THEN
        UPDATE jobs.jobs SET
            status = coalesce(p_status, status), progress = coalesce(p_progress, progress),
            message = coalesce(p_message, message), error = coalesce(p_error, error),
            version = version + 1, update_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
    ELSE
        UPDATE jobs.jobs SET
            status = coalesce(p_status, status), progress = coalesce(p_progress, progress),
            message = coalesce(p_message, message), error = coalesce(p_error, error),
            data = coalesce(p_data, data),
            data_pb = CASE WHEN p_data IS NULL THEN data_pb ELSE p_data_pb END,
            result = coalesce(p_result, result),
            result_pb = CASE WHEN p_result IS NULL THEN result_pb ELSE p_result_pb END,
            version = version + 1, update_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
END
$$;

-- Cancelling a cancelled job changes nothing; a job in another final status cannot be.
CREATE FUNCTION jobs.cancel_job(p_profile_id text, p_job_id uuid)
RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    current_status := jobs.locked_status(p_profile_id, p_job_id, NULL);
    IF current_status <> 'CANCELLED' THEN
        IF jobs.stage(current_status) = 2 THEN
            RAISE EXCEPTION USING ERRCODE = 'SU412', MESSAGE = format(
                'job %s is already %s; it cannot be cancelled', p_job_id, current_status);
        END IF;
        UPDATE jobs.jobs SET status = 'CANCELLED', version = version + 1,
            update_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
END
$$;

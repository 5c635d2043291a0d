-- A work queue for the pipeline's workers (LeaseJobs): scheduling fields, leases, attempts,
-- and turns between profiles. Every added column has a constant default, so adding it
-- rewrites no row.
ALTER TABLE jobs.jobs
    ADD COLUMN run_after timestamptz,  -- NULL: at once
    ADD COLUMN priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 100),
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    ADD COLUMN attempt integer NOT NULL DEFAULT 0,
    -- The current lease: lease_expire_time is set while the job is held under it.
    ADD COLUMN lease_id uuid,
    ADD COLUMN lease_worker text,
    ADD COLUMN lease_expire_time timestamptz,
    ADD COLUMN lease_seconds double precision,
    -- One object per lease, oldest first: attempt, worker, start_time, end_time, outcome,
    -- error. At most max_attempts (100) entries.
    ADD COLUMN attempts jsonb NOT NULL DEFAULT '[]';

-- The profiles with pending work of a kind (a skip scan over its first two columns), and a
-- profile's next job of that kind: highest priority, then oldest first.
CREATE INDEX jobs_pending ON jobs.jobs (kind, profile_id, priority DESC, create_time)
    WHERE status = 'PENDING';
-- The leases that expired, for the sweep.
CREATE INDEX jobs_leased ON jobs.jobs (lease_expire_time) WHERE lease_expire_time IS NOT NULL;

-- When each profile was last served a lease: the next lease serves first the profiles
-- served least recently (never served first), so profiles take turns.
CREATE TABLE jobs.lease_turns (
    profile_id      text        PRIMARY KEY,
    last_lease_time timestamptz NOT NULL
);

-- Leasing reads across profiles, and only what a queue needs: the jobs waiting for a lease
-- and the leases that expired. It writes nothing across profiles: each job is moved with
-- app.profile_id set to its own profile, under jobs_of_current_profile. Only jobs.lease_jobs
-- and jobs.reclaim_leases set app.leasing, and only for their own statement.
CREATE POLICY jobs_leasing_read ON jobs.jobs FOR SELECT
    USING (current_setting('app.leasing', true) = 'on'
        AND (status = 'PENDING' OR lease_expire_time < clock_timestamp()));

ALTER TABLE jobs.lease_turns ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs.lease_turns FORCE ROW LEVEL SECURITY;
CREATE POLICY lease_turns_leasing ON jobs.lease_turns
    USING (current_setting('app.leasing', true) = 'on')
    WITH CHECK (current_setting('app.leasing', true) = 'on');
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs.lease_turns TO jobs_service;

-- Workers waiting in LeaseJobs wake when a job becomes PENDING: made, or put back after an
-- expired lease. The payload is its kind.
CREATE FUNCTION jobs.notify_job_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobs_job_pending', NEW.kind);
    RETURN NULL;
END
$$;

CREATE TRIGGER job_pending_made AFTER INSERT ON jobs.jobs
    FOR EACH ROW EXECUTE FUNCTION jobs.notify_job_pending();
CREATE TRIGGER job_pending_again AFTER UPDATE OF status ON jobs.jobs
    FOR EACH ROW WHEN (NEW.status = 'PENDING' AND OLD.status <> 'PENDING')
    EXECUTE FUNCTION jobs.notify_job_pending();

-- The view replies are read from gains the new fields (lease_id stays out: only LeaseJobs
-- returns it, to the holder).
CREATE OR REPLACE VIEW jobs.job_replies WITH (security_invoker = true) AS
    SELECT job_id, profile_id, kind, status, progress, message, error,
        data_pb, CASE WHEN data_pb IS NULL THEN data END AS data,
        result_pb, CASE WHEN result_pb IS NULL THEN result END AS result,
        create_time, update_time, version,
        run_after, priority, max_attempts, attempt, lease_worker, lease_expire_time, attempts
    FROM jobs.jobs;

-- The last attempt of `attempts` ended now, with the outcome and error given.
CREATE FUNCTION jobs.attempt_ended(p_attempts jsonb, p_outcome text, p_error text)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT CASE WHEN jsonb_array_length(p_attempts) = 0 THEN p_attempts
        ELSE jsonb_set(p_attempts, ARRAY[(jsonb_array_length(p_attempts) - 1)::text],
            p_attempts -> -1 || jsonb_build_object(
                'end_time', clock_timestamp(), 'outcome', p_outcome, 'error', p_error))
    END;
$$;

-- A held job's lease after an update: extended by its duration from now when the holder
-- made the update, ended when the update ends the attempt, else as it was.
CREATE FUNCTION jobs.lease_extended(
    p_expire_time timestamptz, p_seconds double precision, p_by_holder boolean, p_ends boolean
) RETURNS timestamptz LANGUAGE sql AS $$
    SELECT CASE WHEN NOT p_by_holder THEN p_expire_time WHEN p_ends THEN NULL
        ELSE clock_timestamp() + make_interval(secs => p_seconds) END;
$$;

DROP FUNCTION jobs.create_job(text, text, text, jsonb, bytea);
CREATE FUNCTION jobs.create_job(
    p_profile_id text, p_request_id text, p_kind text, p_data jsonb, p_data_pb bytea,
    p_run_after timestamptz, p_priority integer, p_max_attempts integer
) RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
DECLARE
    made uuid;
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    INSERT INTO jobs.jobs (
        profile_id, request_id, kind, data, data_pb, run_after, priority, max_attempts
    )
    VALUES (
        p_profile_id, p_request_id, p_kind, p_data, p_data_pb, p_run_after, p_priority,
        p_max_attempts
    )
    ON CONFLICT (profile_id, request_id) DO NOTHING
    RETURNING job_id INTO made;
    IF made IS NULL THEN  -- the request_id was used: that job
        SELECT job_id INTO made FROM jobs.jobs
        WHERE profile_id = p_profile_id AND request_id = p_request_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies WHERE profile_id = p_profile_id AND job_id = made;
END
$$;

-- A held job (lease_expire_time set) takes updates from its holder only: p_lease_id must be
-- its lease, and an update from the holder extends the lease, or ends it with a final
-- status. A lease_id that is not the job's current lease is a stale holder's: refused.
DROP FUNCTION jobs.update_job(
    text, uuid, bigint, text, integer, text, text, jsonb, bytea, jsonb, bytea);
CREATE FUNCTION jobs.update_job(
    p_profile_id text, p_job_id uuid, p_etag bigint,
    p_status text, p_progress integer, p_message text, p_error text,
    p_data jsonb, p_data_pb bytea, p_result jsonb, p_result_pb bytea, p_lease_id uuid
) RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
DECLARE
    current_status text;
    held record;
    ends boolean;
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    current_status := jobs.locked_status(p_profile_id, p_job_id, p_etag);
    SELECT j.lease_id, j.lease_worker, j.lease_expire_time, j.attempt INTO held
    FROM jobs.jobs j WHERE j.profile_id = p_profile_id AND j.job_id = p_job_id;
    IF p_lease_id IS NOT NULL
            AND (held.lease_id IS DISTINCT FROM p_lease_id OR held.lease_expire_time IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = 'SU412', MESSAGE = format(
            'lease %s on job %s is no longer held (the job is %s, attempt %s): drop the job',
            p_lease_id, p_job_id, current_status, held.attempt);
    END IF;
    IF p_lease_id IS NULL AND held.lease_expire_time IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'SU412', MESSAGE = format(
            'job %s is leased to worker %s until %s; only its holder may update it '
            '(CancelJob stops it)', p_job_id, held.lease_worker, held.lease_expire_time);
    END IF;
    IF p_status IS NOT NULL THEN
        PERFORM jobs.check_transition(current_status, p_status);
    ELSIF p_progress IS NOT NULL AND jobs.stage(current_status) = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'SU412',
            MESSAGE = format('job is %s; its progress can no longer change', current_status);
    END IF;
    ends := p_lease_id IS NOT NULL AND jobs.stage(coalesce(p_status, current_status)) = 2;
    -- data and result are written only when they change, so that the triggers of 0004 never
    -- compare a large document an update did not touch.
    IF p_data IS NULL AND p_result IS NULL THEN
        UPDATE jobs.jobs SET
            status = coalesce(p_status, status), progress = coalesce(p_progress, progress),
            message = coalesce(p_message, message), error = coalesce(p_error, error),
            lease_expire_time = jobs.lease_extended(lease_expire_time, lease_seconds,
                p_lease_id IS NOT NULL, ends),
            attempts = CASE WHEN ends THEN jobs.attempt_ended(
                attempts, coalesce(p_status, status), coalesce(p_error, error)) ELSE attempts END,
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
            lease_expire_time = jobs.lease_extended(lease_expire_time, lease_seconds,
                p_lease_id IS NOT NULL, ends),
            attempts = CASE WHEN ends THEN jobs.attempt_ended(
                attempts, coalesce(p_status, status), coalesce(p_error, error)) ELSE attempts END,
            version = version + 1, update_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
END
$$;

-- Cancelling a held job ends its lease: the holder's next update is refused.
CREATE OR REPLACE FUNCTION jobs.cancel_job(p_profile_id text, p_job_id uuid)
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
            update_time = clock_timestamp(),
            attempts = CASE WHEN lease_expire_time IS NULL THEN attempts
                ELSE jobs.attempt_ended(attempts, 'CANCELLED', '') END,
            lease_expire_time = NULL
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
    END IF;
    RETURN QUERY SELECT * FROM jobs.job_replies
        WHERE profile_id = p_profile_id AND job_id = p_job_id;
END
$$;

-- The next job of the profile's turn: its pending job of the kinds given (highest priority,
-- then oldest first) moved to PROCESSING under a new lease for p_worker, or NULL when it has
-- none ready, or already p_max_processing jobs in PROCESSING (0: no cap). Run inside
-- jobs.lease_jobs only, which holds the profile's advisory lock: the job is taken FOR UPDATE
-- SKIP LOCKED under its own profile's scope.
CREATE FUNCTION jobs.lease_next(
    p_profile_id text, p_worker text, p_kinds text[], p_lease_seconds double precision,
    p_max_processing integer
) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    chosen uuid;
BEGIN
    PERFORM set_config('app.profile_id', p_profile_id, true);
    IF p_max_processing > 0 AND (
        SELECT count(*) FROM (
            SELECT FROM jobs.jobs WHERE profile_id = p_profile_id AND status = 'PROCESSING'
            LIMIT p_max_processing) AS processing
    ) >= p_max_processing THEN
        RETURN NULL;
    END IF;
    SELECT heads.job_id INTO chosen
    FROM unnest(p_kinds) AS wanted(kind), LATERAL (
        SELECT j.job_id, j.priority, j.create_time FROM jobs.jobs j
        WHERE j.profile_id = p_profile_id AND j.status = 'PENDING' AND j.kind = wanted.kind
            AND (j.run_after IS NULL OR j.run_after <= clock_timestamp())
        ORDER BY j.priority DESC, j.create_time
        LIMIT 1 FOR UPDATE SKIP LOCKED
    ) AS heads
    ORDER BY heads.priority DESC, heads.create_time
    LIMIT 1;
    IF chosen IS NOT NULL THEN
        UPDATE jobs.jobs SET status = 'PROCESSING', attempt = attempt + 1,
            lease_id = gen_random_uuid(), lease_worker = p_worker,
            lease_seconds = p_lease_seconds,
            lease_expire_time = clock_timestamp() + make_interval(secs => p_lease_seconds),
            attempts = attempts || jsonb_build_object(
                'attempt', attempt + 1, 'worker', p_worker, 'start_time', clock_timestamp()),
            version = version + 1, update_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND job_id = chosen;
    END IF;
    RETURN chosen;
END
$$;

-- What a job's large fields weigh in a reply: data and result as Struct bytes (else JSON),
-- message and error. Read in the job's own profile scope.
CREATE FUNCTION jobs.reply_bytes(p_profile_id text, p_job_id uuid) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(octet_length(data_pb), octet_length(data::text))
        + coalesce(octet_length(result_pb), octet_length(result::text))
        + octet_length(message) + octet_length(error)
    FROM jobs.jobs WHERE profile_id = p_profile_id AND job_id = p_job_id;
$$;

-- Up to p_max_jobs pending jobs of the kinds given, moved to PROCESSING under a lease for
-- p_worker, each with its lease_id. Profiles take turns: those with pending work are taken
-- least recently served first (never served first), one job each, and then round after round
-- among those that had one, until p_max_jobs are leased or none is left. A profile that
-- another worker is leasing from at this moment is skipped (its advisory lock is taken), so
-- concurrent workers serve different profiles and never the same job. Leasing stops early
-- once the jobs leased hold more than p_max_bytes (data, result, message, error), so that
-- one more job of the largest size still fits in the reply.
CREATE FUNCTION jobs.lease_jobs(
    p_worker text, p_kinds text[], p_max_jobs integer, p_lease_seconds double precision,
    p_max_processing integer, p_max_bytes bigint
) RETURNS TABLE (reply jobs.job_replies, granted_lease uuid) LANGUAGE plpgsql AS $$
DECLARE
    candidates text[];
    serving text[] := '{}';
    next_round text[];
    candidate text;
    chosen uuid;
    leased uuid[] := '{}';
    owners text[] := '{}';
    used bigint := 0;
BEGIN
    PERFORM set_config('role', 'jobs_service', true), set_config('app.leasing', 'on', true);
    -- The profiles with pending work of these kinds: a skip scan of jobs_pending, one probe
    -- per kind and profile, however many jobs each profile has waiting.
    WITH RECURSIVE pending(kind, profile_id) AS (
        SELECT wanted.kind, (
            SELECT j.profile_id FROM jobs.jobs j
            WHERE j.status = 'PENDING' AND j.kind = wanted.kind
            ORDER BY j.profile_id LIMIT 1)
        FROM unnest(p_kinds) AS wanted(kind)
        UNION ALL
        SELECT p.kind, (
            SELECT j.profile_id FROM jobs.jobs j
            WHERE j.status = 'PENDING' AND j.kind = p.kind AND j.profile_id > p.profile_id
            ORDER BY j.profile_id LIMIT 1)
        FROM pending p WHERE p.profile_id IS NOT NULL
    )
    SELECT array_agg(waiting.profile_id ORDER BY waiting.served NULLS FIRST, waiting.profile_id)
    INTO candidates
    FROM (
        SELECT p.profile_id, min(t.last_lease_time) AS served
        FROM pending p LEFT JOIN jobs.lease_turns t USING (profile_id)
        WHERE p.profile_id IS NOT NULL
        GROUP BY p.profile_id
    ) AS waiting;

    FOREACH candidate IN ARRAY coalesce(candidates, '{}') LOOP
        EXIT WHEN cardinality(leased) >= p_max_jobs OR used > p_max_bytes;
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtextextended('jobs.lease:' || candidate, 0));
        chosen := jobs.lease_next(candidate, p_worker, p_kinds, p_lease_seconds, p_max_processing);
        CONTINUE WHEN chosen IS NULL;
        leased := leased || chosen;
        owners := owners || candidate;
        serving := serving || candidate;
        used := used + jobs.reply_bytes(candidate, chosen);
    END LOOP;
    WHILE cardinality(serving) > 0 AND cardinality(leased) < p_max_jobs AND used <= p_max_bytes
    LOOP
        next_round := '{}';
        FOREACH candidate IN ARRAY serving LOOP
            EXIT WHEN cardinality(leased) >= p_max_jobs OR used > p_max_bytes;
            chosen := jobs.lease_next(
                candidate, p_worker, p_kinds, p_lease_seconds, p_max_processing);
            CONTINUE WHEN chosen IS NULL;
            leased := leased || chosen;
            owners := owners || candidate;
            next_round := next_round || candidate;
            used := used + jobs.reply_bytes(candidate, chosen);
        END LOOP;
        serving := next_round;
    END LOOP;

    IF cardinality(owners) > 0 THEN
        INSERT INTO jobs.lease_turns (profile_id, last_lease_time)
        SELECT served, clock_timestamp() FROM (SELECT DISTINCT unnest(owners)) AS s(served)
        ON CONFLICT (profile_id) DO UPDATE SET last_lease_time = excluded.last_lease_time;
    END IF;

    FOR i IN 1 .. cardinality(leased) LOOP
        PERFORM set_config('app.profile_id', owners[i], true);
        RETURN QUERY SELECT r, j.lease_id
            FROM jobs.job_replies r JOIN jobs.jobs j USING (profile_id, job_id)
            WHERE r.profile_id = owners[i] AND r.job_id = leased[i];
    END LOOP;
END
$$;

-- Up to p_limit expired leases ended: each job back to PENDING after a backoff (p_retry_base
-- seconds doubled for each attempt made, at most p_retry_max), or FAILED once it has had
-- max_attempts leases. Safe on every replica at once: a job another sweep has just moved no
-- longer matches the UPDATE's conditions, which are checked again on its locked row. Returns
-- how many jobs it moved.
CREATE FUNCTION jobs.reclaim_leases(
    p_limit integer, p_retry_base double precision, p_retry_max double precision
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    expired record;
    moved integer := 0;
    changed integer;
BEGIN
    PERFORM set_config('role', 'jobs_service', true), set_config('app.leasing', 'on', true);
    FOR expired IN
        SELECT profile_id, job_id FROM jobs.jobs
        WHERE lease_expire_time < clock_timestamp()
        ORDER BY lease_expire_time LIMIT p_limit
    LOOP
        PERFORM set_config('app.profile_id', expired.profile_id, true);
        UPDATE jobs.jobs SET
            status = CASE WHEN attempt >= max_attempts THEN 'FAILED' ELSE 'PENDING' END,
            error = CASE WHEN attempt >= max_attempts THEN format(
                    'its lease expired on attempt %s of %s (worker %s)%s',
                    attempt, max_attempts, lease_worker,
                    CASE WHEN error = '' THEN '' ELSE '; last error: ' || error END)
                ELSE error END,
            run_after = CASE WHEN attempt >= max_attempts THEN run_after
                ELSE clock_timestamp() + make_interval(
                    secs => least(p_retry_max, p_retry_base * 2 ^ (attempt - 1))) END,
            attempts = jobs.attempt_ended(attempts, 'LEASE_EXPIRED', ''),
            lease_expire_time = NULL,
            version = version + 1, update_time = clock_timestamp()
        WHERE profile_id = expired.profile_id AND job_id = expired.job_id
            AND lease_expire_time < clock_timestamp();
        GET DIAGNOSTICS changed = ROW_COUNT;
        moved := moved + changed;
    END LOOP;
    RETURN moved;
END
$$;

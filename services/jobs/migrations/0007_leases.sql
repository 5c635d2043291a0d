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
    -- error, and lease_id (never shown to the profile: the proof a worker held the job, for
    -- jobs.get_leased_job). At most max_attempts (100) entries.
    ADD COLUMN attempts jsonb NOT NULL DEFAULT '[]';

-- A profile's next job of a kind: highest priority, then oldest first.
CREATE INDEX jobs_pending ON jobs.jobs (profile_id, kind, priority DESC, create_time)
    WHERE status = 'PENDING';
-- The leases that expired, for the sweep.
CREATE INDEX jobs_leased ON jobs.jobs (lease_expire_time) WHERE lease_expire_time IS NOT NULL;

-- The queue's turns: one row for each kind a profile may have pending jobs of, with when it
-- was last served a lease. A lease serves first the turns served least recently (a new one
-- at once), so profiles take turns and a lease never looks at a profile without work. A turn
-- is made whenever a job becomes PENDING, however it is written (trigger job_pending_made:
-- CreateJob, an expired lease put back, SQL by hand), and dropped by a lease that finds it
-- without any pending job; jobs.turn_lock keeps the two from crossing.
CREATE TABLE jobs.lease_turns (
    profile_id      text        NOT NULL,
    kind            text        NOT NULL,
    last_lease_time timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (profile_id, kind)
);
-- A lease reads only the turns of the kinds it asks for: a profile that makes jobs of
-- thousands of kinds adds turns no other kind's lease walks past.
CREATE INDEX lease_turns_by_kind ON jobs.lease_turns (kind);
-- No index on last_lease_time: every lease moves the turns it served, and an index on the
-- time would keep an entry for each move until vacuum, which a lease walking the turns in
-- time order would step over. Unindexed, a move is a HOT update that the page prunes, and a
-- lease sorts the live turns (one per profile and kind with work) in memory.

-- Leasing turns jobs over fast: the dead index entries of the jobs it moved lie where the
-- next lease of each profile looks first, until vacuum removes them.
ALTER TABLE jobs.jobs SET (autovacuum_vacuum_scale_factor = 0.01);

-- Leasing reads across profiles, and only what a queue needs: the jobs waiting for a lease
-- and the leases that expired. It writes nothing across profiles: each job is moved with
-- app.profile_id set to its own profile, under jobs_of_current_profile. Only jobs.lease_jobs
-- and jobs.reclaim_leases set app.leasing, and only for their own statement.
CREATE POLICY jobs_leasing_read ON jobs.jobs FOR SELECT
    USING (current_setting('app.leasing', true) = 'on'
        AND (status = 'PENDING' OR lease_expire_time < statement_timestamp()));

ALTER TABLE jobs.lease_turns ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs.lease_turns FORCE ROW LEVEL SECURITY;
CREATE POLICY lease_turns_leasing ON jobs.lease_turns
    USING (current_setting('app.leasing', true) = 'on')
    WITH CHECK (current_setting('app.leasing', true) = 'on');
-- A turn holds no data of its profile, only that it may have work: any write that makes a job
-- PENDING may make its turn, whatever it is scoped to. A turn without work costs a lease one
-- look, and is dropped then.
CREATE POLICY lease_turns_made ON jobs.lease_turns FOR INSERT WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs.lease_turns TO jobs_service;

-- The lock a turn is made (shared) and dropped (exclusive) under: a lease drops a turn only
-- while no CreateJob of that profile and kind is under way, and after looking once more
-- for a pending job, so that a job made meanwhile always has its turn.
CREATE FUNCTION jobs.turn_lock(p_profile_id text, p_kind text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('jobs.turn:' || p_kind || ':' || p_profile_id, 0);
$$;

-- A turn for the profile's pending jobs of the kind, made if there is none: whether it was.
CREATE FUNCTION jobs.make_turn(p_profile_id text, p_kind text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(jobs.turn_lock(p_profile_id, p_kind));
    INSERT INTO jobs.lease_turns (profile_id, kind) VALUES (p_profile_id, p_kind)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

-- A job became PENDING (made, or put back after an expired lease): its turn, and, when the
-- turn is new, a wake-up for the workers waiting in LeaseJobs (the payload is its kind).
-- Only then: a transaction that notifies waits at commit for every other one that does
-- (Postgres serializes them on one lock), so a CreateJob that notified every time would queue
-- behind any busy profile's UpdateJobs. A worker waits only when it found no turn with work,
-- so a turn that already existed wakes nobody; a waiting worker also looks again every
-- second (LEASE_RECHECK_SECONDS), for a run_after that has come.
CREATE FUNCTION jobs.job_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF jobs.make_turn(NEW.profile_id, NEW.kind) THEN
        PERFORM pg_notify('jobs_job_pending', NEW.kind);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_pending_made AFTER INSERT ON jobs.jobs
    FOR EACH ROW WHEN (NEW.status = 'PENDING') EXECUTE FUNCTION jobs.job_pending();
CREATE TRIGGER job_pending_again AFTER UPDATE OF status ON jobs.jobs
    FOR EACH ROW WHEN (NEW.status = 'PENDING' AND OLD.status <> 'PENDING')
    EXECUTE FUNCTION jobs.job_pending();

-- The turns of the jobs pending before this migration. Run by the schema's owner, whom
-- row-level security binds too: the operator's read, and the leasing policy, for this
-- statement's transaction only.
SELECT set_config('app.operator', 'on', true), set_config('app.leasing', 'on', true);
INSERT INTO jobs.lease_turns (profile_id, kind)
SELECT DISTINCT profile_id, kind FROM jobs.jobs WHERE status = 'PENDING';
SELECT set_config('app.operator', '', true), set_config('app.leasing', '', true);


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

-- What a change needs of the job, its row locked until the statement's transaction ends: its
-- status and its lease, in one index lookup; SU404 when the profile has no such job, SU409
-- when p_etag (if given) is not its version. Only these columns: a row variable would copy
-- the job's data and result.
CREATE FUNCTION jobs.locked_job(p_profile_id text, p_job_id uuid, p_etag bigint)
RETURNS TABLE (
    status text, lease_id uuid, lease_worker text, lease_expire_time timestamptz,
    attempt integer
) LANGUAGE plpgsql AS $$
DECLARE
    found_version bigint;
BEGIN
    SELECT j.status, j.version, j.lease_id, j.lease_worker, j.lease_expire_time, j.attempt
    INTO status, found_version, lease_id, lease_worker, lease_expire_time, attempt
    FROM jobs.jobs j WHERE j.profile_id = p_profile_id AND j.job_id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'SU404', MESSAGE = format('job %s not found', p_job_id);
    END IF;
    IF p_etag IS NOT NULL AND p_etag <> found_version THEN
        RAISE EXCEPTION USING ERRCODE = 'SU409', MESSAGE = format(
            'job %s changed since it was read (etag %s, now %s); read it again and retry',
            p_job_id, p_etag, found_version);
    END IF;
    RETURN NEXT;
END
$$;

-- 0005's checks now live in jobs.locked_job: one place for them.
CREATE OR REPLACE FUNCTION jobs.locked_status(p_profile_id text, p_job_id uuid, p_etag bigint)
RETURNS text LANGUAGE sql AS $$
    SELECT status FROM jobs.locked_job(p_profile_id, p_job_id, p_etag);
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
    SELECT * INTO held FROM jobs.locked_job(p_profile_id, p_job_id, p_etag);
    current_status := held.status;
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
    granted uuid := gen_random_uuid();
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
            lease_id = granted, lease_worker = p_worker,
            lease_seconds = p_lease_seconds,
            lease_expire_time = clock_timestamp() + make_interval(secs => p_lease_seconds),
            attempts = attempts || jsonb_build_object('attempt', attempt + 1, 'worker', p_worker,
                'start_time', clock_timestamp(), 'lease_id', granted),
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

-- A turn whose lease found no job: dropped when the profile has no pending job of its kind
-- at all (and no CreateJob of it is under way), else moved to the back.
CREATE FUNCTION jobs.turn_without_work(p_profile_id text, p_kind text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(jobs.turn_lock(p_profile_id, p_kind)) AND NOT EXISTS (
        SELECT FROM jobs.jobs
        WHERE profile_id = p_profile_id AND kind = p_kind AND status = 'PENDING'
    ) THEN
        DELETE FROM jobs.lease_turns WHERE profile_id = p_profile_id AND kind = p_kind;
    ELSE
        UPDATE jobs.lease_turns SET last_lease_time = clock_timestamp()
        WHERE profile_id = p_profile_id AND kind = p_kind;
    END IF;
END
$$;

-- Up to p_max_jobs pending jobs of the kinds given, moved to PROCESSING under a lease for
-- p_worker, each with its lease_id. Profiles take turns (jobs.lease_turns): the turns of
-- these kinds are taken least recently served first, one job each, and then round after
-- round among those that had one, until p_max_jobs are leased or none is left. A profile
-- that another worker is leasing from at this moment is skipped (its advisory lock is
-- taken), so concurrent workers serve different profiles and never the same job. Leasing
-- stops early once the jobs leased hold more than p_max_bytes (data, result, message,
-- error), so that one more job of the largest size still fits in the reply.
CREATE FUNCTION jobs.lease_jobs(
    p_worker text, p_kinds text[], p_max_jobs integer, p_lease_seconds double precision,
    p_max_processing integer, p_max_bytes bigint
) RETURNS TABLE (reply jobs.job_replies, granted_lease uuid) LANGUAGE plpgsql AS $$
DECLARE
    turn record;
    serving_profiles text[] := '{}';
    serving_kinds text[] := '{}';
    next_profiles text[];
    next_kinds text[];
    chosen uuid;
    leased uuid[] := '{}';
    owners text[] := '{}';
    used bigint := 0;
BEGIN
    PERFORM set_config('role', 'jobs_service', true), set_config('app.leasing', 'on', true);
    FOR turn IN
        SELECT t.profile_id, t.kind FROM jobs.lease_turns t
        WHERE t.kind = ANY(p_kinds)
        ORDER BY t.last_lease_time, t.profile_id
    LOOP
        EXIT WHEN cardinality(leased) >= p_max_jobs OR used > p_max_bytes;
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtextextended('jobs.lease:' || turn.profile_id, 0));
        chosen := jobs.lease_next(
            turn.profile_id, p_worker, ARRAY[turn.kind], p_lease_seconds, p_max_processing);
        IF chosen IS NULL THEN
            PERFORM jobs.turn_without_work(turn.profile_id, turn.kind);
            CONTINUE;
        END IF;
        UPDATE jobs.lease_turns SET last_lease_time = clock_timestamp()
        WHERE profile_id = turn.profile_id AND kind = turn.kind;
        leased := leased || chosen;
        owners := owners || turn.profile_id;
        serving_profiles := serving_profiles || turn.profile_id;
        serving_kinds := serving_kinds || turn.kind;
        used := used + jobs.reply_bytes(turn.profile_id, chosen);
    END LOOP;
    WHILE cardinality(serving_profiles) > 0 AND cardinality(leased) < p_max_jobs
            AND used <= p_max_bytes LOOP
        next_profiles := '{}';
        next_kinds := '{}';
        FOR i IN 1 .. cardinality(serving_profiles) LOOP
            EXIT WHEN cardinality(leased) >= p_max_jobs OR used > p_max_bytes;
            chosen := jobs.lease_next(serving_profiles[i], p_worker, ARRAY[serving_kinds[i]],
                p_lease_seconds, p_max_processing);
            CONTINUE WHEN chosen IS NULL;
            leased := leased || chosen;
            owners := owners || serving_profiles[i];
            next_profiles := next_profiles || serving_profiles[i];
            next_kinds := next_kinds || serving_kinds[i];
            used := used + jobs.reply_bytes(serving_profiles[i], chosen);
        END LOOP;
        serving_profiles := next_profiles;
        serving_kinds := next_kinds;
    END LOOP;

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
    back uuid;
    moved integer := 0;
BEGIN
    PERFORM set_config('role', 'jobs_service', true), set_config('app.leasing', 'on', true);
    -- statement_timestamp(), not clock_timestamp(): a stable bound the jobs_leased index can
    -- take (a volatile one makes every sweep read the whole table).
    FOR expired IN
        SELECT profile_id, job_id FROM jobs.jobs
        WHERE lease_expire_time < statement_timestamp()
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
            AND lease_expire_time < clock_timestamp()
        RETURNING job_id INTO back;
        CONTINUE WHEN back IS NULL;  -- another sweep moved it first
        moved := moved + 1;
    END LOOP;
    RETURN moved;
END
$$;

-- The job, for a worker that holds or held it under p_lease_id (the lease is in its attempts,
-- whether it runs or has ended): what a worker may read of a profile, and what Costs asks
-- before it records a worker's usage for the job. No row otherwise: for a worker, a job it
-- never held does not exist.
CREATE FUNCTION jobs.get_leased_job(p_profile_id text, p_job_id uuid, p_lease_id uuid)
RETURNS SETOF jobs.job_replies LANGUAGE plpgsql AS $$
BEGIN
    PERFORM jobs.scope_to(p_profile_id);
    RETURN QUERY SELECT r.* FROM jobs.job_replies r JOIN jobs.jobs j USING (profile_id, job_id)
        WHERE r.profile_id = p_profile_id AND r.job_id = p_job_id
            AND j.attempts @> jsonb_build_array(jsonb_build_object('lease_id', p_lease_id));
END
$$;

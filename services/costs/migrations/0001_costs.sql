-- The costs schema: recorded lines, a daily rollup kept by the database, the pricing catalog
-- and budgets. Every per-profile table is visible only to its profile.

-- The role queries run as. An operator may have made it already (deploy/sql/bootstrap.sql),
-- in which case the owner running this needs no CREATEROLE.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'costs_service') THEN
        CREATE ROLE costs_service NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN NULL;  -- made meanwhile by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA costs TO costs_service;

-- The catalog is shared by every profile; start-up loads services/costs/prices.csv into it.
CREATE TABLE costs.prices (
    provider           text    NOT NULL,
    model              text    NOT NULL,
    usage_type         text    NOT NULL,
    unit               text    NOT NULL,
    per                numeric NOT NULL CHECK (per > 0),
    unit_price_usd     numeric NOT NULL CHECK (unit_price_usd >= 0),
    prompt_tokens_over bigint  NOT NULL DEFAULT 0 CHECK (prompt_tokens_over >= 0),
    effective_from     date    NOT NULL,
    source             text    NOT NULL,
    checked_on         date    NOT NULL,
    PRIMARY KEY (provider, model, usage_type, prompt_tokens_over, effective_from)
);

GRANT SELECT ON costs.prices TO costs_service;

CREATE TABLE costs.entries (
    profile_id     text        NOT NULL CHECK (profile_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    entry_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    request_id     text        NOT NULL,
    provider       text        NOT NULL,
    model          text        NOT NULL,
    job_id         uuid,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Raw quantities by usage type, as exact decimal strings.
    usage          jsonb       NOT NULL DEFAULT '{}',
    cost_usd       numeric     NOT NULL DEFAULT 0 CHECK (cost_usd >= 0),
    priced         boolean     NOT NULL,
    -- The catalog rows applied, one per usage type billed.
    applied_prices jsonb       NOT NULL DEFAULT '[]',
    attributes     jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (profile_id, entry_id),
    -- Idempotency: a retried record finds the first line.
    UNIQUE (profile_id, request_id)
);

-- ListCostEntries walks these newest first; summary edges scan by time; profile_id leads.
CREATE INDEX entries_newest_first ON costs.entries (profile_id, occurred_at DESC, entry_id DESC);
CREATE INDEX entries_of_job_newest_first
    ON costs.entries (profile_id, job_id, occurred_at DESC, entry_id DESC);

-- One row per profile, UTC day, provider, model, job and priced flag, so a month's summary
-- reads a few hundred rows however many lines were recorded.
CREATE TABLE costs.daily_costs (
    profile_id text    NOT NULL,
    day        date    NOT NULL,
    provider   text    NOT NULL,
    model      text    NOT NULL,
    job_id     uuid,
    priced     boolean NOT NULL,
    cost_usd   numeric NOT NULL,
    line_count bigint  NOT NULL,
    UNIQUE NULLS NOT DISTINCT (profile_id, day, provider, model, job_id, priced)
);

CREATE INDEX daily_costs_by_job ON costs.daily_costs (profile_id, job_id, day);

-- Kept in the same transaction as the insert, once per statement, so a batch of thousands of
-- lines touches each rollup row once.
CREATE FUNCTION costs.roll_up_entries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO costs.daily_costs AS rollup
        (profile_id, day, provider, model, job_id, priced, cost_usd, line_count)
    SELECT profile_id, (occurred_at AT TIME ZONE 'UTC')::date, provider, model, job_id, priced,
           sum(cost_usd), count(*)
    FROM new_entries
    GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (profile_id, day, provider, model, job_id, priced) DO UPDATE
        SET cost_usd = rollup.cost_usd + EXCLUDED.cost_usd,
            line_count = rollup.line_count + EXCLUDED.line_count;
    RETURN NULL;
END
$$;

CREATE TRIGGER entries_rolled_up AFTER INSERT ON costs.entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION costs.roll_up_entries();

CREATE TABLE costs.budgets (
    profile_id       text      NOT NULL,
    period           text      NOT NULL CHECK (period IN ('MONTHLY', 'DAILY')),
    limit_usd        numeric   NOT NULL CHECK (limit_usd > 0),
    alert_thresholds integer[] NOT NULL,
    update_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (profile_id, period)
);

-- A threshold crossed in a period is written (and logged) once.
CREATE TABLE costs.budget_crossings (
    profile_id   text        NOT NULL,
    period       text        NOT NULL,
    period_start timestamptz NOT NULL,
    threshold    integer     NOT NULL,
    crossed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (profile_id, period, period_start, threshold)
);

DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['entries', 'daily_costs', 'budgets', 'budget_crossings'] LOOP
        EXECUTE format('ALTER TABLE costs.%I ENABLE ROW LEVEL SECURITY', name);
        EXECUTE format('ALTER TABLE costs.%I FORCE ROW LEVEL SECURITY', name);
        EXECUTE format(
            'CREATE POLICY %I ON costs.%I '
            'USING (profile_id = NULLIF(current_setting(''app.profile_id'', true), '''')) '
            'WITH CHECK (profile_id = NULLIF(current_setting(''app.profile_id'', true), ''''))',
            name || '_of_current_profile', name);
    END LOOP;
END
$$;

GRANT SELECT, INSERT ON costs.entries TO costs_service;
GRANT SELECT, INSERT, UPDATE ON costs.daily_costs TO costs_service;
GRANT SELECT, INSERT, UPDATE ON costs.budgets TO costs_service;
GRANT SELECT, INSERT, DELETE ON costs.budget_crossings TO costs_service;

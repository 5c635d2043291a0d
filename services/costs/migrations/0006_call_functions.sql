-- One statement, one round trip, for the budget reads (GetBudget, CheckBudget): a function
-- that scopes the statement's own transaction to the profile (the service's role, which
-- row-level security binds, and app.profile_id), as TenantScopedPool.transaction's BEGIN does
-- for work of several statements, and takes the profile first (deploy/sharding.md).

CREATE FUNCTION costs.scope_to(p_profile_id text) RETURNS void LANGUAGE sql AS $$
    SELECT set_config('role', 'costs_service', true), set_config('app.profile_id', p_profile_id, true);
$$;

-- The profile's budgets (one period, or every one when p_period is NULL) with what was spent
-- in each one's current period: priced lines of the days [start, end) the caller gives for
-- that period (services/costs/model.py: BudgetPeriod.bounds, UTC days).
CREATE FUNCTION costs.budget_statuses(
    p_profile_id text, p_period text,
    p_daily_start date, p_daily_end date, p_monthly_start date, p_monthly_end date
) RETURNS TABLE (period text, limit_usd numeric, alert_thresholds integer[], spent_usd numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM costs.scope_to(p_profile_id);
    RETURN QUERY
    SELECT budget.period, budget.limit_usd, budget.alert_thresholds,
        (SELECT coalesce(sum(daily.cost_usd), 0) FROM costs.daily_costs AS daily
         WHERE daily.profile_id = p_profile_id AND daily.priced
             AND daily.day >= CASE budget.period WHEN 'DAILY' THEN p_daily_start
                 ELSE p_monthly_start END
             AND daily.day < CASE budget.period WHEN 'DAILY' THEN p_daily_end
                 ELSE p_monthly_end END)
    FROM costs.budgets AS budget
    WHERE budget.profile_id = p_profile_id AND (p_period IS NULL OR budget.period = p_period)
    ORDER BY budget.period;
END
$$;

-- Recording a line or a batch (RecordElevenLabsTTS, RecordGeminiUsage, RecordUsage, one
-- StreamUsage message) in two statements, two round trips: the prices of the lines' models
-- (costs.prices_for), then costs.record_lines, which inserts the priced lines, rolls them up
-- (the statement-level trigger of 0001) and notes the budget thresholds crossed. Pricing stays
-- in Python (services/costs/model.py: price_line), between the two.

CREATE FUNCTION costs.prices_for(p_profile_id text, p_providers text[], p_models text[])
RETURNS SETOF costs.prices LANGUAGE plpgsql AS $$
BEGIN
    PERFORM costs.scope_to(p_profile_id);
    RETURN QUERY SELECT * FROM costs.prices
        WHERE (provider, model) IN (SELECT * FROM unnest(p_providers, p_models));
END
$$;

-- Each alert threshold spend has reached in the current period, the first time: the budget
-- rows are locked, so of two concurrent records the second sees the first's spend, and the
-- crossings table keeps each crossing once. The new crossings, for the log.
CREATE FUNCTION costs.note_crossings(
    p_profile_id text,
    p_daily_start date, p_daily_end date, p_monthly_start date, p_monthly_end date
) RETURNS TABLE (period text, threshold integer, spent_usd numeric, limit_usd numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    budget record;
    spent numeric;
    starts date;
    ends date;
BEGIN
    FOR budget IN
        SELECT b.period, b.limit_usd, b.alert_thresholds FROM costs.budgets AS b
        WHERE b.profile_id = p_profile_id ORDER BY b.period FOR UPDATE
    LOOP
        IF budget.period = 'DAILY' THEN
            starts := p_daily_start;
            ends := p_daily_end;
        ELSE
            starts := p_monthly_start;
            ends := p_monthly_end;
        END IF;
        SELECT coalesce(sum(daily.cost_usd), 0) INTO spent FROM costs.daily_costs AS daily
        WHERE daily.profile_id = p_profile_id AND daily.priced
            AND daily.day >= starts AND daily.day < ends;
        RETURN QUERY
        INSERT INTO costs.budget_crossings AS crossing
            (profile_id, period, period_start, threshold)
        SELECT p_profile_id, budget.period, starts::timestamp AT TIME ZONE 'UTC', t
        FROM unnest(budget.alert_thresholds) AS t
        WHERE spent * 100 >= budget.limit_usd * t
        ON CONFLICT DO NOTHING
        RETURNING crossing.period, crossing.threshold, spent, budget.limit_usd;
    END LOOP;
END
$$;

-- p_batch: the priced lines as one JSON array (services/costs/store.py). Returns a row per
-- line recorded now (new), with the whole line when p_whole_rows (a single record) or only
-- its request_id (a batch); for a single line already recorded, that line (not new); then a
-- row per budget threshold crossed (crossed_period set, the line columns NULL).
CREATE FUNCTION costs.record_lines(
    p_profile_id text, p_batch text, p_whole_rows boolean,
    p_daily_start date, p_daily_end date, p_monthly_start date, p_monthly_end date
) RETURNS TABLE (
    entry_id uuid, request_id text, provider text, model text, job_id uuid,
    occurred_at timestamptz, recorded_at timestamptz, usage jsonb, cost_usd numeric,
    priced boolean, applied_prices jsonb, attributes jsonb, new boolean,
    crossed_period text, threshold integer, spent_usd numeric, limit_usd numeric
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    recorded integer;
BEGIN
    PERFORM costs.scope_to(p_profile_id);
    RETURN QUERY
    WITH new_lines AS (
        INSERT INTO costs.entries (profile_id, request_id, provider, model, job_id,
            occurred_at, usage, cost_usd, priced, applied_prices, attributes)
        SELECT p_profile_id, line.request_id, line.provider, line.model, line.job_id,
            line.occurred_at, line.usage, line.cost_usd, line.priced, line.applied_prices,
            line.attributes
        FROM jsonb_to_recordset(p_batch::jsonb) AS line(request_id text, provider text,
            model text, job_id uuid, occurred_at timestamptz, usage jsonb, cost_usd numeric,
            priced boolean, applied_prices jsonb, attributes jsonb)
        ON CONFLICT (profile_id, request_id) DO NOTHING
        RETURNING *
    )
    SELECT e.entry_id, e.request_id, e.provider, e.model, e.job_id, e.occurred_at,
        e.recorded_at, e.usage, e.cost_usd, e.priced, e.applied_prices, e.attributes, true,
        NULL::text, NULL::integer, NULL::numeric, NULL::numeric
    FROM new_lines AS e WHERE p_whole_rows
    UNION ALL
    SELECT NULL, e.request_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true,
        NULL, NULL, NULL, NULL
    FROM new_lines AS e WHERE NOT p_whole_rows;
    GET DIAGNOSTICS recorded = ROW_COUNT;
    IF recorded > 0 THEN
        RETURN QUERY
        SELECT NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::uuid, NULL::timestamptz,
            NULL::timestamptz, NULL::jsonb, NULL::numeric, NULL::boolean, NULL::jsonb,
            NULL::jsonb, NULL::boolean, c.period, c.threshold, c.spent_usd, c.limit_usd
        FROM costs.note_crossings(
            p_profile_id, p_daily_start, p_daily_end, p_monthly_start, p_monthly_end) AS c;
    ELSIF p_whole_rows THEN
        RETURN QUERY
        SELECT e.entry_id, e.request_id, e.provider, e.model, e.job_id, e.occurred_at,
            e.recorded_at, e.usage, e.cost_usd, e.priced, e.applied_prices, e.attributes, false,
            NULL::text, NULL::integer, NULL::numeric, NULL::numeric
        FROM costs.entries AS e
        WHERE e.profile_id = p_profile_id
            AND e.request_id = (p_batch::jsonb -> 0 ->> 'request_id');
    END IF;
END
$$;

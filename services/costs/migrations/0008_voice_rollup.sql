-- GetCostSummary by ElevenLabs voice (GroupBy VOICE): the daily rollup keeps each line's
-- voice_id (its attributes' voice_id; NULL for a line without one) in its key, and is rebuilt
-- once from the lines, which are never changed or deleted, so whole days split by voice too.
-- The rebuild reads every line once: on a large table, run this migration in a quiet hour.

ALTER TABLE costs.daily_costs ADD COLUMN voice_id text;

DO $$
DECLARE
    old_key text;
BEGIN
    SELECT conname INTO old_key FROM pg_constraint
    WHERE conrelid = 'costs.daily_costs'::regclass AND contype = 'u';
    EXECUTE format('ALTER TABLE costs.daily_costs DROP CONSTRAINT %I', old_key);
END
$$;
ALTER TABLE costs.daily_costs ADD CONSTRAINT daily_costs_key
    UNIQUE NULLS NOT DISTINCT (profile_id, day, provider, model, job_id, voice_id, priced);

CREATE OR REPLACE FUNCTION costs.roll_up_entries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO costs.daily_costs AS rollup
        (profile_id, day, provider, model, job_id, voice_id, priced, cost_usd, line_count)
    SELECT profile_id, (occurred_at AT TIME ZONE 'UTC')::date, provider, model, job_id,
           attributes ->> 'voice_id', priced, sum(cost_usd), count(*)
    FROM new_entries
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT (profile_id, day, provider, model, job_id, voice_id, priced) DO UPDATE
        SET cost_usd = rollup.cost_usd + EXCLUDED.cost_usd,
            line_count = rollup.line_count + EXCLUDED.line_count;
    RETURN NULL;
END
$$;

-- The rebuild, profile by profile: row-level security binds the schema's owner too, so each
-- profile's rows are rewritten under its own scope (the lines read under the operator's).
SELECT set_config('app.operator', 'on', true);
DO $$
DECLARE
    profile text;
BEGIN
    FOR profile IN SELECT DISTINCT profile_id FROM costs.daily_costs LOOP
        PERFORM set_config('app.profile_id', profile, true);
        DELETE FROM costs.daily_costs WHERE profile_id = profile;
        INSERT INTO costs.daily_costs
            (profile_id, day, provider, model, job_id, voice_id, priced, cost_usd, line_count)
        SELECT profile_id, (occurred_at AT TIME ZONE 'UTC')::date, provider, model, job_id,
               attributes ->> 'voice_id', priced, sum(cost_usd), count(*)
        FROM costs.entries WHERE profile_id = profile
        GROUP BY 1, 2, 3, 4, 5, 6, 7;
    END LOOP;
END
$$;

-- Recording in one statement, one round trip: each Costs process keeps the price catalog in
-- memory with its version, prices lines in Python with it, and names that version when it
-- records them (costs.record_priced). The lines are recorded only if the catalog is still at
-- that version; otherwise nothing is written, the statement fails with SQLSTATE SU205, and the
-- process reads the catalog again (costs.price_catalog) and prices again. Any change to a
-- price, an operator's SQL included, moves the version. costs.prices_for and
-- costs.record_lines stay for replicas of the version before during a rolling deploy.

CREATE TABLE costs.catalog_version (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version  bigint  NOT NULL
);
INSERT INTO costs.catalog_version (version) VALUES (1);
GRANT SELECT ON costs.catalog_version TO costs_service;

-- Whoever may change a price moves the version: the function runs as the schema's owner.
CREATE FUNCTION costs.catalog_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE costs.catalog_version SET version = version + 1;
    RETURN NULL;
END
$$;

-- Per row, so that the start-up load, which rewrites no row that did not change, moves
-- nothing.
CREATE TRIGGER catalog_row_changed AFTER INSERT OR UPDATE OR DELETE ON costs.prices
    FOR EACH ROW EXECUTE FUNCTION costs.catalog_changed();
CREATE TRIGGER catalog_truncated AFTER TRUNCATE ON costs.prices
    FOR EACH STATEMENT EXECUTE FUNCTION costs.catalog_changed();

-- The whole catalog and its version (one row with NULL prices when the catalog is empty).
CREATE FUNCTION costs.price_catalog(p_profile_id text)
RETURNS TABLE (
    version bigint, provider text, model text, usage_type text, unit text, per numeric,
    unit_price_usd numeric, prompt_tokens_over bigint, effective_from date, source text,
    checked_on date
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM costs.scope_to(p_profile_id);
    RETURN QUERY
    SELECT v.version, p.provider, p.model, p.usage_type, p.unit, p.per, p.unit_price_usd,
        p.prompt_tokens_over, p.effective_from, p.source, p.checked_on
    FROM costs.catalog_version AS v LEFT JOIN costs.prices AS p ON true;
END
$$;

-- costs.record_lines, if the catalog is still at the version the lines were priced with.
CREATE FUNCTION costs.record_priced(
    p_profile_id text, p_catalog_version bigint, p_batch text, p_whole_rows boolean,
    p_daily_start date, p_daily_end date, p_monthly_start date, p_monthly_end date
) RETURNS TABLE (
    entry_id uuid, request_id text, provider text, model text, job_id uuid,
    occurred_at timestamptz, recorded_at timestamptz, usage jsonb, cost_usd numeric,
    priced boolean, applied_prices jsonb, attributes jsonb, new boolean,
    crossed_period text, threshold integer, spent_usd numeric, limit_usd numeric
) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM costs.scope_to(p_profile_id);
    IF (SELECT v.version FROM costs.catalog_version AS v) <> p_catalog_version THEN
        RAISE EXCEPTION 'the price catalog changed since version %', p_catalog_version
            USING ERRCODE = 'SU205';
    END IF;
    RETURN QUERY SELECT * FROM costs.record_lines(p_profile_id, p_batch, p_whole_rows,
        p_daily_start, p_daily_end, p_monthly_start, p_monthly_end);
END
$$;

-- A row for every model or usage type ('*') is for a provider that charges nothing (a TTS
-- engine run locally): its lines are priced at zero rather than left unpriced. Only at zero:
-- units differ from model to model.
ALTER TABLE costs.prices ADD CONSTRAINT free_rows_cost_nothing
    CHECK ((model <> '*' AND usage_type <> '*') OR unit_price_usd = 0);

-- ListCostEntries by provider, by model, and of unpriced lines only: each filter walks an index
-- of its own newest first with LIMIT, instead of the profile's every line. profile_id leads, as
-- in every index. A filter by provider and model takes the model's index (a model name rarely
-- belongs to two providers); unpriced lines are few, so their index is partial and small.
-- IF NOT EXISTS: on a large table an operator may build it CONCURRENTLY by hand first.
CREATE INDEX IF NOT EXISTS entries_by_provider_newest_first
    ON costs.entries (profile_id, provider, occurred_at DESC, entry_id DESC);
CREATE INDEX IF NOT EXISTS entries_by_model_newest_first
    ON costs.entries (profile_id, model, occurred_at DESC, entry_id DESC);
CREATE INDEX IF NOT EXISTS entries_unpriced_newest_first
    ON costs.entries (profile_id, occurred_at DESC, entry_id DESC)
    WHERE NOT priced;

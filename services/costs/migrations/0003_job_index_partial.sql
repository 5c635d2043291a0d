-- Most lines are recorded without a job (metered SDK calls); they need no entry in the by-job
-- index, which saves an index write per line. A filter by job always names one, and the
-- partial index serves it.
DROP INDEX costs.entries_of_job_newest_first;
CREATE INDEX entries_of_job_newest_first
    ON costs.entries (profile_id, job_id, occurred_at DESC, entry_id DESC)
    WHERE job_id IS NOT NULL;

-- ListJobs by kind, with or without statuses: one range of this index per status, each newest
-- first with LIMIT, merged (jobs/store.py), so a page of a rare kind is an index range
-- scan instead of a walk through the profile's other jobs. profile_id leads, as in every index.
-- IF NOT EXISTS: on a large table an operator may build it CONCURRENTLY by hand first.
CREATE INDEX IF NOT EXISTS jobs_by_kind_status_newest_first
    ON jobs.jobs (profile_id, kind, status, create_time DESC, job_id DESC);

-- ListJobs by kind, with or without statuses: one range of this index per status, each newest
-- first with LIMIT, merged (JobStore.list_query), so a page of a rare kind is an index range
-- scan instead of a walk through the profile's other jobs. profile_id leads, as in every index.
CREATE INDEX jobs_by_kind_status_newest_first
    ON jobs.jobs (profile_id, kind, status, create_time DESC, job_id DESC);

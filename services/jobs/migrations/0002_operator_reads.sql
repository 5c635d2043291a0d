-- Cross-profile reads (ListAllJobs, operator scope): rows of every profile are visible, for
-- SELECT only, to a transaction that sets app.operator. Only TenantScopedPool's
-- cross_profile_transaction sets it, READ ONLY, and only inside an operator's call; writes
-- stay bound to jobs_of_current_profile.
CREATE POLICY jobs_operator_read ON jobs.jobs FOR SELECT
    USING (current_setting('app.operator', true) = 'on');

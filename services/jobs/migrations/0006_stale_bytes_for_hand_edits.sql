-- The service always writes a job's data and result together with their Struct bytes, so the
-- stale-bytes triggers of 0004 are for hand edits only: they skip the service's role, and an
-- UpdateJob of a large document no longer compares it, twice, with the one it replaces.
DROP TRIGGER drop_stale_data_pb ON jobs.jobs;
DROP TRIGGER drop_stale_result_pb ON jobs.jobs;

CREATE TRIGGER drop_stale_data_pb BEFORE UPDATE OF data ON jobs.jobs
    FOR EACH ROW WHEN (current_user <> 'jobs_service')
    EXECUTE FUNCTION jobs.drop_stale_data_pb();
CREATE TRIGGER drop_stale_result_pb BEFORE UPDATE OF result ON jobs.jobs
    FOR EACH ROW WHEN (current_user <> 'jobs_service')
    EXECUTE FUNCTION jobs.drop_stale_result_pb();

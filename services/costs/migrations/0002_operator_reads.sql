-- Cross-profile reads (GetAllProfilesCostSummary, operator scope): the lines and the rollup of
-- every profile are visible, for SELECT only, to a transaction that sets app.operator. Only
-- TenantScopedPool's cross_profile_transaction sets it, READ ONLY, inside an operator's call;
-- writes stay bound to the profile policies.
CREATE POLICY entries_operator_read ON costs.entries FOR SELECT
    USING (current_setting('app.operator', true) = 'on');
CREATE POLICY daily_costs_operator_read ON costs.daily_costs FOR SELECT
    USING (current_setting('app.operator', true) = 'on');

-- Cross-profile reads of the credentials, for `suitectl postiz reencrypt` (key rotation): rows
-- of every profile are visible, for SELECT only, to a transaction that sets app.operator. Only
-- TenantScopedPool's cross_profile_transaction sets it, READ ONLY, for an operator; each row
-- is then rewritten in a transaction of its own profile, under
-- postiz_credentials_of_current_profile.
CREATE POLICY postiz_credentials_operator_read ON publisher.postiz_credentials FOR SELECT
    USING (current_setting('app.operator', true) = 'on');

-- The publisher schema: each profile's Postiz credentials and its publications, visible only
-- to that profile.

-- The role queries run as. An operator may have made it already (deploy/sql/bootstrap.sql),
-- in which case the owner running this needs no CREATEROLE.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'publisher_service') THEN
        CREATE ROLE publisher_service NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN NULL;  -- made meanwhile by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA publisher TO publisher_service;

-- One Postiz organization per profile. The API key is stored only as AES-GCM ciphertext,
-- bound to the profile; encryption_key_id names the key that encrypted it (rotation).
CREATE TABLE publisher.postiz_credentials (
    profile_id          text        PRIMARY KEY
                        CHECK (profile_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    base_url            text        NOT NULL,
    api_key_ciphertext  bytea       NOT NULL,
    encryption_key_id   text        NOT NULL,
    api_key_fingerprint text        NOT NULL,
    verify_time         timestamptz NOT NULL,
    -- Postiz said (429, Retry-After or X-RateLimit-*) not to create posts before this time.
    rate_limited_until  timestamptz,
    create_time         timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time         timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per CreatePost request_id: what was asked and what came of it.
CREATE TABLE publisher.publications (
    profile_id     text        NOT NULL CHECK (profile_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    request_id     text        NOT NULL,
    job_id         text        NOT NULL DEFAULT '',
    -- The body sent to POST /posts, and a digest of the request, so a request_id reused for
    -- another post is refused.
    postiz_request jsonb       NOT NULL,
    request_digest text        NOT NULL,
    publish_time   timestamptz NOT NULL,
    state          text        NOT NULL DEFAULT 'PENDING'
                   CHECK (state IN ('PENDING', 'ACCEPTED', 'FAILED', 'OUTCOME_UNKNOWN')),
    posts          jsonb       NOT NULL DEFAULT '[]',
    error          text        NOT NULL DEFAULT '',
    create_time    timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (profile_id, request_id)
);

CREATE INDEX publications_by_job ON publisher.publications (profile_id, job_id)
    WHERE job_id <> '';

-- Every time a publication's post was sent to Postiz (or its outcome reconciled).
CREATE TABLE publisher.publication_attempts (
    profile_id  text        NOT NULL,
    request_id  text        NOT NULL,
    attempt     integer     NOT NULL,
    outcome     text        NOT NULL DEFAULT 'SENDING'
                CHECK (outcome IN ('SENDING', 'ACCEPTED', 'FAILED', 'OUTCOME_UNKNOWN')),
    error       text        NOT NULL DEFAULT '',
    start_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time    timestamptz,
    PRIMARY KEY (profile_id, request_id, attempt),
    FOREIGN KEY (profile_id, request_id)
        REFERENCES publisher.publications (profile_id, request_id) ON DELETE CASCADE
);

-- The profile's POST /posts budget counts its attempts of the last hour.
CREATE INDEX publication_attempts_by_start
    ON publisher.publication_attempts (profile_id, start_time);

ALTER TABLE publisher.postiz_credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE publisher.postiz_credentials FORCE ROW LEVEL SECURITY;
CREATE POLICY postiz_credentials_of_current_profile ON publisher.postiz_credentials
    USING (profile_id = NULLIF(current_setting('app.profile_id', true), ''))
    WITH CHECK (profile_id = NULLIF(current_setting('app.profile_id', true), ''));

ALTER TABLE publisher.publications ENABLE ROW LEVEL SECURITY;
ALTER TABLE publisher.publications FORCE ROW LEVEL SECURITY;
CREATE POLICY publications_of_current_profile ON publisher.publications
    USING (profile_id = NULLIF(current_setting('app.profile_id', true), ''))
    WITH CHECK (profile_id = NULLIF(current_setting('app.profile_id', true), ''));

ALTER TABLE publisher.publication_attempts ENABLE ROW LEVEL SECURITY;
ALTER TABLE publisher.publication_attempts FORCE ROW LEVEL SECURITY;
CREATE POLICY publication_attempts_of_current_profile ON publisher.publication_attempts
    USING (profile_id = NULLIF(current_setting('app.profile_id', true), ''))
    WITH CHECK (profile_id = NULLIF(current_setting('app.profile_id', true), ''));

GRANT SELECT, INSERT, UPDATE, DELETE ON publisher.postiz_credentials TO publisher_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON publisher.publications TO publisher_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON publisher.publication_attempts TO publisher_service;

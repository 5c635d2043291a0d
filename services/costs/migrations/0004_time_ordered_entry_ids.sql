-- New lines get time-ordered ids (UUID version 7, RFC 9562): the millisecond they were
-- recorded, then 74 random bits. A batch's keys then land together at the end of the
-- profile's range in the primary key index, where random (version 4) ids dirtied a leaf page
-- apiece all over it. Ids stay unguessable, and older lines keep theirs. PostgreSQL 18 has
-- uuidv7() built in; this is the same layout for older servers.
CREATE FUNCTION costs.uuidv7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        -- Bits 52 and 53 turn version 4 (0100) into version 7 (0111); the variant is kept.
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                PLACING substring(
                    int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                    FROM 3)
                FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

GRANT EXECUTE ON FUNCTION costs.uuidv7() TO costs_service;

ALTER TABLE costs.entries ALTER COLUMN entry_id SET DEFAULT costs.uuidv7();

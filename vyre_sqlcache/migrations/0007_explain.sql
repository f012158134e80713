-- vyre-sqlcache schema 7 (issue 15, part 4): why did this miss?
--
-- `departures` keeps the newest entries that left the cache, with the reason they
-- left: evicted by the size cap or a full disk, invalidated (`invalidate_impacted`),
-- deleted (`delete`, `delete_entries`), or damaged and dropped (a checksum that failed
-- on read, or `check --repair`). Each row copies the entry's key columns, so that an
-- entry can be explained after its row is gone. `misses` is the optional miss log
-- (`VYRE_SQLCACHE_LOG_MISSES=1`): the lookups that missed, with what was asked for.
--
-- Both tables are bounded: the statement that adds rows deletes those more than the
-- newest 10,000 back (by `seq`, in the same transaction), so neither grows with
-- the cache's age. Neither is read by a lookup.

CREATE TABLE departures (
    seq                INTEGER PRIMARY KEY,  -- order of departure (newest: largest)
    id                 INTEGER NOT NULL,     -- = entries.id of the entry that left
    entry_key          BLOB NOT NULL CHECK (length(entry_key) = 32),
    -- the entry's key columns as they were (NULL where the entry had none)
    key_version        INTEGER,
    shader_hash        BLOB,
    layout_hash        BLOB,
    push_constant_size INTEGER,
    workgroup_x        INTEGER,
    workgroup_y        INTEGER,
    workgroup_z        INTEGER,
    feature_flags      INTEGER,
    backend            TEXT,
    vendor             INTEGER,
    device             INTEGER,
    driver_digest      BLOB,
    program_digest     BLOB,
    blob_size          INTEGER,
    created_ms         INTEGER,
    reason             TEXT NOT NULL
        CHECK (reason IN ('evicted', 'invalidated', 'deleted', 'damaged')),
    at_ms              INTEGER NOT NULL  -- when it left, milliseconds since the epoch, UTC
) STRICT;

-- `explain` looks an entry up by its row id.
CREATE INDEX departures_id ON departures (id);

CREATE TABLE misses (
    seq                INTEGER PRIMARY KEY,  -- order of the misses (newest: largest)
    at_ms              INTEGER NOT NULL,
    -- the call that missed: 'get' and 'get_many' ask by PipelineCacheKey, 'read' by
    -- program digest
    call               TEXT NOT NULL CHECK (call IN ('get', 'get_many', 'read')),
    entry_key          BLOB NOT NULL CHECK (length(entry_key) = 32),
    pid                INTEGER NOT NULL,     -- the process that missed
    -- what was asked for (the key columns are NULL for 'read')
    key_version        INTEGER,
    shader_hash        BLOB,
    layout_hash        BLOB,
    push_constant_size INTEGER,
    workgroup_x        INTEGER,
    workgroup_y        INTEGER,
    workgroup_z        INTEGER,
    feature_flags      INTEGER,
    backend            TEXT,
    vendor             INTEGER NOT NULL,
    device             INTEGER NOT NULL,
    driver_digest      BLOB NOT NULL CHECK (length(driver_digest) = 32),
    program_digest     BLOB
) STRICT;

-- No index: a row is written per miss, and `explain_entry` scans at most 10,000 rows.

-- departures_v and misses_v: the two tables for people, in the style of pipelines_v
-- (hashes in lowercase hex, times in ISO-8601 UTC, workgroup as 'XxYxZ'), newest
-- first by `seq`. Plain SQL that SQLite 3.40 understands.
CREATE VIEW departures_v AS
SELECT
    seq,
    lower(hex(entry_key)) AS entry_key,
    reason,
    strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') AS at,
    CASE
        WHEN key_version IS NOT NULL THEN 'keyed'
        WHEN vendor IS NOT NULL THEN 'program'
        ELSE 'imported'
    END AS kind,
    backend,
    CASE WHEN vendor IS NOT NULL THEN printf('0x%04x', vendor) END AS vendor_hex,
    CASE WHEN device IS NOT NULL THEN printf('0x%04x', device) END AS device_hex,
    feature_flags AS feature_bits,
    CASE WHEN workgroup_x IS NOT NULL
        THEN workgroup_x || 'x' || workgroup_y || 'x' || workgroup_z END AS workgroup,
    push_constant_size,
    key_version,
    CASE WHEN shader_hash IS NOT NULL THEN lower(hex(shader_hash)) END AS shader_hash,
    CASE WHEN layout_hash IS NOT NULL THEN lower(hex(layout_hash)) END AS layout_hash,
    CASE WHEN driver_digest IS NOT NULL THEN lower(hex(driver_digest)) END AS driver_digest,
    CASE WHEN program_digest IS NOT NULL THEN lower(hex(program_digest)) END AS program_digest,
    blob_size,
    CASE WHEN created_ms IS NOT NULL
        THEN strftime('%Y-%m-%dT%H:%M:%fZ', created_ms / 1000.0, 'unixepoch') END AS created,
    at_ms
FROM departures;

CREATE VIEW misses_v AS
SELECT
    seq,
    strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') AS at,
    call,
    lower(hex(entry_key)) AS entry_key,
    pid,
    backend,
    printf('0x%04x', vendor) AS vendor_hex,
    printf('0x%04x', device) AS device_hex,
    feature_flags AS feature_bits,
    CASE WHEN workgroup_x IS NOT NULL
        THEN workgroup_x || 'x' || workgroup_y || 'x' || workgroup_z END AS workgroup,
    push_constant_size,
    key_version,
    CASE WHEN shader_hash IS NOT NULL THEN lower(hex(shader_hash)) END AS shader_hash,
    CASE WHEN layout_hash IS NOT NULL THEN lower(hex(layout_hash)) END AS layout_hash,
    lower(hex(driver_digest)) AS driver_digest,
    CASE WHEN program_digest IS NOT NULL THEN lower(hex(program_digest)) END AS program_digest,
    at_ms
FROM misses;

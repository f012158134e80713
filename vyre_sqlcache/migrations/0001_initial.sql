-- vyre-sqlcache schema 1: pipeline metadata, blobs, and cache-wide counters.
--
-- `entries.id` is the first 8 bytes of `entry_key` read as a big-endian signed
-- int64, so a read is one rowid lookup in `blobs` with no index in between.
-- Two keys that share those 8 bytes cannot both be cached: the later write
-- replaces the earlier entry (about n^2 / 2^65 odds for n entries).
--
-- Metadata and blob bytes live in separate tables so that scans of metadata
-- (inspection, eviction, invalidation) never read blob pages.

CREATE TABLE entries (
    id                 INTEGER PRIMARY KEY,
    -- the 32-byte identity a lookup computes: BLAKE3 of the key and fingerprint
    entry_key          BLOB NOT NULL CHECK (length(entry_key) = 32),
    -- PipelineCacheKey fields; NULL for entries written by program digest
    -- (`write`) or imported from a vyre directory, which know only their key
    key_version        INTEGER CHECK (key_version BETWEEN 0 AND 4294967295),
    shader_hash        BLOB CHECK (length(shader_hash) = 32),
    layout_hash        BLOB CHECK (length(layout_hash) = 32),
    push_constant_size INTEGER CHECK (push_constant_size BETWEEN 0 AND 4294967295),
    workgroup_x        INTEGER CHECK (workgroup_x BETWEEN 0 AND 4294967295),
    workgroup_y        INTEGER CHECK (workgroup_y BETWEEN 0 AND 4294967295),
    workgroup_z        INTEGER CHECK (workgroup_z BETWEEN 0 AND 4294967295),
    feature_flags      INTEGER CHECK (feature_flags BETWEEN 0 AND 4294967295),
    backend            TEXT CHECK (length(backend) > 0),
    -- DeviceFingerprint; NULL only for imported entries
    vendor             INTEGER CHECK (vendor BETWEEN 0 AND 4294967295),
    device             INTEGER CHECK (device BETWEEN 0 AND 4294967295),
    driver_digest      BLOB CHECK (length(driver_digest) = 32),
    -- vyre's normalized program digest, so invalidate_impacted reaches the entry
    program_digest     BLOB CHECK (length(program_digest) = 32),
    blob_size          INTEGER NOT NULL CHECK (blob_size BETWEEN 0 AND 67108864),
    -- times are milliseconds since the Unix epoch, UTC
    created_ms         INTEGER NOT NULL,
    accessed_ms        INTEGER NOT NULL,
    hits               INTEGER NOT NULL DEFAULT 0 CHECK (hits >= 0)
) STRICT;

-- Indexes cost a written page per insert, so only the ones writes need:
-- eviction walks `entries_lru` from the oldest access; invalidation finds keyed
-- entries by program (entries written by digest are found by their row id).
-- Inspection scans `entries`, which holds no blob bytes.
CREATE INDEX entries_lru ON entries (accessed_ms);
CREATE INDEX entries_program ON entries (program_digest, vendor, device)
    WHERE key_version IS NOT NULL AND program_digest IS NOT NULL;

CREATE TABLE blobs (
    id            INTEGER PRIMARY KEY,  -- = entries.id
    -- checksum of entry_key || data, so bytes filed under the wrong key fail too
    checksum_algo TEXT NOT NULL CHECK (checksum_algo IN ('xxh3-128', 'blake3')),
    checksum      BLOB NOT NULL,
    data          BLOB NOT NULL CHECK (length(data) <= 67108864)
) STRICT;

-- A blob lives exactly as long as its entry, whatever deletes the entry
-- (our code, or a person in the sqlite3 shell).
CREATE TRIGGER entries_delete_blob AFTER DELETE ON entries
BEGIN
    DELETE FROM blobs WHERE id = old.id;
END;

-- Cache-wide totals and counters, one row each. `entries` and `blob_bytes` are
-- kept by the triggers below, so the size cap is checked without a scan.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO meta (name, value) VALUES
    ('entries', 0),
    ('blob_bytes', 0),
    ('flushes', 0),
    ('hits', 0),
    ('misses', 0),
    ('evictions', 0),
    ('checksum_failures', 0);

CREATE TRIGGER entries_count_insert AFTER INSERT ON entries
BEGIN
    UPDATE meta SET value = value + 1 WHERE name = 'entries';
    UPDATE meta SET value = value + new.blob_size WHERE name = 'blob_bytes';
END;

CREATE TRIGGER entries_count_delete AFTER DELETE ON entries
BEGIN
    UPDATE meta SET value = value - 1 WHERE name = 'entries';
    UPDATE meta SET value = value - old.blob_size WHERE name = 'blob_bytes';
END;

CREATE TRIGGER entries_count_resize AFTER UPDATE OF blob_size ON entries
BEGIN
    UPDATE meta SET value = value - old.blob_size + new.blob_size WHERE name = 'blob_bytes';
END;

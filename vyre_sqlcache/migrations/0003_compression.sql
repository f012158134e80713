-- vyre-sqlcache schema 3: compressed blobs and trained dictionaries.
--
-- A blob is stored raw or as one zstd frame (`blobs.codec`), alone or with a
-- dictionary trained on earlier entries of the same backend and device
-- (`blobs.dict_id`). `entries.blob_size` stays the size the caller wrote and
-- reads back; `entries.stored_size` is what the blob takes in the file, and the
-- size cap counts that. The checksum still covers the entry key and the
-- caller's bytes, so it is checked after decompression.

-- NULL: raw bytes. 'zstd': one zstd frame of `raw_size` bytes once decompressed
-- (without a content size, checksum or dictionary id of its own: the row holds them).
ALTER TABLE blobs ADD COLUMN codec TEXT CHECK (codec IN ('zstd'));
-- the dictionary the frame needs, if any (see `dictionaries` below)
ALTER TABLE blobs ADD COLUMN dict_id INTEGER CHECK (dict_id IS NULL OR codec IS NOT NULL);
-- the decompressed size, which bounds decompression; NULL exactly when raw
ALTER TABLE blobs ADD COLUMN raw_size INTEGER CHECK (
    (raw_size IS NULL) = (codec IS NULL)
    AND (raw_size IS NULL OR raw_size BETWEEN 0 AND 67108864)
);

-- the bytes the blob takes in `blobs.data` (= blob_size when stored raw)
ALTER TABLE entries ADD COLUMN stored_size INTEGER NOT NULL DEFAULT 0
    CHECK (stored_size BETWEEN 0 AND 67108864);
UPDATE entries SET stored_size = blob_size;

-- `stored_bytes` (the sum of stored_size) is kept by triggers, as `blob_bytes` is;
-- `dictionary_bytes` by the triggers on `dictionaries`. The cap counts both.
INSERT INTO meta (name, value)
    SELECT 'stored_bytes', coalesce(sum(stored_size), 0) FROM entries;
INSERT INTO meta (name, value) VALUES ('dictionary_bytes', 0);

CREATE TRIGGER entries_stored_insert AFTER INSERT ON entries
BEGIN
    UPDATE meta SET value = value + new.stored_size WHERE name = 'stored_bytes';
END;

CREATE TRIGGER entries_stored_delete AFTER DELETE ON entries
BEGIN
    UPDATE meta SET value = value - old.stored_size WHERE name = 'stored_bytes';
END;

CREATE TRIGGER entries_stored_resize AFTER UPDATE OF stored_size ON entries
BEGIN
    UPDATE meta SET value = value - old.stored_size + new.stored_size
        WHERE name = 'stored_bytes';
END;

-- zstd dictionaries, each trained on a sample of one scope's entries: a backend on a
-- device (NULL columns: entries written without a key, or imported). Ids are never
-- reused, so a process may keep a dictionary it loaded. The checksum covers the id
-- and the bytes. A dictionary is never deleted while a blob uses it (trigger below).
CREATE TABLE dictionaries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    backend       TEXT,
    vendor        INTEGER,
    device        INTEGER,
    checksum_algo TEXT NOT NULL CHECK (checksum_algo IN ('xxh3-128', 'blake3')),
    checksum      BLOB NOT NULL,
    data          BLOB NOT NULL CHECK (length(data) BETWEEN 8 AND 1048576),
    -- how many entries, of how many bytes, it was trained on
    samples       INTEGER NOT NULL CHECK (samples >= 0),
    sample_bytes  INTEGER NOT NULL CHECK (sample_bytes >= 0),
    created_ms    INTEGER NOT NULL
) STRICT;

CREATE TRIGGER dictionaries_count_insert AFTER INSERT ON dictionaries
BEGIN
    UPDATE meta SET value = value + length(new.data) WHERE name = 'dictionary_bytes';
END;

CREATE TRIGGER dictionaries_count_delete AFTER DELETE ON dictionaries
BEGIN
    UPDATE meta SET value = value - length(old.data) WHERE name = 'dictionary_bytes';
END;

-- Whoever deletes (our code, or a person in the sqlite3 shell), a dictionary in use
-- stays; a blob cannot name a dictionary that is not there.
CREATE TRIGGER dictionaries_keep_used BEFORE DELETE ON dictionaries
WHEN EXISTS (SELECT 1 FROM blobs WHERE dict_id = old.id)
BEGIN
    SELECT RAISE(ABORT, 'the dictionary is used by stored blobs');
END;

CREATE TRIGGER dictionaries_keep_id BEFORE UPDATE OF id ON dictionaries
WHEN EXISTS (SELECT 1 FROM blobs WHERE dict_id = old.id)
BEGIN
    SELECT RAISE(ABORT, 'the dictionary is used by stored blobs');
END;

CREATE TRIGGER blobs_dictionary_insert BEFORE INSERT ON blobs
WHEN new.dict_id IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM dictionaries WHERE id = new.dict_id)
BEGIN
    SELECT RAISE(ABORT, 'no such dictionary');
END;

CREATE TRIGGER blobs_dictionary_update BEFORE UPDATE OF dict_id ON blobs
WHEN new.dict_id IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM dictionaries WHERE id = new.dict_id)
BEGIN
    SELECT RAISE(ABORT, 'no such dictionary');
END;

-- The views gain the stored size and the compression ratio (blob_size over
-- stored_size). As in schema 2, plain SQL that SQLite 3.40 understands, reading
-- `entries` only.
DROP VIEW pipelines_v;
DROP VIEW stats_v;

CREATE VIEW pipelines_v AS
SELECT
    lower(hex(entry_key)) AS entry_key,
    CASE
        WHEN key_version IS NOT NULL THEN 'keyed'
        WHEN vendor IS NOT NULL THEN 'program'
        ELSE 'imported'
    END AS kind,
    backend,
    vendor,
    device,
    CASE WHEN vendor IS NOT NULL THEN printf('0x%04x', vendor) END AS vendor_hex,
    CASE WHEN device IS NOT NULL THEN printf('0x%04x', device) END AS device_hex,
    CASE WHEN feature_flags IS NOT NULL THEN substr(
        CASE WHEN feature_flags & 1 THEN ',SUBGROUP_OPS' ELSE '' END
        || CASE WHEN feature_flags & 2 THEN ',F16' ELSE '' END
        || CASE WHEN feature_flags & 4 THEN ',BF16' ELSE '' END
        || CASE WHEN feature_flags & 8 THEN ',TENSOR_CORES' ELSE '' END
        || CASE WHEN feature_flags & 16 THEN ',ASYNC_COMPUTE' ELSE '' END
        || CASE WHEN feature_flags & 32 THEN ',PUSH_CONSTANTS' ELSE '' END
        || CASE WHEN feature_flags & 64 THEN ',INDIRECT_DISPATCH' ELSE '' END
        || CASE WHEN feature_flags & 128 THEN ',SPECULATIVE' ELSE '' END
        || CASE WHEN feature_flags & 256 THEN ',PERSISTENT_THREAD' ELSE '' END
        || CASE WHEN feature_flags & ~511 THEN printf(',0x%x', feature_flags & ~511) ELSE '' END,
        2) END AS feature_flags,
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
    strftime('%Y-%m-%dT%H:%M:%fZ', created_ms / 1000.0, 'unixepoch') AS created,
    strftime('%Y-%m-%dT%H:%M:%fZ', accessed_ms / 1000.0, 'unixepoch') AS accessed,
    hits,
    created_ms,
    accessed_ms,
    stored_size,
    CASE WHEN stored_size > 0 THEN round(1.0 * blob_size / stored_size, 2) ELSE 1.0 END AS ratio
FROM entries;

CREATE VIEW stats_v AS
SELECT
    backend,
    vendor,
    device,
    CASE WHEN vendor IS NOT NULL THEN printf('0x%04x', vendor) END AS vendor_hex,
    CASE WHEN device IS NOT NULL THEN printf('0x%04x', device) END AS device_hex,
    count(*) AS entries,
    sum(blob_size) AS bytes,
    sum(hits) AS hits,
    strftime('%Y-%m-%dT%H:%M:%fZ', max(accessed_ms) / 1000.0, 'unixepoch') AS last_accessed,
    sum(stored_size) AS stored_bytes,
    CASE WHEN sum(stored_size) > 0 THEN round(1.0 * sum(blob_size) / sum(stored_size), 2)
        ELSE 1.0 END AS ratio
FROM entries
GROUP BY backend, vendor, device;

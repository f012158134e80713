-- vyre-sqlcache schema 4: invalidation and deletion by tombstone.
--
-- `invalidate_impacted` and `delete*` only insert the row ids of the entries they
-- reach into `tombstones`, in one short transaction; a background purge deletes the
-- entries (and, by trigger, their blobs) later, a few hundred to a transaction.
-- A tombstoned entry is never served: reads, `contains`, eviction and the views skip
-- ids in `tombstones`. A write of the same key deletes its tombstone first.
--
-- The `meta` totals count live entries only: a tombstone takes its entry out of
-- `entries`, `blob_bytes` and `stored_bytes` when inserted, and puts it back when
-- deleted while its entry is still there (a write of the same key). The triggers on
-- `entries` leave the totals alone for a tombstoned row, so the purge (delete the
-- entry, then its tombstone) changes no total.

CREATE TABLE tombstones (
    id INTEGER PRIMARY KEY  -- = entries.id of an entry invalidated or deleted, not yet purged
) STRICT;

CREATE TRIGGER tombstones_insert AFTER INSERT ON tombstones
WHEN EXISTS (SELECT 1 FROM entries WHERE id = new.id)
BEGIN
    UPDATE meta SET value = value - 1 WHERE name = 'entries';
    UPDATE meta SET value = value - (SELECT blob_size FROM entries WHERE id = new.id)
        WHERE name = 'blob_bytes';
    UPDATE meta SET value = value - (SELECT stored_size FROM entries WHERE id = new.id)
        WHERE name = 'stored_bytes';
END;

CREATE TRIGGER tombstones_delete AFTER DELETE ON tombstones
WHEN EXISTS (SELECT 1 FROM entries WHERE id = old.id)
BEGIN
    UPDATE meta SET value = value + 1 WHERE name = 'entries';
    UPDATE meta SET value = value + (SELECT blob_size FROM entries WHERE id = old.id)
        WHERE name = 'blob_bytes';
    UPDATE meta SET value = value + (SELECT stored_size FROM entries WHERE id = old.id)
        WHERE name = 'stored_bytes';
END;

-- The totals triggers of schemas 1 and 3, for live rows only.
DROP TRIGGER entries_count_insert;
DROP TRIGGER entries_count_delete;
DROP TRIGGER entries_count_resize;
DROP TRIGGER entries_stored_insert;
DROP TRIGGER entries_stored_delete;
DROP TRIGGER entries_stored_resize;

CREATE TRIGGER entries_count_insert AFTER INSERT ON entries
WHEN NOT EXISTS (SELECT 1 FROM tombstones WHERE id = new.id)
BEGIN
    UPDATE meta SET value = value + 1 WHERE name = 'entries';
    UPDATE meta SET value = value + new.blob_size WHERE name = 'blob_bytes';
    UPDATE meta SET value = value + new.stored_size WHERE name = 'stored_bytes';
END;

CREATE TRIGGER entries_count_delete AFTER DELETE ON entries
WHEN NOT EXISTS (SELECT 1 FROM tombstones WHERE id = old.id)
BEGIN
    UPDATE meta SET value = value - 1 WHERE name = 'entries';
    UPDATE meta SET value = value - old.blob_size WHERE name = 'blob_bytes';
    UPDATE meta SET value = value - old.stored_size WHERE name = 'stored_bytes';
END;

CREATE TRIGGER entries_count_resize AFTER UPDATE OF blob_size, stored_size ON entries
WHEN NOT EXISTS (SELECT 1 FROM tombstones WHERE id = old.id)
BEGIN
    UPDATE meta SET value = value - old.blob_size + new.blob_size WHERE name = 'blob_bytes';
    UPDATE meta SET value = value - old.stored_size + new.stored_size
        WHERE name = 'stored_bytes';
END;

-- The views of schema 3, over live entries only.
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
FROM entries
WHERE id NOT IN (SELECT id FROM tombstones);

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
WHERE id NOT IN (SELECT id FROM tombstones)
GROUP BY backend, vendor, device;

-- vyre-sqlcache schema 2: views for people, in the sqlite3 shell or any SQLite tool.
--
-- Plain SQL that SQLite 3.40 understands (hex, printf, strftime), no functions of
-- ours, so the views work in the stock `sqlite3` shell and Python's `sqlite3`.
-- They read metadata only (`entries`), never the `blobs` table.
--
-- pipelines_v: one row an entry, hashes in lowercase hex, times in ISO-8601 UTC.
--   kind           'keyed' (stored by PipelineCacheKey), 'program' (stored by program
--                  digest with `write`) or 'imported' (from a vyre directory: only
--                  the entry key is known, every other key column is NULL)
--   feature_flags  vyre's flag names, comma-separated; unknown bits as one hex
--                  number at the end, e.g. 'F16,0x100000'; '' for none
--   feature_bits   the same flags as an integer, for bit tests
--   workgroup      'XxYxZ', e.g. '64x1x1'
--   vendor_hex, device_hex   the PCI ids as hex, e.g. '0x10de'
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
    accessed_ms
FROM entries;

-- stats_v: totals per backend and device (NULL backend: entries stored by program
-- digest or imported; NULL vendor and device: imported entries).
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
    strftime('%Y-%m-%dT%H:%M:%fZ', max(accessed_ms) / 1000.0, 'unixepoch') AS last_accessed
FROM entries
GROUP BY backend, vendor, device;

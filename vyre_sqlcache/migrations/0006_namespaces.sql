-- vyre-sqlcache schema 6: named entries, for compilers whose keys are names.
--
-- `PipelineCache.put_named` / `put_group` store a blob under a (namespace, name)
-- pair, e.g. ('triton', '<kernel hash>/__grp__<kernel>.json'); the entry key is a
-- BLAKE3 of both (keys.named_entry_key). Such an entry has no pipeline key columns
-- and no device: its `backend` is its namespace, so the totals per backend
-- (`stats_v`), `ls --backend`, `invalidate --backend` and the compression
-- dictionaries (trained per backend and device) treat each namespace as one
-- compiler. Both columns are NULL for every other entry.

ALTER TABLE entries ADD COLUMN namespace TEXT CHECK (
    namespace IS NULL OR (length(namespace) BETWEEN 1 AND 64 AND namespace = backend)
);
ALTER TABLE entries ADD COLUMN name TEXT CHECK (
    (name IS NULL) = (namespace IS NULL) AND (name IS NULL OR length(name) BETWEEN 1 AND 1024)
);

-- The views of schema 4 with kind 'named' and the two columns.
DROP VIEW pipelines_v;
DROP VIEW stats_v;

CREATE VIEW pipelines_v AS
SELECT
    lower(hex(entry_key)) AS entry_key,
    CASE
        WHEN namespace IS NOT NULL THEN 'named'
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
    CASE WHEN stored_size > 0 THEN round(1.0 * blob_size / stored_size, 2) ELSE 1.0 END AS ratio,
    namespace,
    name
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

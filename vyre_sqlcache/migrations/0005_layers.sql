-- vyre-sqlcache schema 5: read-only layers.
--
-- A user's cache may read through read-only layers (files made by `vyre-sqlcache
-- bundle`, shipped with an application). Layers are never written, so what
-- `invalidate_impacted` and `delete*` reach in a layer is recorded here, in the
-- user's file: a layer entry whose key and checksum match a row of `layer_masks` is
-- never served to this user. The checksum covers the entry key and the bytes, so a
-- layer shipped later with other bytes under that key is served again, and the stale
-- bytes stay masked even after the user's own new entry for the key is evicted.
--
-- A write of the same key with the same bytes (a deterministic recompile) proves the
-- layer's copy good: the trigger on `blobs` clears that mask.
--
-- A layer file itself is marked by the meta row 'setting:layer' = 1 (bundle writes
-- it); such a file is refused as a user cache for writing.

CREATE TABLE layer_masks (
    entry_key BLOB NOT NULL CHECK (length(entry_key) = 32),
    checksum  BLOB NOT NULL,
    masked_ms INTEGER NOT NULL,
    PRIMARY KEY (entry_key, checksum)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER layer_masks_unmask AFTER INSERT ON blobs
BEGIN
    DELETE FROM layer_masks WHERE checksum = new.checksum
        AND entry_key = (SELECT entry_key FROM entries WHERE id = new.id);
END;

CREATE TRIGGER layer_masks_unmask_update AFTER UPDATE OF checksum ON blobs
BEGIN
    DELETE FROM layer_masks WHERE checksum = new.checksum
        AND entry_key = (SELECT entry_key FROM entries WHERE id = new.id);
END;

-- layer_masks_v: the layer entries this user's invalidations and deletes hide.
CREATE VIEW layer_masks_v AS
SELECT
    lower(hex(entry_key)) AS entry_key,
    lower(hex(checksum)) AS checksum,
    strftime('%Y-%m-%dT%H:%M:%fZ', masked_ms / 1000.0, 'unixepoch') AS masked,
    masked_ms
FROM layer_masks;

-- info_v: the file's settings (the size cap, whether it is a layer) by name.
CREATE VIEW info_v AS
SELECT substr(name, 9) AS setting, value
FROM meta
WHERE name LIKE 'setting:%';

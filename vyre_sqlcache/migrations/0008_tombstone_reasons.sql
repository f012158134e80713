-- vyre-sqlcache schema 8: why and when each entry was tombstoned, beside its tombstone.
--
-- Schema 7 copied each invalidated or deleted entry's key columns into `departures`
-- inside the caller's transaction: a fifth of what an `invalidate_impacted` of 100
-- entries cost. Now that transaction only notes the reason and time here, and the row
-- is copied into `departures` by whatever removes the tombstone while the entry is still
-- there: the purge, before it deletes the entry, or a write of the same key, before it
-- replaces it. Until then `explain` finds the departure here; `departures_v` shows it
-- once copied (the purge runs within a second, or when the next writer opens the file).
--
-- A table of its own rather than columns of `tombstones`, so that a process of schema 7
-- that has the file open when it is migrated goes on tombstoning (`INSERT INTO
-- tombstones SELECT id ...`, recording its departures at once); its deletes of
-- tombstones take their reasons with them, by the trigger below.

CREATE TABLE tombstone_reasons (
    id     INTEGER PRIMARY KEY,  -- = tombstones.id
    reason TEXT NOT NULL CHECK (reason IN ('invalidated', 'deleted', 'damaged')),
    at_ms  INTEGER NOT NULL      -- when, milliseconds since the epoch, UTC
) STRICT;

CREATE TRIGGER tombstones_forget_reason AFTER DELETE ON tombstones
BEGIN
    DELETE FROM tombstone_reasons WHERE id = old.id;
END;

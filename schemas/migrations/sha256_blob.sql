-- Migration (issue 14, insert speed): `items` keeps each content address as
-- a 32-byte BLOB, `sha256_bin`, which carries the uniqueness (the index
-- `items_sha256`), and `sha256` becomes a VIRTUAL generated column,
-- `lower(hex(sha256_bin))`: every reader (`SELECT sha256`, `inspect --sql`,
-- exports, `sqlite3 manifest.sqlite`) still sees the same lowercase hex in
-- the same column position, while the table row is 32 bytes and the index
-- key 64 → 32 bytes smaller. Writers insert `sha256_bin` (a generated column
-- cannot be written) and look items up with `WHERE sha256_bin = ?` (a
-- `WHERE sha256 = ?` still works but scans).
-- Why: with half-size keys, and rows inserted in key order
-- (`manifest::insert_items_bulk`), building the unique index over
-- 1,000,000 rows costs about a third of what it did on hex text
-- (benches/curation.rs, README "Curation").
-- How: SQLite's table-rebuild procedure, as in check_constraints.sql
-- (foreign keys off around it; `PRAGMA foreign_key_check` before commit).
-- `unhex` turns the stored hex back into bytes; a value that is not hex
-- would become NULL and fail NOT NULL, rolling the migration back.

CREATE TABLE items_rebuilt (
    id            INTEGER PRIMARY KEY,
    sha256        TEXT    GENERATED ALWAYS AS (lower(hex(sha256_bin))) VIRTUAL,
    path          TEXT,
    source        TEXT    NOT NULL,
    width         INTEGER,
    height        INTEGER,
    format        TEXT,
    status        TEXT    NOT NULL CHECK (status = 'ok' OR status = 'rejected' OR status = 'duplicate'),
    reason        TEXT,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    status_run_id INTEGER NOT NULL REFERENCES runs(id),
    created_at    TEXT    NOT NULL,
    sha256_bin    BLOB    NOT NULL
);
INSERT INTO items_rebuilt (id, sha256_bin, path, source, width, height, format, status, reason, run_id, status_run_id, created_at)
    SELECT id, unhex(sha256), path, source, width, height, format, status, reason, run_id, status_run_id, created_at FROM items;
DROP TABLE items;
ALTER TABLE items_rebuilt RENAME TO items;
CREATE UNIQUE INDEX items_sha256 ON items(sha256_bin);
CREATE INDEX items_status ON items(status, reason);

-- Migration (issue 14): `items` and `duplicates` with their CHECK constraints
-- written as OR-ed equalities instead of `IN (...)` lists, and the
-- uniqueness of `items.sha256` as a named index (`items_sha256`) instead of
-- an inline UNIQUE. The allowed values and the uniqueness are unchanged:
--   items.status     'ok' | 'rejected' | 'duplicate'
--   duplicates.kind  'keeper' | 'exact' | 'near'
-- Why: SQLite evaluates a CHECK with a 3-value IN list by building an
-- ephemeral index for every row it checks (OpenEphemeral in EXPLAIN), which
-- made a 1,000,000-row insert about 1.4x slower (benches/curation.rs); a
-- named index can be dropped and rebuilt around a bulk insert
-- (`manifest::ItemInserter::bulk`), an inline UNIQUE cannot.
-- How: SQLite's table-rebuild procedure (create, copy, drop, rename,
-- re-index); the migration runner turns foreign keys off around it and runs
-- `PRAGMA foreign_key_check` before committing. Column lists are explicit,
-- so a later migration that adds a column to these tables must come after
-- this one.

CREATE TABLE items_rebuilt (
    id            INTEGER PRIMARY KEY,
    sha256        TEXT    NOT NULL,
    path          TEXT,
    source        TEXT    NOT NULL,
    width         INTEGER,
    height        INTEGER,
    format        TEXT,
    status        TEXT    NOT NULL CHECK (status = 'ok' OR status = 'rejected' OR status = 'duplicate'),
    reason        TEXT,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    status_run_id INTEGER NOT NULL REFERENCES runs(id),
    created_at    TEXT    NOT NULL
);
INSERT INTO items_rebuilt (id, sha256, path, source, width, height, format, status, reason, run_id, status_run_id, created_at)
    SELECT id, sha256, path, source, width, height, format, status, reason, run_id, status_run_id, created_at FROM items;
DROP TABLE items;
ALTER TABLE items_rebuilt RENAME TO items;
CREATE UNIQUE INDEX items_sha256 ON items(sha256);
CREATE INDEX items_status ON items(status, reason);

CREATE TABLE duplicates_rebuilt (
    item_id    INTEGER PRIMARY KEY REFERENCES items(id),
    cluster_id INTEGER NOT NULL,
    keeper_id  INTEGER NOT NULL REFERENCES items(id),
    distance   INTEGER NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind = 'keeper' OR kind = 'exact' OR kind = 'near'),
    run_id     INTEGER NOT NULL REFERENCES runs(id)
);
INSERT INTO duplicates_rebuilt (item_id, cluster_id, keeper_id, distance, kind, run_id)
    SELECT item_id, cluster_id, keeper_id, distance, kind, run_id FROM duplicates;
DROP TABLE duplicates;
ALTER TABLE duplicates_rebuilt RENAME TO duplicates;
CREATE INDEX duplicates_cluster ON duplicates(cluster_id);

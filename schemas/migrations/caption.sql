-- Captioning (`eps2v caption`): one row per item a WD tagger has seen; see
-- the MIGRATIONS docs in src/manifest/mod.rs.
CREATE TABLE tagging (
    item_id      INTEGER PRIMARY KEY REFERENCES items(id),
    tagger       TEXT    NOT NULL,
    settings     TEXT    NOT NULL,
    rating       TEXT,
    rating_score REAL,
    ratings_json TEXT    NOT NULL DEFAULT '{}',
    tags_json    TEXT    NOT NULL DEFAULT '[]',
    alignment    REAL,
    checked      INTEGER NOT NULL DEFAULT 0,
    confirmed    INTEGER NOT NULL DEFAULT 0,
    missing_json TEXT    NOT NULL DEFAULT '[]',
    run_id       INTEGER NOT NULL REFERENCES runs(id)
);
CREATE INDEX tagging_alignment ON tagging(alignment);

-- eps2v dataset manifest, schema version 1 (PRAGMA user_version = 1).
--
-- One row per item; every decision carries the run that made it
-- (`*_run_id` → runs.id) and, where it drops or rejects something, a reason.
-- Later versions are forward migrations in schemas/migrations/ (in the order
-- of MIGRATIONS in src/manifest/mod.rs);
-- this file is the version-1 baseline and is embedded into the binary.

-- One row per invocation of a stage.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    stage        TEXT    NOT NULL,                 -- init|import|dedupe|bucket|export|…
    config_json  TEXT    NOT NULL,                 -- the stage's typed config, serialised
    tool_version TEXT    NOT NULL,                 -- eps2v version that ran it
    started_at   TEXT    NOT NULL,                 -- RFC 3339 UTC
    ended_at     TEXT,                             -- NULL while running or if killed
    status       TEXT    NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'done', 'failed')),
    counts_json  TEXT                              -- the stage report, serialised
);

-- One row per distinct file content (sha256 of the file bytes).
CREATE TABLE items (
    id            INTEGER PRIMARY KEY,
    sha256        TEXT    NOT NULL UNIQUE,         -- of the file bytes; content address
    path          TEXT,                            -- relative to the dataset, e.g. images/ab/<sha>.png; NULL when rejected
    source        TEXT    NOT NULL,                -- first source path (import) or 'generate'
    width         INTEGER,                         -- after EXIF orientation
    height        INTEGER,
    format        TEXT,                            -- png|jpeg|webp|gif|bmp|tiff (sniffed from content)
    status        TEXT    NOT NULL CHECK (status IN ('ok', 'rejected', 'duplicate')),
    reason        TEXT,                            -- why rejected / duplicate (snake_case code: detail)
    run_id        INTEGER NOT NULL REFERENCES runs(id),  -- run that created the item
    status_run_id INTEGER NOT NULL REFERENCES runs(id),  -- run that last set status/reason
    created_at    TEXT    NOT NULL
);
CREATE INDEX items_status ON items(status, reason);

-- Every source path that was imported (several may map to one item).
CREATE TABLE sources (
    id        INTEGER PRIMARY KEY,
    item_id   INTEGER NOT NULL REFERENCES items(id),
    path      TEXT    NOT NULL UNIQUE,             -- absolute source path
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    note      TEXT,                                -- e.g. wrong_extension
    run_id    INTEGER NOT NULL REFERENCES runs(id)
);
CREATE INDEX sources_item ON sources(item_id);

-- Generation parameters: parsed from A1111 infotext at import, or the plan of `generate`.
CREATE TABLE generation (
    item_id     INTEGER PRIMARY KEY REFERENCES items(id),
    prompt      TEXT,
    negative    TEXT,
    seed        INTEGER,
    steps       INTEGER,
    sampler     TEXT,
    schedule    TEXT,
    cfg         REAL,
    width       INTEGER,
    height      INTEGER,
    model_hash  TEXT,
    model       TEXT,
    extra_json  TEXT,                              -- every other infotext key, in order
    raw         TEXT,                              -- the raw parameters text
    origin      TEXT    NOT NULL,                  -- png_text|exif_user_comment|generate
    run_id      INTEGER NOT NULL REFERENCES runs(id)
);

-- Captions, one per (item, source): sidecar .txt/.caption, A1111 prompt, tagger, policy.
CREATE TABLE captions (
    id       INTEGER PRIMARY KEY,
    item_id  INTEGER NOT NULL REFERENCES items(id),
    source   TEXT    NOT NULL,
    text     TEXT    NOT NULL,
    score    REAL,
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    UNIQUE (item_id, source)
);

-- Tags with optional confidence, one per (item, source, tag).
CREATE TABLE tags (
    item_id  INTEGER NOT NULL REFERENCES items(id),
    source   TEXT    NOT NULL,
    tag      TEXT    NOT NULL,
    score    REAL,
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    PRIMARY KEY (item_id, source, tag)
) WITHOUT ROWID;
CREATE INDEX tags_tag ON tags(tag);

-- Hashes computed at import from the same decode.
CREATE TABLE hashes (
    item_id      INTEGER PRIMARY KEY REFERENCES items(id),
    pixel_sha256 TEXT    NOT NULL,                 -- of the decoded RGB8 pixels + size
    phash        INTEGER NOT NULL,                 -- 64-bit, imagededup-compatible (stored as i64)
    dhash        INTEGER NOT NULL,
    run_id       INTEGER NOT NULL REFERENCES runs(id)
);
CREATE INDEX hashes_pixel ON hashes(pixel_sha256);

-- Duplicate clusters (connected components); the keeper has a row too (kind 'keeper', distance 0).
CREATE TABLE duplicates (
    item_id    INTEGER PRIMARY KEY REFERENCES items(id),
    cluster_id INTEGER NOT NULL,                   -- the keeper's item id
    keeper_id  INTEGER NOT NULL REFERENCES items(id),
    distance   INTEGER NOT NULL,                   -- Hamming distance to the keeper's hash (kind 'exact': same pixels, whatever the distance)
    kind       TEXT    NOT NULL CHECK (kind IN ('keeper', 'exact', 'near')),
    run_id     INTEGER NOT NULL REFERENCES runs(id)
);
CREATE INDEX duplicates_cluster ON duplicates(cluster_id);

-- Aspect-ratio buckets and the crop actually taken (for SDXL micro-conditioning).
CREATE TABLE buckets (
    item_id        INTEGER PRIMARY KEY REFERENCES items(id),
    bucket_w       INTEGER NOT NULL,
    bucket_h       INTEGER NOT NULL,
    orig_w         INTEGER NOT NULL,               -- original size (after EXIF orientation)
    orig_h         INTEGER NOT NULL,
    resized_w      INTEGER NOT NULL,               -- cover-scaled size before the crop
    resized_h      INTEGER NOT NULL,
    crop_top       INTEGER NOT NULL,               -- crop offset in ORIGINAL pixels
    crop_left      INTEGER NOT NULL,
    crop_top_resized  INTEGER NOT NULL,            -- the same offset in resized pixels (kohya/OneTrainer convention)
    crop_left_resized INTEGER NOT NULL,
    target_w       INTEGER NOT NULL,               -- = bucket size
    target_h       INTEGER NOT NULL,
    path           TEXT    NOT NULL,               -- buckets/<w>x<h>/<sha>.png
    run_id         INTEGER NOT NULL REFERENCES runs(id)
);
CREATE INDEX buckets_size ON buckets(bucket_w, bucket_h);

-- Training: cache entries, the validation split and evaluations of each
-- `eps2v train` run (the run itself is a `runs` row with stage 'train').

-- Latent and text-conditioning cache files (cache/latents, cache/text).
CREATE TABLE cache_entries (
    key        TEXT    PRIMARY KEY,                -- sha256 of everything the entry depends on
    kind       TEXT    NOT NULL CHECK (kind IN ('latent', 'text')),
    item_id    INTEGER REFERENCES items(id),       -- latents: the item; text: NULL
    model_hash TEXT    NOT NULL,                   -- component hash of the VAE / text encoders
    path       TEXT    NOT NULL,                   -- relative to the dataset
    detail     TEXT,                               -- latent mode (mean | sample:SEED) or the caption
    run_id     INTEGER NOT NULL REFERENCES runs(id),
    created_at TEXT    NOT NULL
);
CREATE INDEX cache_entries_item ON cache_entries(item_id);

-- Which items a training run trained on and which it held out.
CREATE TABLE train_split (
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    split   TEXT    NOT NULL CHECK (split IN ('train', 'val')),
    PRIMARY KEY (run_id, item_id)
) WITHOUT ROWID;

-- Evaluations during training: validation loss, shape retention, grid.
CREATE TABLE train_evals (
    run_id    INTEGER NOT NULL REFERENCES runs(id),
    step      INTEGER NOT NULL,
    val_loss  REAL,
    retention REAL,                                -- mean shape-retention score vs the base model
    grid_path TEXT,                                -- relative to the dataset
    PRIMARY KEY (run_id, step)
);

-- Migration (issue 13): the plan of `eps2v generate` and the provenance of
-- `eps2v manifest merge`.
--
-- gen_plan: one row, the settings every planned image shares
--   (settings_json, the serialised stages::generate::PlanSettings), how many
--   indices the plan has, which shard of it this folder renders, and a random
--   plan_id naming this folder's plan in merges.
-- gen_items: one row per plan index with every generation parameter (prompt,
--   negative, seed, size, sampler, schedule, steps, CFG, rescale, uncond
--   mode, model + AutoV2 hash) and its state: planned, rendered (item_id ->
--   its image in items) or rejected by generate itself (reason: nan_latent,
--   black_image, ...; no item). A planned image has no bytes yet, so no items
--   row (whose sha256 is the content address).
-- merged_runs: for manifest merge, which run of which source plan each
--   copied run was, so merging a folder twice copies nothing twice.

CREATE TABLE gen_plan (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    plan_id       TEXT    NOT NULL,
    settings_json TEXT    NOT NULL,
    count         INTEGER NOT NULL,
    shard         TEXT    NOT NULL,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    updated_at    TEXT    NOT NULL
);
CREATE TABLE gen_items (
    idx           INTEGER PRIMARY KEY,
    prompt        TEXT    NOT NULL,
    negative      TEXT,
    seed          INTEGER NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    sampler       TEXT    NOT NULL,
    schedule      TEXT    NOT NULL,
    steps         INTEGER NOT NULL,
    cfg           REAL    NOT NULL,
    rescale       REAL    NOT NULL,
    uncond        TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    model_hash    TEXT    NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'planned' CHECK (state IN ('planned', 'rendered', 'rejected')),
    reason        TEXT,
    item_id       INTEGER REFERENCES items(id),
    plan_run_id   INTEGER NOT NULL REFERENCES runs(id),
    render_run_id INTEGER REFERENCES runs(id)
);
CREATE INDEX gen_items_state ON gen_items(state);
CREATE INDEX gen_items_item ON gen_items(item_id);
CREATE TABLE merged_runs (
    source_plan   TEXT    NOT NULL,
    source_run_id INTEGER NOT NULL,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    source_dir    TEXT    NOT NULL,
    PRIMARY KEY (source_plan, source_run_id)
);

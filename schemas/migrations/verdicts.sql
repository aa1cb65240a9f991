-- Migration: `item_verdicts`, each stage's own decision on an item.
--
-- Before this, an item had one `status` and the run that last set it
-- (`status_run_id`), so a second stage setting an item aside overwrote the
-- first one's verdict: a duplicate that filter rejected and later restored
-- came back `ok`, and a replan could not set aside an item another stage
-- had rejected. Now every stage keeps its verdict here (one row per item
-- and stage, none when the stage finds nothing wrong), and `items.status`,
-- `reason` and `status_run_id` are derived from the rows of the item: a
-- rejection before a duplicate, then the earliest stage of the pipeline
-- (`manifest::verdicts::STAGE_ORDER`); `ok` when it has none.
--
-- Existing set-aside items get the verdict their status says: `duplicate`
-- is dedupe's (only dedupe ever wrote it), a rejection is the stage's of
-- the run that set it ('unknown' when that run is gone). A duplicate whose
-- status a later filter or caption rejection overwrote still has its row
-- in `duplicates` (until dedupe ran again): it gets dedupe's verdict back
-- beside the rejection, so taking the rejection back shows a duplicate.
CREATE TABLE item_verdicts (
    item_id INTEGER NOT NULL REFERENCES items(id),
    stage   TEXT    NOT NULL,
    status  TEXT    NOT NULL CHECK (status = 'rejected' OR status = 'duplicate'),
    reason  TEXT,
    run_id  INTEGER REFERENCES runs(id),         -- the run that made it (NULL: gone before v8)
    PRIMARY KEY (item_id, stage)
) WITHOUT ROWID;
CREATE INDEX item_verdicts_stage ON item_verdicts(stage);

INSERT INTO item_verdicts (item_id, stage, status, reason, run_id)
SELECT i.id,
       CASE WHEN i.status = 'duplicate' THEN 'dedupe' ELSE coalesce(r.stage, 'unknown') END,
       i.status, i.reason, r.id
FROM items i LEFT JOIN runs r ON r.id = i.status_run_id
WHERE i.status <> 'ok';

INSERT OR IGNORE INTO item_verdicts (item_id, stage, status, reason, run_id)
SELECT d.item_id, 'dedupe', 'duplicate',
       d.kind || '_duplicate: of item ' || d.keeper_id || ' (distance ' || d.distance || ')',
       (SELECT id FROM runs WHERE id = d.run_id)
FROM duplicates d JOIN items i ON i.id = d.item_id
WHERE d.kind <> 'keeper' AND i.status = 'rejected';

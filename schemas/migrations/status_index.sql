-- Migration (issue 14): `items_status` covers only the items a stage set
-- aside (status 'rejected' or 'duplicate').
--
-- Stages select the 'ok' items, which are most of the table, so an index
-- on them saved nothing over a scan, yet every bulk insert rebuilt it (about
-- 0.5 s of the 1,000,000-row insert benchmark). Reports of rejections by
-- reason (`WHERE status <> 'ok'`) still use it; a query must name that
-- condition for SQLite to pick a partial index.
DROP INDEX IF EXISTS items_status;
CREATE INDEX items_status ON items(status, reason) WHERE status <> 'ok';

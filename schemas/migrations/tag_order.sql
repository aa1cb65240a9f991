-- Migration: `tags.pos`, the place of a tag in its source (0-based): the
-- order a sidecar caption or an A1111 prompt wrote its tags in, and the
-- order the tagger's caption lists them (count, character, general).
--
-- The table is WITHOUT ROWID keyed by (item, source, tag), so before this
-- a source's tags read back in key order (alphabetical) and a sidecar's
-- order was lost in the exported `tags` column. Rows written before this
-- migration keep pos NULL and sort after the ordered ones, by name.
ALTER TABLE tags ADD COLUMN pos INTEGER;

//! `eps2v dedupe`: drop exact and near duplicates.
//!
//! - Exact duplicates: same decoded-pixel sha256 (byte-identical files
//!   already collapsed at import, by content address).
//! - Near duplicates: 64-bit perceptual hash (pHash by default, dHash as an
//!   option; both computed at import from the same decode) within a Hamming
//!   radius, found with the exact multi-index search in [`index`].
//! - Groups are the connected components of the "duplicate of" graph
//!   (union-find). Within a group, members are ranked by the documented
//!   rule ([`keeper`]): larger resolution, then lossless over lossy, then
//!   better caption/tag score (then any caption over none), then larger
//!   file, then the older item; in that order each member is a duplicate
//!   of a member already kept when it has its pixels or is within the
//!   radius of it, else it is kept ([`choose_keepers`]; the far end of a
//!   chain A–B–C is kept, as in imagededup). Every dropped member gets
//!   status `duplicate` with its keeper, distance and kind (`exact`: same
//!   decoded pixels as the keeper).
//! - Idempotent and atomic: the plan is computed from the manifest alone and
//!   written in one transaction that first clears the previous dedupe
//!   decisions, so a rerun (or a rerun after `kill -9`) gives the same result.
//!
//! Default radius 10 is imagededup's `max_distance_threshold` default: at
//! that radius pHash catches resized / recompressed / lightly edited copies.

pub mod index;
pub mod keeper;

pub use keeper::{keeper_order, Candidate};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::error::Result;
use crate::manifest::{verdicts, ItemStatus, Manifest};

/// Which perceptual hash to compare.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HashKind {
    /// DCT perceptual hash (imagededup PHash).
    #[default]
    Phash,
    /// Horizontal-gradient difference hash (imagededup DHash).
    Dhash,
}

/// Configuration of the dedupe stage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// Hash used for near duplicates.
    pub hash: HashKind,
    /// Hamming radius (0..=32) under which two hashes are near duplicates.
    pub radius: u32,
    /// Only compute and report; write nothing.
    pub dry_run: bool,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        Self {
            hash: HashKind::Phash,
            radius: 10,
            dry_run: false,
        }
    }
}

/// What happens to one dropped item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drop {
    /// Dropped item.
    pub item_id: i64,
    /// Its keeper.
    pub keeper_id: i64,
    /// Hamming distance to the keeper's hash.
    pub distance: u32,
    /// `exact` (same pixels) or `near`.
    pub kind: &'static str,
}

/// A cluster of duplicates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// The item kept.
    pub keeper_id: i64,
    /// The others.
    pub drops: Vec<Drop>,
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x
}

/// Pure planner: clusters and keepers for `items` at `radius`.
/// Clusters are returned sorted by keeper id, drops by item id.
pub fn plan(items: &[Candidate], radius: u32) -> Vec<Cluster> {
    let (groups, pairs) = components_and_pairs(items, radius);
    choose_keepers(items, &groups, &pairs)
}

/// The duplicate clusters (connected components with more than one
/// member) of `items` at `radius`: indices into `items`, each sorted.
pub fn components(items: &[Candidate], radius: u32) -> Vec<Vec<u32>> {
    components_and_pairs(items, radius).0
}

/// [`components`], and every pair of `items` whose hashes are within
/// `radius` (what [`choose_keepers`] looks a member's keeper up in).
pub fn components_and_pairs(items: &[Candidate], radius: u32) -> (Vec<Vec<u32>>, Vec<index::Pair>) {
    let n = items.len();
    let mut parent: Vec<u32> = (0..n as u32).collect();
    let union = |parent: &mut Vec<u32>, a: u32, b: u32| {
        let (ra, rb) = (find(parent, a), find(parent, b));
        if ra != rb {
            parent[ra.max(rb) as usize] = ra.min(rb);
        }
    };
    // Exact: same pixel hash.
    let mut by_pixels: Vec<u32> = (0..n as u32).collect();
    by_pixels.sort_by(|&a, &b| {
        items[a as usize]
            .pixel_sha256
            .cmp(&items[b as usize].pixel_sha256)
    });
    for w in by_pixels.windows(2) {
        if items[w[0] as usize].pixel_sha256 == items[w[1] as usize].pixel_sha256 {
            union(&mut parent, w[0], w[1]);
        }
    }
    // Near: perceptual hash within radius.
    let hashes: Vec<u64> = items.iter().map(|c| c.hash).collect();
    let pairs = index::MultiIndex::new(&hashes, radius).all_pairs();
    for p in &pairs {
        union(&mut parent, p.i, p.j);
    }
    let mut groups: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for i in 0..n as u32 {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    let groups = groups.into_values().filter(|g| g.len() > 1).collect();
    (groups, pairs)
}

/// Pick the keepers of every group (a connected component of [`components`])
/// and describe the drops. Within a group, members are taken in
/// [`keeper_order`]: one with the same pixels as a member already kept is
/// an `exact` duplicate of it, else one within `radius` of a kept member is
/// a `near` duplicate of the nearest (the earlier kept on a tie), else it is
/// kept too. So every drop is within `radius` of its keeper (or has its
/// pixels), as in imagededup, where the groups' transitive closure would
/// drop the far end of a chain A–B–C as a "duplicate" of A it does not
/// resemble. Clusters (a keeper with at least one drop) are returned sorted
/// by keeper id, drops by item id.
///
/// `pairs`: every pair of items within the radius ([`components_and_pairs`]);
/// a member's keeper is looked up among its own pairs (and by its pixels),
/// so the work is the group's pairs, not its members times its keepers (a
/// giant group of 100k members with 50k keepers was 5·10⁹ comparisons).
pub fn choose_keepers(
    items: &[Candidate],
    groups: &[Vec<u32>],
    pairs: &[index::Pair],
) -> Vec<Cluster> {
    use std::collections::HashMap;
    // Neighbours within the radius, in CSR form.
    let mut offsets = vec![0usize; items.len() + 1];
    for p in pairs {
        offsets[p.i as usize + 1] += 1;
        offsets[p.j as usize + 1] += 1;
    }
    for k in 1..offsets.len() {
        offsets[k] += offsets[k - 1];
    }
    let mut fill = offsets.clone();
    let mut near_of = vec![0u32; offsets[items.len()]];
    for p in pairs {
        for (a, b) in [(p.i, p.j), (p.j, p.i)] {
            near_of[fill[a as usize]] = b;
            fill[a as usize] += 1;
        }
    }
    let mut clusters: Vec<Cluster> = Vec::new();
    for g in groups {
        let mut order = g.clone();
        order.sort_by(|&a, &b| keeper_order(&items[a as usize], &items[b as usize]));
        let mut kept: Vec<(&Candidate, Vec<Drop>)> = Vec::new();
        // Item index → its place in `kept`; pixels → the keeper that has them.
        let mut kept_at: HashMap<u32, usize> = HashMap::new();
        let mut by_pixels: HashMap<&str, usize> = HashMap::new();
        for &i in &order {
            let c = &items[i as usize];
            let exact = by_pixels.get(c.pixel_sha256.as_str()).copied();
            // The nearest kept neighbour, the earlier kept on a tie.
            let near = || {
                near_of[offsets[i as usize]..offsets[i as usize + 1]]
                    .iter()
                    .filter_map(|j| kept_at.get(j))
                    .map(|&n| ((c.hash ^ kept[n].0.hash).count_ones(), n))
                    .min()
                    .map(|(_, n)| n)
            };
            match exact.or_else(near) {
                Some(n) => {
                    let k = kept[n].0;
                    kept[n].1.push(Drop {
                        item_id: c.id,
                        keeper_id: k.id,
                        distance: (c.hash ^ k.hash).count_ones(),
                        kind: if exact.is_some() { "exact" } else { "near" },
                    });
                }
                None => {
                    kept_at.insert(i, kept.len());
                    by_pixels
                        .entry(c.pixel_sha256.as_str())
                        .or_insert(kept.len());
                    kept.push((c, Vec::new()));
                }
            }
        }
        push_clusters(kept, &mut clusters);
    }
    clusters.sort_by_key(|c| c.keeper_id);
    clusters
}

/// The clusters of one group's keepers: each keeper with at least one
/// drop, drops by item id.
fn push_clusters(kept: Vec<(&Candidate, Vec<Drop>)>, clusters: &mut Vec<Cluster>) {
    for (k, mut drops) in kept {
        if !drops.is_empty() {
            drops.sort_by_key(|d| d.item_id);
            clusters.push(Cluster {
                keeper_id: k.id,
                drops,
            });
        }
    }
}

/// What `dedupe` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DedupeReport {
    /// Run id (0 for a dry run).
    pub run_id: i64,
    /// Items considered (status ok or duplicate, with hashes).
    pub considered: usize,
    /// Clusters with more than one member.
    pub clusters: usize,
    /// Items dropped as exact duplicates.
    pub exact: usize,
    /// Items dropped as near duplicates.
    pub near: usize,
    /// Items kept.
    pub kept: usize,
    /// Keepers given the caption someone wrote for one of their dropped
    /// duplicates ([`CARRIED_CAPTION_SOURCE`]).
    pub carried_captions: usize,
    /// True when nothing was written.
    pub dry_run: bool,
    /// The clusters (only listed for dry runs and JSON output).
    pub plan: Vec<Cluster>,
}

/// Read the candidates and group them: the clusters with their keepers,
/// and the report's counts.
fn read_and_plan(cfg: &DedupeConfig, m: &Manifest) -> Result<(Vec<Cluster>, DedupeReport)> {
    let hash_col = match cfg.hash {
        HashKind::Phash => "h.phash",
        HashKind::Dhash => "h.dhash",
    };
    let sql = format!(
        "SELECT i.id, coalesce(i.width, 0) * coalesce(i.height, 0), h.pixel_sha256, {hash_col},
                coalesce((SELECT alignment FROM tagging WHERE item_id = i.id),
                         (SELECT max(s) FROM (SELECT max(score) AS s FROM captions WHERE item_id = i.id AND source <> '{carried}'
                                              UNION ALL SELECT max(score) FROM tags WHERE item_id = i.id))),
                EXISTS (SELECT 1 FROM captions WHERE item_id = i.id AND source <> '{carried}'),
                coalesce((SELECT max(size) FROM sources WHERE item_id = i.id), 0),
                coalesce(i.format, ''), i.path,
                EXISTS (SELECT 1 FROM captions WHERE item_id = i.id AND source IN ({written}))
         FROM items i JOIN hashes h ON h.item_id = i.id
         WHERE {} ORDER BY i.id",
        crate::manifest::verdicts::eligible("i", &["dedupe"]),
        // What an earlier run carried does not count: the plan is the same
        // whatever the last run gave each keeper.
        carried = CARRIED_CAPTION_SOURCE,
        written = keeper::written_sql()
    );
    let mut paths: Vec<Option<String>> = Vec::new();
    let mut webp: Vec<bool> = Vec::new();
    let mut items: Vec<Candidate> = {
        let mut st = m.conn().prepare(&sql).map_err(|e| m.err(e))?;
        let rows = st
            .query_map([], |r| {
                let format: String = r.get(7)?;
                Ok((
                    Candidate {
                        id: r.get(0)?,
                        pixels: r.get::<_, i64>(1)? as u64,
                        pixel_sha256: r.get(2)?,
                        hash: r.get::<_, i64>(3)? as u64,
                        score: r.get(4)?,
                        captioned: r.get(5)?,
                        written_caption: r.get(9)?,
                        file_size: r.get::<_, i64>(6)? as u64,
                        lossless: keeper::format_is_lossless(&format).unwrap_or(false),
                    },
                    format == "webp",
                    r.get::<_, Option<String>>(8)?,
                ))
            })
            .map_err(|e| m.err(e))?;
        let mut v = Vec::new();
        for row in rows {
            let (c, is_webp, path) = row.map_err(|e| m.err(e))?;
            v.push(c);
            webp.push(is_webp);
            paths.push(path);
        }
        v
    };
    let (groups, pairs) = components_and_pairs(&items, cfg.radius);
    // WebP can be either codec: read the chunk header of the cluster members only.
    for &i in groups.iter().flatten() {
        let i = i as usize;
        if let (true, Some(rel)) = (webp[i], &paths[i]) {
            items[i].lossless = keeper::webp_is_lossless(&m.root().join(rel)).unwrap_or(false);
        }
    }
    let clusters = choose_keepers(&items, &groups, &pairs);
    let mut report = DedupeReport {
        considered: items.len(),
        clusters: clusters.len(),
        dry_run: cfg.dry_run,
        ..Default::default()
    };
    for c in &clusters {
        for d in &c.drops {
            if d.kind == "exact" {
                report.exact += 1;
            } else {
                report.near += 1;
            }
        }
    }
    report.kept = report.considered - report.exact - report.near;
    Ok((clusters, report))
}

/// Run the dedupe stage.
/// Duplicates whose keeper a later stage has set aside since dedupe chose
/// it (a `filter` or `bucket` run after `dedupe`): nothing of their
/// cluster is in the dataset until `dedupe` runs again and keeps one of
/// them (the set-aside keeper is no longer a candidate).
pub fn waiting_on_a_set_aside_keeper(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        &format!(
            "SELECT count(*) FROM duplicates d
             JOIN items i ON i.id = d.item_id JOIN items k ON k.id = d.keeper_id
             WHERE {WAITING}"
        ),
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// SQL condition of such a duplicate, over `duplicates d` joined to its
/// item `i` and its keeper `k` (both `items`).
pub const WAITING: &str = "d.kind <> 'keeper' AND i.status = 'duplicate' AND k.status <> 'ok'";

/// The line a stage prints when [`waiting_on_a_set_aside_keeper`] is not 0.
pub fn waiting_hint(n: u64, dir: &std::path::Path) -> String {
    format!(
        "{n} duplicates wait on a keeper that was set aside after dedupe chose it: rerun `eps2v dedupe {d}`, then `eps2v bucket {d}`, to keep one of each of their clusters",
        d = dir.display()
    )
}

pub fn run(cfg: &DedupeConfig, m: &mut Manifest, _ctx: &Ctx) -> Result<DedupeReport> {
    if cfg.radius > 32 {
        return Err(crate::Error::config(format!(
            "dedupe radius {} is out of range; use 0..=32 (default 10)",
            cfg.radius
        )));
    }
    if cfg.dry_run {
        let (clusters, mut report) = read_and_plan(cfg, m)?;
        report.carried_captions = carry_plan(m.conn(), &clusters).map_err(|e| m.err(e))?.len();
        report.plan = clusters;
        return Ok(report);
    }
    // Planned inside the run: it holds the dataset's writer lock, so no
    // other stage changes an item's status between the plan and its write.
    crate::manifest::stage_run(m, "dedupe", cfg, |m, run_id| {
        let (clusters, mut report) = read_and_plan(cfg, m)?;
        report.run_id = run_id;
        let path = m.db_path().to_path_buf();
        let map = crate::manifest::sql_err(&path);
        let tx = m.conn_mut().transaction().map_err(map)?;
        // Its decisions on the items it planned are made again; those on
        // items another stage set aside since stand (verdict and row).
        verdicts::clear_stage(&tx, "dedupe", run_id).map_err(map)?;
        tx.execute(
            "DELETE FROM duplicates WHERE item_id NOT IN
                 (SELECT item_id FROM item_verdicts WHERE stage = 'dedupe')",
            [],
        )
        .map_err(map)?;
        {
            const INSERT: &str =
                "INSERT INTO duplicates (item_id, cluster_id, keeper_id, distance, kind, run_id) \
                 VALUES (?1, ?2, ?2, ?3, ?4, ?5)";
            let mut ins = tx.prepare(INSERT).map_err(map)?;
            for c in &clusters {
                ins.execute(params![c.keeper_id, c.keeper_id, 0, "keeper", run_id])
                    .map_err(map)?;
                for d in &c.drops {
                    ins.execute(params![d.item_id, c.keeper_id, d.distance, d.kind, run_id])
                        .map_err(map)?;
                    let reason = format!(
                        "{}_duplicate: of item {} (distance {})",
                        d.kind, d.keeper_id, d.distance
                    );
                    let v = Some((ItemStatus::Duplicate, reason.as_str()));
                    verdicts::set(&tx, d.item_id, "dedupe", v, run_id).map_err(map)?;
                }
            }
        }
        report.carried_captions = carry_written_captions(&tx, &clusters, run_id).map_err(map)?;
        // A kept row (of a duplicate another stage set aside) whose keeper
        // no longer keeps a cluster: its keeper row, so that every cluster
        // has one.
        tx.execute(
            "INSERT OR IGNORE INTO duplicates (item_id, cluster_id, keeper_id, distance, kind, run_id)
             SELECT DISTINCT d.keeper_id, d.keeper_id, d.keeper_id, 0, 'keeper', d.run_id
             FROM duplicates d WHERE d.kind <> 'keeper'",
            [],
        )
        .map_err(map)?;
        tx.commit().map_err(map)?;
        Ok(report)
    })
}

/// Whether the last finished caption run replaced sidecar captions.
fn last_caption_overwrote(conn: &rusqlite::Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT json_extract(config_json, '$.overwrite') FROM runs
             WHERE stage = 'caption' AND status = 'done' ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get::<_, Option<bool>>(0),
        )
        .optional()?
        .flatten()
        .unwrap_or(false))
}

/// The caption source of a caption someone wrote for a dropped duplicate,
/// given to its keeper.
pub const CARRIED_CAPTION_SOURCE: &str = "duplicate_sidecar";

/// `(keeper, drop)`: each keeper without a caption someone wrote, with the
/// drop (smallest id) whose written caption it takes; none while the last
/// caption run was `--overwrite` (machine captions asked for everywhere).
/// What a run writes ([`carry_written_captions`]) and a dry run counts.
fn carry_plan(
    conn: &rusqlite::Connection,
    clusters: &[Cluster],
) -> rusqlite::Result<Vec<(i64, i64)>> {
    if last_caption_overwrote(conn)? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(&format!(
        "SELECT DISTINCT item_id FROM captions WHERE source IN ({})",
        keeper::written_sql()
    ))?;
    let has: std::collections::HashSet<i64> = st
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(clusters
        .iter()
        .filter(|c| !has.contains(&c.keeper_id))
        .filter_map(|c| {
            c.drops
                .iter()
                .map(|d| d.item_id)
                .filter(|d| has.contains(d))
                .min()
                .map(|d| (c.keeper_id, d))
        })
        .collect())
}

/// A keeper without a caption someone wrote gets the one of a dropped
/// duplicate (a sidecar beside a captioned, resized training copy of a
/// full-size original that wins on pixels): export and train use it ahead
/// of the keeper's machine caption (which stays, for when the carried one
/// goes). Made again each run from its clusters ([`carry_plan`]). Returns
/// how many keepers got one.
fn carry_written_captions(
    tx: &rusqlite::Transaction,
    clusters: &[Cluster],
    run_id: i64,
) -> rusqlite::Result<usize> {
    tx.execute(
        "DELETE FROM captions WHERE source = ?1",
        [CARRIED_CAPTION_SOURCE],
    )?;
    let plan = carry_plan(tx, clusters)?;
    // The drop's .txt first.
    let mut carry = tx.prepare(&format!(
        "INSERT INTO captions (item_id, source, text, score, run_id)
         SELECT ?1, '{CARRIED_CAPTION_SOURCE}', text, NULL, ?3 FROM captions
         WHERE item_id = ?2 AND source IN ({})
         ORDER BY source = 'sidecar_txt' DESC LIMIT 1",
        keeper::written_sql()
    ))?;
    for &(keeper, drop) in &plan {
        carry.execute(params![keeper, drop, run_id])?;
    }
    Ok(plan.len())
}

#[cfg(test)]
mod tests;

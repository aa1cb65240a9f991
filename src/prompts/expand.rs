//! Turning a compiled template tree into prompts: random mode (one prompt
//! from a seeded generator) and combinatorial mode (every prompt, lazily,
//! in dynamicprompts' `CombinatorialPromptGenerator` order).
//!
//! Combinatorial order, as `dynamicprompts/samplers/combinatorial.py`:
//! - a sequence is the Cartesian product of its parts, the first part
//!   varying slowest (`{a|b} {c|d}` → `a c, a d, b c, b d`);
//! - a variant with bounds `lo..=hi` (clamped to its option count) yields,
//!   for each count k from lo to hi, every ordered k-permutation of its
//!   options (an option is never combined with options equal to it), each
//!   expanded as a product; a pick whose texts repeat, or that was already
//!   yielded, is skipped; picks are joined with the separator;
//! - a wildcard yields the expansions of its sorted entries in turn; a
//!   variant whose only option is a wildcard (`{2$$__w__}`) picks among the
//!   wildcard's entries.
//!
//! Joining (`SamplingResult.joined`): one piece stays as is; several are
//! joined and one leading and one trailing separator are removed (so an
//! empty pick does not leave a dangling comma).
//!
//! Random mode follows the same structure with choices instead of loops:
//! the pick count is uniform in `lo..=hi`, options are drawn without
//! replacement in proportion to their weights (equally when the remaining
//! weights are all 0), wildcard entries uniformly; a variant with one
//! option is that option (dynamicprompts' random sampler ignores the bounds
//! there). The generator is ChaCha8 keyed by SHA-256 of the seed and
//! positioned on stream `index`, read through our own uniform draws, so a
//! prompt depends only on (template, seed, index) — not on threads, batch,
//! or the `rand` crate's algorithms.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::parse::{Node, Variant};

/// Boxed lazy stream of strings.
pub type Prompts<'a> = Box<dyn Iterator<Item = String> + 'a>;

/// The generator of prompt `index` of a run seeded with `seed`.
pub fn prompt_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"eps2v prompt rng v1\0");
    h.update(seed.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(h.finalize().into());
    rng.set_stream(index);
    rng
}

/// Uniform in [0, 1) with 53 random bits.
pub fn uniform(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform integer in `0..n` (`n ≥ 1`).
pub fn below(rng: &mut impl RngCore, n: usize) -> usize {
    ((uniform(rng) * n as f64) as usize).min(n.saturating_sub(1))
}

/// Index drawn with probability proportional to `weights` (uniform when
/// they sum to 0). `weights` must not be empty.
pub fn weighted_index(rng: &mut impl RngCore, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return below(rng, weights.len());
    }
    let u = uniform(rng) * total;
    let mut acc = 0.0;
    let mut last_positive = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += w;
            last_positive = i;
            if u < acc {
                return i;
            }
        }
    }
    last_positive
}

/// dynamicprompts `SamplingResult.joined`.
pub fn joined(parts: Vec<String>, sep: &str) -> String {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let s = parts.join(sep);
    if sep.is_empty() {
        return s;
    }
    let s = s.strip_prefix(sep).unwrap_or(&s);
    s.strip_suffix(sep).unwrap_or(s).to_string()
}

/// The options a variant chooses from and its clamped bounds: a lone
/// wildcard option stands for its entries.
fn choices(v: &Variant) -> (Vec<(f64, &Node)>, usize, usize) {
    if let [(_, Node::Wildcard(w))] = v.options.as_slice() {
        let entries: Vec<(f64, &Node)> = w
            .entries
            .as_deref()
            .map(|e| e.iter().map(|n| (1.0, n)).collect())
            .unwrap_or_default();
        let n = entries.len();
        let (a, b) = (v.min.min(n), v.max.min(n));
        return (entries, a.min(b), a.max(b));
    }
    let n = v.options.len();
    let opts = v.options.iter().map(|(w, n)| (*w, n)).collect();
    (opts, v.min.min(n), v.max.min(n))
}

/// One random expansion of `node`.
pub fn sample(node: &Node, rng: &mut ChaCha8Rng) -> String {
    match node {
        Node::Text(s) => s.clone(),
        Node::Seq(parts) => parts.iter().map(|p| sample(p, rng)).collect(),
        Node::Wildcard(w) => match w.entries.as_deref() {
            Some(e) if !e.is_empty() => {
                let i = below(rng, e.len());
                sample(&e[i], rng)
            }
            _ => String::new(),
        },
        Node::Variant(v) => {
            let (opts, lo, hi) = choices(v);
            if opts.len() == 1 {
                return sample(opts[0].1, rng);
            }
            if opts.is_empty() {
                return String::new();
            }
            let k = lo + below(rng, hi - lo + 1);
            let mut pool = opts;
            let mut picked = Vec::with_capacity(k);
            for _ in 0..k.min(pool.len()) {
                let weights: Vec<f64> = pool.iter().map(|o| o.0).collect();
                let i = weighted_index(rng, &weights);
                picked.push(pool.remove(i).1);
            }
            let parts = picked.into_iter().map(|n| sample(n, rng)).collect();
            joined(parts, &v.sep)
        }
    }
}

/// Every expansion of `node`, in dynamicprompts' combinatorial order.
pub fn combinations(node: &Node) -> Prompts<'_> {
    match node {
        Node::Text(s) => Box::new(std::iter::once(s.clone())),
        Node::Seq(parts) => sequence(parts),
        Node::Wildcard(w) => match w.entries.as_deref() {
            Some(e) => Box::new(e.iter().flat_map(combinations)),
            None => Box::new(std::iter::empty()),
        },
        Node::Variant(v) => variant(v),
    }
}

fn sequence(parts: &[Node]) -> Prompts<'_> {
    match parts.split_first() {
        None => Box::new(std::iter::once(String::new())),
        Some((first, rest)) => Box::new(
            combinations(first).flat_map(move |a| sequence(rest).map(move |b| a.clone() + &b)),
        ),
    }
}

/// Ordered k-permutations of `values`, each value never followed by
/// values equal to it (`get_value_combinations`).
fn permutations<'a>(
    values: Rc<Vec<&'a Node>>,
    k: usize,
) -> Box<dyn Iterator<Item = Vec<&'a Node>> + 'a> {
    if k == 0 {
        return Box::new(std::iter::once(Vec::new()));
    }
    let n = values.len();
    Box::new((0..n).flat_map(move |i| {
        let v = values[i];
        let others: Rc<Vec<&Node>> = Rc::new(values.iter().copied().filter(|o| *o != v).collect());
        permutations(others, k - 1).map(move |mut rest| {
            rest.insert(0, v);
            rest
        })
    }))
}

/// Cartesian product of the expansions of `nodes` (first slowest).
fn product<'a>(
    nodes: Rc<Vec<&'a Node>>,
    from: usize,
) -> Box<dyn Iterator<Item = Vec<String>> + 'a> {
    if from >= nodes.len() {
        return Box::new(std::iter::once(Vec::new()));
    }
    let head = nodes[from];
    Box::new(combinations(head).flat_map(move |a| {
        product(nodes.clone(), from + 1).map(move |mut rest| {
            rest.insert(0, a.clone());
            rest
        })
    }))
}

fn variant(v: &Variant) -> Prompts<'_> {
    let (opts, lo, hi) = choices(v);
    if opts.is_empty() {
        return Box::new(std::iter::empty());
    }
    let values: Rc<Vec<&Node>> = Rc::new(opts.into_iter().map(|o| o.1).collect());
    let seen: Rc<RefCell<HashSet<Vec<String>>>> = Rc::default();
    let sep = v.sep.as_str();
    Box::new((lo..=hi).flat_map(move |k| {
        let seen = seen.clone();
        permutations(values.clone(), k)
            .flat_map(|combo| product(Rc::new(combo), 0))
            .filter_map(move |arr| {
                let mut unique: Vec<String> = Vec::with_capacity(arr.len());
                for s in arr {
                    if !unique.contains(&s) {
                        unique.push(s);
                    }
                }
                if unique.len() != k || !seen.borrow_mut().insert(unique.clone()) {
                    return None;
                }
                Some(joined(unique, sep))
            })
    }))
}

#[cfg(test)]
mod tests {
    use super::super::{Source, Template, WildcardSet};
    use super::*;

    fn t(text: &str) -> Template {
        let w = WildcardSet::from_files(
            "mem",
            &[
                ("colours", "red\nblue\n{light|dark} green"),
                ("hair/length", "long hair\nshort hair"),
            ],
        );
        Template::compile(text, &Source::new("t"), &w).unwrap()
    }

    fn all(text: &str) -> Vec<String> {
        t(text).combinations().collect()
    }

    #[test]
    fn combinatorial_order_matches_dynamicprompts() {
        assert_eq!(all("{a|b} {c|d}"), ["a c", "a d", "b c", "b d"]);
        assert_eq!(
            all("{2$$a|b|c}"),
            ["a,b", "a,c", "b,a", "b,c", "c,a", "c,b"]
        );
        assert_eq!(
            all("{1-2$$ and $$a|{b|c}}"),
            ["a", "b", "c", "a and b", "a and c", "b and a", "c and a"]
        );
        assert_eq!(all("{2$$a|a|b}"), ["a,b", "b,a"]);
        assert_eq!(
            all("{3$$a|b}"),
            ["a,b", "b,a"],
            "bounds clamp to the options"
        );
        assert_eq!(all("{0$$a|b}"), [""]);
        assert_eq!(
            all("{2$$a|}"),
            ["a", "a"],
            "dangling separators are stripped"
        );
        assert_eq!(all("{2$$a|{a|b}}"), ["a,b", "b,a"]);
        assert_eq!(
            all("__colours__"),
            ["blue", "red", "light green", "dark green"]
        );
        assert_eq!(
            all("{2$$__hair/length__}"),
            ["long hair,short hair", "short hair,long hair"]
        );
        assert_eq!(all("{0.5::x|2::y}"), ["x", "y"], "weights do not reorder");
    }

    #[test]
    fn random_mode_depends_only_on_seed_and_index() {
        let tpl = t("{a|b|c|d}-{2$$ & $$w|x|y|z}-__colours__-{1-3$$p|q|r}");
        let a: Vec<String> = (0..50).map(|i| tpl.random(7, i)).collect();
        let b: Vec<String> = (0..50).rev().map(|i| tpl.random(7, i)).collect();
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
        assert_ne!(a, (0..50).map(|i| tpl.random(8, i)).collect::<Vec<_>>());
        // Every random prompt is one of the combinatorial ones.
        let every: HashSet<String> = tpl.combinations().collect();
        for p in &a {
            assert!(every.contains(p), "{p}");
        }
        // Two picks never repeat an option.
        for p in &a {
            let pair = p.split('-').nth(1).unwrap();
            let xs: Vec<&str> = pair.split(" & ").collect();
            assert_eq!(xs.len(), 2);
            assert_ne!(xs[0], xs[1]);
        }
    }

    #[test]
    fn weights_steer_random_picks() {
        let tpl = t("{9::a|1::b|0::c}");
        let n = 4000;
        let a = (0..n).filter(|&i| tpl.random(1, i) == "a").count();
        let c = (0..n).filter(|&i| tpl.random(1, i) == "c").count();
        let share = a as f64 / n as f64;
        assert!((share - 0.9).abs() < 0.03, "share of a: {share}");
        assert_eq!(c, 0, "weight 0 is never picked");
        // A single option ignores the bounds in random mode (dynamicprompts).
        assert_eq!(t("{0$$a}").random(1, 0), "a");
        assert_eq!(all("{0$$a}"), [""]);
    }

    #[test]
    fn joined_strips_one_separator_each_side() {
        assert_eq!(joined(vec!["a".into()], ","), "a");
        assert_eq!(joined(vec!["".into(), "a".into()], ","), "a");
        assert_eq!(joined(vec![",a".into(), "b,".into()], ","), "a,b");
        assert_eq!(joined(vec![], ","), "");
        assert_eq!(joined(vec!["a".into(), "b".into()], ""), "ab");
    }

    #[test]
    fn weighted_index_handles_zero_weights() {
        let mut rng = prompt_rng(0, 0);
        for _ in 0..100 {
            assert_eq!(weighted_index(&mut rng, &[0.0, 3.0, 0.0]), 1);
            assert!(weighted_index(&mut rng, &[0.0, 0.0]) < 2);
        }
    }
}

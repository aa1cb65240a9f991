//! Which part of a generation plan one process renders: `--shard K/N`
//! takes the indices `i` with `i mod N = K − 1` (disjoint, deterministic,
//! independent of `--count`), with defaults from the schedulers' own
//! environment: Slurm array jobs (`SLURM_ARRAY_TASK_ID`, `…_MIN`, `…_STEP`,
//! `…_COUNT`) and Kubernetes indexed Jobs (`JOB_COMPLETION_INDEX` with
//! `--shards N`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which part of the plan this folder renders: indices `i` with
/// `i mod count = index − 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// 1-based shard number K.
    pub index: u32,
    /// Number of shards N.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole plan (`1/1`).
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether plan index `idx` belongs to this shard.
    pub fn contains(&self, idx: u64) -> bool {
        idx % u64::from(self.count) == u64::from(self.index - 1)
    }

    /// `K/N` with `1 ≤ K ≤ N`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(format!(
                "--shard {s:?}: expected K/N with 1 <= K <= N, e.g. 2/8"
            ))
        };
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let index: u32 = k.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        Self::new(index, count).ok_or_else(bad)
    }

    /// Shard `index` of `count`, when `1 ≤ index ≤ count`.
    pub fn new(index: u32, count: u32) -> Option<Self> {
        (index >= 1 && index <= count).then_some(Self { index, count })
    }

    /// The shard of this process: `flag` (`--shard K/N`) when given; else
    /// a Slurm array task (`SLURM_ARRAY_TASK_ID` relative to
    /// `SLURM_ARRAY_TASK_MIN` and `SLURM_ARRAY_TASK_STEP`, out of
    /// `--shards` or `SLURM_ARRAY_TASK_COUNT`); else a Kubernetes indexed
    /// Job (`JOB_COMPLETION_INDEX`, 0-based, out of `--shards`); else all.
    pub fn resolve(
        flag: Option<&str>,
        shards: Option<u32>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        if let Some(f) = flag {
            let s = Self::parse(f)?;
            if let Some(n) = shards.filter(|&n| n != s.count) {
                return Err(Error::config(format!(
                    "--shard {s} and --shards {n} disagree; give one of them"
                )));
            }
            return Ok(s);
        }
        let num = |k: &str| -> Result<Option<u64>> {
            match env(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    Error::config(format!("environment variable {k}={v:?} is not a number"))
                }),
            }
        };
        let pick = |k: u64, n: u64, from: &str| -> Result<Self> {
            u32::try_from(k + 1)
                .ok()
                .zip(u32::try_from(n).ok())
                .and_then(|(k, n)| Self::new(k, n))
                .ok_or_else(|| {
                    Error::config(format!(
                        "{from}: task {} of {n} is not a valid shard (need 1 <= K <= N)",
                        k + 1
                    ))
                })
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let tasks = num("SLURM_ARRAY_TASK_COUNT")?;
            let n = match (shards, tasks) {
                // A subset of the array resubmitted (`--array=3,5` of
                // 0-7): the task's place in it is not its shard.
                (Some(n), Some(t)) if t != u64::from(n) => {
                    return Err(Error::config(format!(
                        "this Slurm array has {t} task(s) (SLURM_ARRAY_TASK_COUNT) but --shards is {n}: a resubmitted subset? Its task {id} is not shard {id} of {n} by position; pass the shard itself, e.g. --shard $((SLURM_ARRAY_TASK_ID + 1))/{n} for an array that counted from 0"
                    )));
                }
                (Some(n), _) => u64::from(n),
                (None, Some(t)) => t,
                (None, None) => return Err(Error::config(
                    "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shards N",
                )),
            };
            let k = id.checked_sub(min).ok_or_else(|| {
                Error::config(format!(
                    "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
                ))
            })? / step;
            return pick(k, n, "SLURM_ARRAY_TASK_ID");
        }
        if let Some(idx) = num("JOB_COMPLETION_INDEX")? {
            let n = shards.ok_or_else(|| {
                Error::config(
                    "JOB_COMPLETION_INDEX is set (Kubernetes indexed Job) but --shards N is not; pass --shards with the Job's completions",
                )
            })?;
            return pick(idx, u64::from(n), "JOB_COMPLETION_INDEX");
        }
        match shards {
            Some(1) | None => Ok(Self::ALL),
            Some(n) => Err(Error::config(format!(
                "--shards {n} needs --shard K/{n}, a Slurm array task or JOB_COMPLETION_INDEX to say which shard this is"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover_the_plan() {
        let shards: Vec<Shard> = (1..=3).map(|k| Shard::new(k, 3).unwrap()).collect();
        for idx in 0..100u64 {
            assert_eq!(shards.iter().filter(|s| s.contains(idx)).count(), 1);
        }
        assert!(Shard::ALL.contains(17));
        assert_eq!(Shard::parse(" 2/8 ").unwrap().to_string(), "2/8");
        for bad in ["0/3", "4/3", "1", "a/b", "1/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shard_defaults_come_from_slurm_or_kubernetes() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|v| v.0 == k).map(|v| v.1.to_string())
        };
        let none = env(&[]);
        assert_eq!(Shard::resolve(None, None, &none).unwrap(), Shard::ALL);
        assert_eq!(
            Shard::resolve(Some("2/4"), None, &none)
                .unwrap()
                .to_string(),
            "2/4"
        );
        assert!(Shard::resolve(Some("2/4"), Some(3), &none).is_err());
        assert!(Shard::resolve(None, Some(4), &none).is_err());
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &slurm).unwrap().to_string(),
            "2/3"
        );
        let slurm0 = env(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &slurm0).unwrap().to_string(),
            "1/3"
        );
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &stepped).unwrap().to_string(),
            "3/3"
        );
        let no_count = env(&[("SLURM_ARRAY_TASK_ID", "1")]);
        assert!(Shard::resolve(None, None, &no_count)
            .unwrap_err()
            .to_string()
            .contains("--shards"));
        assert_eq!(
            Shard::resolve(None, Some(2), &no_count)
                .unwrap()
                .to_string(),
            "2/2"
        );
        // --shards agreeing with the array is fine; a resubmitted subset
        // (`--array=3,5` of 0-7 with --shards 8) would be shard 1/8 by
        // position: refused, naming the way out.
        assert_eq!(
            Shard::resolve(None, Some(3), &slurm).unwrap().to_string(),
            "2/3"
        );
        let subset = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ]);
        let e = Shard::resolve(None, Some(8), &subset)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 task(s)") && e.contains("--shard"), "{e}");
        let k8s = env(&[("JOB_COMPLETION_INDEX", "0")]);
        assert_eq!(
            Shard::resolve(None, Some(4), &k8s).unwrap().to_string(),
            "1/4"
        );
        assert!(Shard::resolve(None, None, &k8s)
            .unwrap_err()
            .to_string()
            .contains("--shards"));
        let k8s_big = env(&[("JOB_COMPLETION_INDEX", "4")]);
        assert!(Shard::resolve(None, Some(4), &k8s_big).is_err());
        let garbage = env(&[("SLURM_ARRAY_TASK_ID", "x")]);
        assert!(Shard::resolve(None, None, &garbage).is_err());
    }
}

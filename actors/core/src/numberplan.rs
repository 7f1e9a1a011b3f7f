//! Which trunks can carry a call to a number, in the order to try them.
//!
//! A node has several trunks toward the voice network. The number plan maps number
//! prefixes to trunk groups (longest prefix wins; with no plan every trunk serves every
//! number). Within a group, trunks that are up are tried by `priority` (lower first);
//! trunks of equal priority share calls by `weight`, in a weighted random order drawn
//! from a seed the driver passes in (so this stays a pure function, and a test can fix
//! the order). A call fails over to the next trunk of its list on 408, 5xx or no answer
//! ([`fails_over`]); when no trunk of the number's group is up, the voice network is down
//! for that number.

use std::sync::Arc;

/// Index of a trunk in the node's configuration.
pub type TrunkId = usize;

/// One trunk as the number plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkSpec {
    /// Name (logs, metrics, CDRs).
    pub name: String,
    /// Lower is tried first.
    pub priority: u32,
    /// Share of calls among trunks of equal priority (at least 1).
    pub weight: u32,
}

/// One row of the number plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberRoute {
    /// E.164 prefix (`+44`, `+1212`); empty matches every number.
    pub prefix: String,
    /// The trunk group serving it.
    pub trunks: Vec<TrunkId>,
}

/// Trunks and the prefix → trunk-group table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumberPlan {
    trunks: Vec<TrunkSpec>,
    /// Longest prefix first.
    routes: Vec<NumberRoute>,
}

impl NumberPlan {
    /// A plan over `trunks`; with no `routes`, every trunk serves every number.
    pub fn new(trunks: Vec<TrunkSpec>, mut routes: Vec<NumberRoute>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self { trunks, routes }
    }

    /// The trunks, by id.
    pub fn trunks(&self) -> &[TrunkSpec] {
        &self.trunks
    }

    /// A trunk's name (`"?"` for an id not in the plan).
    pub fn name(&self, id: TrunkId) -> &str {
        self.trunks.get(id).map_or("?", |t| t.name.as_str())
    }

    /// The trunk group for `number` (longest matching prefix), whatever their state.
    pub fn group(&self, number: &str) -> Vec<TrunkId> {
        if self.routes.is_empty() {
            return (0..self.trunks.len()).collect();
        }
        self.routes
            .iter()
            .find(|r| number.starts_with(&r.prefix))
            .map(|r| r.trunks.clone())
            .unwrap_or_default()
    }

    /// The trunks to try for `number`, in order: those of its group that are `up`, by
    /// priority, equal priorities in a weighted random order drawn from `seed`.
    pub fn candidates(&self, number: &str, up: &[bool], seed: u64) -> Vec<TrunkId> {
        let mut keyed: Vec<(u32, f64, TrunkId)> = self
            .group(number)
            .into_iter()
            .filter(|id| up.get(*id).copied().unwrap_or(false))
            .filter_map(|id| {
                let t = self.trunks.get(id)?;
                // Efraimidis–Spirakis: sorting by u^(1/w) descending draws a weighted
                // order without replacement.
                let u = unit(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                Some((t.priority, u.powf(1.0 / f64::from(t.weight.max(1))), id))
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        keyed.into_iter().map(|(_, _, id)| id).collect()
    }
}

/// A uniform number in (0, 1] from `x` (SplitMix64's finaliser).
fn unit(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// Whether a trunk's final answer sends the call on to the next trunk: no answer (408,
/// our own timeout) or a server failure (5xx). Anything else is the callee's answer
/// (busy, declined, not found) and would be the same on every trunk.
pub fn fails_over(code: u16) -> bool {
    code == 408 || (500..=599).contains(&code)
}

/// What a call knows of the trunks when it routes: the plan, which trunks are up, and
/// its own seed for the weighted order.
#[derive(Debug, Clone, Default)]
pub struct TrunkSnapshot {
    /// The plan.
    pub plan: Arc<NumberPlan>,
    /// Up or down, by trunk id.
    pub up: Vec<bool>,
    /// This call's draw for weighted ordering.
    pub seed: u64,
}

impl TrunkSnapshot {
    /// The trunks to try for `number`, in order.
    pub fn candidates(&self, number: &str) -> Vec<TrunkId> {
        self.plan.candidates(number, &self.up, self.seed)
    }

    /// Whether some trunk that can reach `number` is up (the voice network is up for it).
    pub fn reachable(&self, number: &str) -> bool {
        !self.candidates(number).is_empty()
    }

    /// One trunk, always up, serving every number (tests).
    pub fn single() -> Self {
        Self {
            plan: Arc::new(NumberPlan::new(
                vec![TrunkSpec {
                    name: "pstn".into(),
                    priority: 1,
                    weight: 1,
                }],
                Vec::new(),
            )),
            up: vec![true],
            seed: 0,
        }
    }

    /// No trunk at all (tests; a node without trunks).
    pub fn none() -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NumberPlan {
        let t = |name: &str, priority, weight| TrunkSpec {
            name: name.into(),
            priority,
            weight,
        };
        NumberPlan::new(
            vec![
                t("us-a", 1, 3),
                t("us-b", 1, 1),
                t("us-backup", 2, 1),
                t("uk", 1, 1),
                t("nyc", 1, 1),
            ],
            vec![
                NumberRoute {
                    prefix: "+1".into(),
                    trunks: vec![0, 1, 2],
                },
                NumberRoute {
                    prefix: "+44".into(),
                    trunks: vec![3],
                },
                NumberRoute {
                    prefix: "+1212".into(),
                    trunks: vec![4, 2],
                },
            ],
        )
    }

    #[test]
    fn longest_prefix_picks_the_group_and_unknown_numbers_have_none() {
        let p = plan();
        let all_up = [true; 5];
        let rows: &[(&str, &[TrunkId])] = &[
            ("+12125550100", &[4, 2]),
            ("+447700900123", &[3]),
            ("+33123456789", &[]),
        ];
        for (number, want) in rows {
            assert_eq!(p.candidates(number, &all_up, 7), *want, "{number}");
        }
        let us = p.candidates("+15550100", &all_up, 7);
        assert_eq!(us.len(), 3);
        assert_eq!(us[2], 2, "the backup (priority 2) comes last: {us:?}");
    }

    #[test]
    fn down_trunks_are_skipped_and_no_trunk_up_means_unreachable() {
        let p = Arc::new(plan());
        let mut up = vec![true; 5];
        up[4] = false;
        let s = TrunkSnapshot {
            plan: p.clone(),
            up: up.clone(),
            seed: 1,
        };
        assert_eq!(s.candidates("+12125550100"), vec![2]);
        up[2] = false;
        let s = TrunkSnapshot {
            plan: p,
            up,
            seed: 1,
        };
        assert!(!s.reachable("+12125550100"));
        // Other numbers still reach their own trunks.
        assert!(s.reachable("+447700900123"));
        assert!(s.reachable("+15550100"));
    }

    #[test]
    fn equal_priorities_share_calls_by_weight() {
        let p = plan();
        let up = [true; 5];
        let first_a = (0..10_000u64)
            .filter(|seed| p.candidates("+15550100", &up, *seed)[0] == 0)
            .count();
        // us-a has weight 3 against us-b's 1: first in ~75% of calls.
        assert!((7_000..8_000).contains(&first_a), "{first_a}");
        // Every order is a permutation of the group.
        for seed in 0..100 {
            let mut c = p.candidates("+15550100", &up, seed);
            c.sort_unstable();
            assert_eq!(c, vec![0, 1, 2]);
        }
    }

    #[test]
    fn without_a_plan_every_trunk_serves_every_number() {
        let p = NumberPlan::new(
            vec![
                TrunkSpec {
                    name: "b".into(),
                    priority: 2,
                    weight: 1,
                },
                TrunkSpec {
                    name: "a".into(),
                    priority: 1,
                    weight: 1,
                },
            ],
            Vec::new(),
        );
        assert_eq!(p.candidates("+33123", &[true, true], 0), vec![1, 0]);
        assert_eq!(p.name(1), "a");
        assert!(TrunkSnapshot::single().reachable("+1"));
        assert!(!TrunkSnapshot::none().reachable("+1"));
    }

    #[test]
    fn failover_codes() {
        for (code, want) in [
            (408, true),
            (500, true),
            (503, true),
            (504, true),
            (486, false),
            (404, false),
            (603, false),
            (488, false),
        ] {
            assert_eq!(fails_over(code), want, "{code}");
        }
    }
}

//! The standard workloads of contract §6.1, and the sim settings a spawned server runs with.

use std::time::Duration;

/// How the spawned server's simulated model behaves (its `--sim-*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sim {
    /// `--sim-ttft-ms`.
    pub ttft_ms: u64,
    /// `--sim-token-ms`; 0 is unpaced.
    pub token_ms: u64,
    /// `--sim-tokens`: token events per answer, which the tool then expects.
    pub tokens: u32,
}

impl Sim {
    /// How long one answer takes when the server keeps to the sim's pace.
    pub fn answer_time(&self) -> Duration {
        Duration::from_millis(
            self.ttft_ms + self.token_ms * u64::from(self.tokens.saturating_sub(1)),
        )
    }

    /// The sim a server started with extra flags `args` runs: a `--sim-ttft-ms`,
    /// `--sim-token-ms` or `--sim-tokens` among them (`--flag V` or `--flag=V`) replaces the
    /// workload's, so reports and the expected token count follow it. A value that does not
    /// parse is left to the server to refuse.
    pub fn with_server_args(mut self, args: &[String]) -> Sim {
        let value = |flag: &str| -> Option<u64> {
            crate::spawn::flag_value(args, flag).and_then(|v| v.parse().ok())
        };
        if let Some(v) = value("--sim-ttft-ms") {
            self.ttft_ms = v;
        }
        if let Some(v) = value("--sim-token-ms") {
            self.token_ms = v;
        }
        if let Some(v) = value("--sim-tokens") {
            self.tokens = u32::try_from(v).unwrap_or(self.tokens);
        }
        self
    }

    /// One line for reports: "TTFT 0 ms, 64 tokens 20 ms apart".
    pub fn describe(&self) -> String {
        let pace = if self.token_ms == 0 {
            "unpaced".to_string()
        } else {
            format!("{} ms apart", self.token_ms)
        };
        format!(
            "sim TTFT {} ms, {} tokens {pace}",
            self.ttft_ms, self.tokens
        )
    }
}

/// A named load: what the server simulates and how hard the tool pushes.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// `A`..`D`, or `custom`.
    pub name: String,
    /// What the workload shows, for the report.
    pub title: String,
    /// The spawned server's sim settings.
    pub sim: Sim,
    /// Closed-loop concurrency.
    pub concurrency: u32,
    /// The measured window.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Slots start spread over this time (at most the warm-up), so answers do not begin and
    /// end in lockstep for the whole run.
    pub ramp: Duration,
}

/// The standard workload named `name` (case-insensitive), per contract §6.1.
///
/// Where the contract gives no warm-up (B, C), one is chosen: 2 s for B; for C, one answer's
/// length (10 s), which is how long 5000 slots take to ramp up evenly.
pub(crate) fn standard(name: &str) -> Option<Workload> {
    let a_sim = Sim {
        ttft_ms: 0,
        token_ms: 20,
        tokens: 64,
    };
    let w = match name.to_ascii_uppercase().as_str() {
        "A" => Workload {
            name: "A".into(),
            title: "latency under load".into(),
            sim: a_sim,
            concurrency: 1000,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            ramp: a_sim.answer_time(),
        },
        "B" => Workload {
            name: "B".into(),
            title: "saturation".into(),
            sim: Sim {
                ttft_ms: 0,
                token_ms: 0,
                tokens: 256,
            },
            concurrency: 64,
            duration: Duration::from_secs(15),
            warmup: Duration::from_secs(2),
            ramp: Duration::ZERO,
        },
        "C" => Workload {
            name: "C".into(),
            title: "scale".into(),
            sim: Sim {
                ttft_ms: 0,
                token_ms: 1000,
                tokens: 10,
            },
            concurrency: 5000,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(10),
            ramp: Duration::from_secs(9),
        },
        "D" => Workload {
            name: "D".into(),
            title: "low load".into(),
            sim: a_sim,
            concurrency: 10,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            ramp: a_sim.answer_time(),
        },
        _ => return None,
    };
    Some(w)
}

/// The workloads a `--workload` value names: one letter, a comma list, or `all`.
pub fn parse_list(value: &str) -> Result<Vec<Workload>, String> {
    let names: Vec<&str> = if value.eq_ignore_ascii_case("all") {
        vec!["A", "B", "C", "D"]
    } else {
        value.split(',').map(str::trim).collect()
    };
    names
        .into_iter()
        .map(|n| {
            standard(n).ok_or_else(|| format!("unknown workload `{n}` (use A, B, C, D or all)"))
        })
        .collect()
}

impl Workload {
    /// The `--quick` version: a short, light smoke run with the same shape.
    pub fn quick(mut self) -> Self {
        self.concurrency = self.concurrency.min(8);
        self.sim.tokens = self.sim.tokens.min(16);
        self.sim.token_ms = self.sim.token_ms.min(5);
        self.duration = Duration::from_secs(2);
        self.warmup = Duration::from_millis(500);
        self.ramp = self.ramp.min(self.warmup);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_workloads() {
        let a = standard("a").unwrap();
        assert_eq!(
            (a.concurrency, a.sim.tokens, a.sim.token_ms, a.sim.ttft_ms),
            (1000, 64, 20, 0)
        );
        assert_eq!(
            (a.duration, a.warmup),
            (Duration::from_secs(20), Duration::from_secs(3))
        );
        let b = standard("B").unwrap();
        assert_eq!((b.concurrency, b.sim.tokens, b.sim.token_ms), (64, 256, 0));
        assert_eq!(b.duration, Duration::from_secs(15));
        let c = standard("C").unwrap();
        assert_eq!(
            (c.concurrency, c.sim.tokens, c.sim.token_ms),
            (5000, 10, 1000)
        );
        let d = standard("D").unwrap();
        assert_eq!((d.concurrency, d.sim), (10, a.sim));
        assert!(standard("E").is_none());
        for w in [a, b, c, d] {
            assert!(w.ramp <= w.warmup, "{}", w.name);
        }
    }

    #[test]
    fn lists() {
        let names = |v: &str| -> Vec<String> {
            parse_list(v).unwrap().into_iter().map(|w| w.name).collect()
        };
        assert_eq!(names("all"), ["A", "B", "C", "D"]);
        assert_eq!(names("d, a"), ["D", "A"]);
        assert!(parse_list("A,X").is_err());
    }

    #[test]
    fn server_args_override_the_sim() {
        let sim = standard("D").unwrap().sim;
        let args: Vec<String> = [
            "--quota-store",
            "memory",
            "--sim-tokens",
            "32",
            "--sim-token-ms=5",
        ]
        .map(String::from)
        .to_vec();
        let over = sim.with_server_args(&args);
        assert_eq!((over.ttft_ms, over.token_ms, over.tokens), (0, 5, 32));
        assert_eq!(sim.with_server_args(&[]), sim);
        assert_eq!(sim.with_server_args(&["--sim-tokens=x".into()]), sim);
    }

    #[test]
    fn quick_is_small() {
        let q = standard("C").unwrap().quick();
        assert!(q.concurrency <= 8 && q.sim.tokens <= 16 && q.sim.token_ms <= 5);
        assert!(q.duration <= Duration::from_secs(2) && q.ramp <= q.warmup);
    }
}

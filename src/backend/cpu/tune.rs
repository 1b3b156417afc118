//! Start-up autotune of the F16 kernels: which instruction set, how many weight panels a decode
//! call streams side by side, and which tile shapes batched decode and prefill use — measured on
//! the machine the process runs on, because the best choice differs between CPUs (docs/benchmarks.md,
//! "CPU engine at the bandwidth limit on the AMD EPYC").
//!
//! The measurement takes 0.3–0.6 s on 2 threads: every candidate runs on the backend's own threads, on a 64 MiB
//! matrix for the memory-bound calls (one token, eight tokens: weights stream from DRAM as in a
//! real decode step) and on a cache-resident one for prefill tiles, in interleaved rounds; the
//! fastest median wins. The result is cached per CPU (model name, the flags the kernels use,
//! thread count) in `cpu-kernels.json` under the cache directory (`$SEEDANCE_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/seedance`, else `~/.cache/seedance`), so later starts read it; the choice is
//! logged either way. Debug builds do not measure unless `SEEDANCE_CPU_TUNE` is set.
//! `SEEDANCE_CPU_TUNE=fresh` measures again (and rewrites the entry),
//! `SEEDANCE_CPU_TUNE=off` uses [`F16Kernel::default_for`] without measuring, and
//! `SEEDANCE_CPU_TUNE=avx512,8,3x8,4x6` (ISA, decode panels, small tile, large tile) sets a choice. One process tunes
//! once per thread count, however many backends it builds.
//!
//! Every candidate computes the same sums in the same order (each output is accumulated over k
//! sequentially, whatever the tile), so the choice changes speed, never results.

use super::matmul::{self, F16Kernel, Isa};
use super::team::Team;
use crate::backend::Weight;
use half::f16;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

/// The F16 kernels for this machine and thread count: cached, measured or default (see the
/// module doc). `team` is the backend's, where the candidates run.
pub fn f16_kernel(isa: Isa, team: &Team) -> F16Kernel {
    let threads = team.threads();
    static DONE: Mutex<Vec<(usize, F16Kernel)>> = Mutex::new(Vec::new());
    let mode = std::env::var("SEEDANCE_CPU_TUNE").unwrap_or_default();
    // Unoptimised builds (tests, `cargo run`) would time unoptimised kernels: defaults there.
    if mode == "off" || isa == Isa::Portable || (cfg!(debug_assertions) && mode.is_empty()) {
        return F16Kernel::default_for(isa);
    }
    if let Some(k) = F16Kernel::parse(&mode) {
        if k.is_supported() && k.isa.rank() <= isa.rank() {
            tracing::info!(kernel = ?k, "cpu kernels: set by SEEDANCE_CPU_TUNE");
            return k;
        }
        tracing::warn!(value = %mode, "SEEDANCE_CPU_TUNE: not a kernel this CPU runs; tuning");
    }
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, k)) = done.iter().find(|(t, _)| *t == threads) {
        return k;
    }
    let key = cpu_key(isa, threads);
    let path = cache_dir().map(|d| d.join("cpu-kernels.json"));
    let cached = match (&path, mode.as_str()) {
        (Some(p), m) if m != "fresh" => read_cache(p)
            .remove(&key)
            .filter(|k| k.is_supported() && k.isa.rank() <= isa.rank()),
        _ => None,
    };
    let kernel = match cached {
        Some(k) => {
            tracing::info!(cpu = %key, kernel = ?k, "cpu kernels: cached choice");
            k
        }
        None => {
            let started = Instant::now();
            let (k, report) = measure(isa, team, 1);
            tracing::info!(
                cpu = %key,
                kernel = ?k,
                took_ms = started.elapsed().as_millis() as u64,
                measured = %report,
                "cpu kernels: tuned"
            );
            if let Some(p) = &path {
                write_cache(p, &key, k);
            }
            k
        }
    };
    done.push((threads, kernel));
    kernel
}

/// The cache key: CPU model name, the instruction-set flags the kernels use, thread count.
fn cpu_key(isa: Isa, threads: usize) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map_or("?", |(_, v)| v.trim())
    };
    let family = format!("family {} model {}", field("cpu family"), field("model"));
    format!("{model} [{family}] {isa:?} threads={threads}")
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SEEDANCE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("seedance"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("seedance"))
}

fn read_cache(path: &std::path::Path) -> HashMap<String, F16Kernel> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Adds `key` to the cache file (written whole to a temporary file, then renamed); a cache that
/// cannot be written only costs the next start another measurement.
fn write_cache(path: &std::path::Path, key: &str, k: F16Kernel) {
    let mut all = read_cache(path);
    all.insert(key.to_string(), k);
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    let res = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| {
            let body = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
            std::fs::write(&tmp, body)
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %path.display(), error = %e, "cpu kernels: cache not written");
    }
}

/// Rounds over all candidates of one kind (interleaved, so a neighbour's burst of load hits
/// every candidate alike).
const ROUNDS: usize = 5;

/// Measures every candidate; returns the fastest of each kind and a one-line report (µs).
/// `shrink` divides the matrices' rows (tests measure small ones).
fn measure(isa: Isa, team: &Team, shrink: usize) -> (F16Kernel, String) {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.rank() <= isa.rank())
        .collect();
    // 64 MiB of weights (65,536 rows × 512 columns, F16): far beyond any L3
    // share a thread gets, so a call streams them from memory as a decode step does.
    let big = filled(65_536 / shrink, 512);
    // Prefill tiles: a cache-resident matrix (as a panel group stays in L2 while the tokens
    // pass), 96 tokens (a multiple of every tile width).
    let mid = filled((768 / shrink).max(48), 896);
    let base = F16Kernel::default_for(isa);
    let mut report = Vec::new();
    let mut pick = |cands: Vec<F16Kernel>, w: &Weight, n: usize, what: &str| -> F16Kernel {
        let x: Vec<f32> = (0..n * w.cols).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; n * w.rows];
        let mut run = |k: F16Kernel| {
            let t = Instant::now();
            matmul::matmul(isa, k, team, &x, w, &mut y);
            t.elapsed().as_secs_f64()
        };
        run(cands[0]); // first touch of x, y, and of the pool's threads
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); cands.len()];
        for _ in 0..ROUNDS {
            for (i, &k) in cands.iter().enumerate() {
                times[i].push(run(k));
            }
        }
        let med: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
            .collect();
        let best = (0..cands.len())
            .min_by(|&a, &b| med[a].total_cmp(&med[b]))
            .unwrap_or(0);
        let parts: Vec<String> = cands
            .iter()
            .zip(&med)
            .map(|(k, m)| format!("{}={:.0}", label(k, n), m * 1e6))
            .collect();
        report.push(format!("{what}: {}", parts.join(" ")));
        cands[best]
    };
    let decode = pick(
        isas.iter()
            .flat_map(|&i| {
                let panels: &[usize] = if i == Isa::Avx512 {
                    &[2, 4, 8]
                } else {
                    &[2, 4]
                };
                panels.iter().map(move |&p| F16Kernel {
                    isa: i,
                    decode_panels: p,
                    ..F16Kernel::default_for(i)
                })
            })
            .collect(),
        &big,
        1,
        "decode",
    );
    let tiles = |shapes: &[(usize, usize)]| -> Vec<F16Kernel> {
        let mut v: Vec<F16Kernel> = Vec::new();
        for &i in &isas {
            if i == Isa::Avx512 {
                v.extend(shapes.iter().map(|&s| F16Kernel {
                    isa: i,
                    small: s,
                    large: s,
                    ..base
                }));
            } else {
                v.push(F16Kernel::default_for(i));
            }
        }
        v
    };
    let small = pick(tiles(&[(2, 8), (3, 8), (4, 4)]), &big, 8, "batch8");
    let large = pick(tiles(&[(2, 12), (3, 8), (4, 6)]), &mid, 96, "prefill");
    // One ISA for all F16 calls (a kernel choice has one): AVX2 where it won at least two of
    // the three kinds, else the machine's; each kind keeps its winner's shape where the winner
    // ran under that ISA, else that ISA's default.
    let avx2_wins = [decode.isa, small.isa, large.isa]
        .iter()
        .filter(|&&i| i == Isa::Avx2)
        .count();
    let chosen = if avx2_wins >= 2 { Isa::Avx2 } else { isa };
    let base = F16Kernel::default_for(chosen);
    let keep = |winner: &F16Kernel| winner.isa == chosen;
    let k = F16Kernel {
        isa: chosen,
        decode_panels: if keep(&decode) {
            decode.decode_panels
        } else {
            base.decode_panels
        },
        small: if keep(&small) {
            small.small
        } else {
            base.small
        },
        large: if keep(&large) {
            large.large
        } else {
            base.large
        },
    };
    (k, report.join("; "))
}

fn label(k: &F16Kernel, n: usize) -> String {
    let isa = match k.isa {
        Isa::Avx512 => "avx512",
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    };
    match n {
        1 => format!("{isa}/{}p", k.decode_panels),
        2..=8 => format!("{isa}/{}x{}", k.small.0, k.small.1),
        _ => format!("{isa}/{}x{}", k.large.0, k.large.1),
    }
}

fn filled(rows: usize, cols: usize) -> Weight {
    Weight::new(
        rows,
        cols,
        (0..rows * cols)
            .map(|i| f16::from_f32(((i % 17) as f32 - 8.0) * 1e-3))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measuring_picks_a_supported_kernel_and_reports_every_candidate() {
        let isa = Isa::detect();
        if isa == Isa::Portable {
            return;
        }
        let team = Team::new(2);
        let (k, report) = measure(isa, &team, 64);
        assert!(k.is_supported() && k.isa.rank() <= isa.rank(), "{k:?}");
        for kind in ["decode:", "batch8:", "prefill:"] {
            assert!(report.contains(kind), "{report}");
        }
        assert!(report.contains("avx2/2p="), "{report}");
    }

    #[test]
    fn the_cache_round_trips_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("seedance-tune-{}", std::process::id()));
        let path = dir.join("cpu-kernels.json");
        let k = F16Kernel {
            decode_panels: 4,
            ..F16Kernel::default_for(Isa::Avx2)
        };
        write_cache(&path, "cpu A", k);
        write_cache(&path, "cpu B", F16Kernel::default_for(Isa::Portable));
        let all = read_cache(&path);
        assert_eq!(all.get("cpu A"), Some(&k));
        assert_eq!(all.len(), 2);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read_cache(&path).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kernel_strings_parse() {
        let k = F16Kernel::parse("avx512,8,3x8,4x6").unwrap();
        assert_eq!(
            (k.isa, k.decode_panels, k.small, k.large),
            (Isa::Avx512, 8, (3, 8), (4, 6))
        );
        assert!(k.is_supported());
        assert!(!F16Kernel::parse("avx512,8,4x8,4x6").unwrap().is_supported());
        assert!(F16Kernel::parse("sse,2,1x6,1x6").is_none());
        assert!(F16Kernel::parse("avx2,2").is_none());
    }
}

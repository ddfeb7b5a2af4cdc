//! Stable smoke run of the fuzz targets (tests/fuzz; the real fuzzing needs nightly and
//! `cargo fuzz run <target> --fuzz-dir tests/fuzz`): each target function is fed edge cases
//! plus a few thousand inputs from a deterministic RNG, mutated from valid seeds, and must not
//! panic (the functions also assert round-trip invariants).

#[path = "../fuzz/src/lib.rs"]
mod targets;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("parse_duration", targets::parse_duration),
    ("event_parse", targets::event_parse),
    ("ids", targets::ids),
    ("task_payload", targets::task_payload),
    ("tool_arguments", targets::tool_arguments),
];

const SEEDS: &[&str] = &[
    "",
    "0",
    "5ms",
    "30s",
    "2m",
    "1h",
    "1.5s",
    "-5s",
    "18446744073709551615s",
    "999999999999999999999h",
    "1e309s",
    "NaN",
    "inf ms",
    "  10 s ",
    "1s2ms",
    "12345",
    "-1",
    "00000000-0000-0000-0000-000000000000",
    "6f1c2b1e-8a4e-4c0b-9b1a-0d2f3c4e5a6b",
    "'; DROP TABLE pgcrew.tasks; --",
    "租户-ü-🚀",
    "a\u{0}b",
    "{\"run_id\":\"6f1c2b1e-8a4e-4c0b-9b1a-0d2f3c4e5a6b\",\"tenant_id\":\"t\",\"from\":\"pending\",\"to\":\"running\"}",
    "{\"run_id\":\"6f1c2b1e-8a4e-4c0b-9b1a-0d2f3c4e5a6b\",\"seq\":9223372036854775807}",
    "{\"instance_id\":\"i-1\"}",
    "{\"name\":\"default\",\"leader_id\":\"x\",\"term\":-1}",
    "{\"queue\":\"default\"}",
    "{\"order_id\":\"A-1\",\"qty\":3,\"tags\":[\"x\"]}",
    "{\"order_id\":\"\",\"qty\":0,\"kind\":\"c\",\"extra\":1}",
    "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}\n{\"a\":1.5}",
    "{\"type\":\"object\",\"required\":[\"a\"],\"additionalProperties\":false}\n{}",
    "{\"type\":[\"string\",\"null\"],\"enum\":[1,null]}\nnull",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "{\"a\":\"\\ud800\"}",
    "1e400",
    "-0",
    "\"\\u0000\"",
];

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..6) {
        match rng.u8(0..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            1 => {
                let i = rng.usize(0..=v.len());
                let b = *rng
                    .choice(b"{}[]\",:0123456789-.eE sms\\u\n\0".iter())
                    .unwrap_or(&b'x');
                v.insert(i, b);
            }
            2 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v.remove(i);
            }
            3 => {
                let other = SEEDS[rng.usize(0..SEEDS.len())].as_bytes();
                let i = rng.usize(0..=v.len());
                v.splice(i..i, other.iter().copied());
            }
            _ => {
                let n = rng.usize(0..16);
                v.extend((0..n).map(|_| rng.u8(..)));
            }
        }
    }
    v
}

#[test]
fn every_fuzz_target_survives_edge_cases_and_random_inputs() {
    // A payload just over and just under the task payload limit.
    let limit = pgcrew::queue::MAX_PAYLOAD_BYTES;
    let over = format!("\"{}\"", "x".repeat(limit));
    let under = format!("\"{}\"", "x".repeat(limit - 2));
    let mut rng = fastrand::Rng::with_seed(0x5eed_f022);
    for (name, target) in TARGETS {
        for s in SEEDS {
            target(s.as_bytes());
        }
        target(over.as_bytes());
        target(under.as_bytes());
        for _ in 0..3000 {
            let input = if rng.u8(0..10) == 0 {
                (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
            } else {
                let seed = SEEDS[rng.usize(0..SEEDS.len())].as_bytes();
                mutate(&mut rng, seed)
            };
            let r = std::panic::catch_unwind(|| target(&input));
            assert!(
                r.is_ok(),
                "fuzz target {name} panicked on {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
}

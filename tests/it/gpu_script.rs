//! The device benchmark script (`benches/gpu/run.sh`) in its CPU fallback:
//! the same steps as on the GPU (random checkpoint in the real key layout,
//! `gpu-bench run`, `gpu-bench product` on the toy world, `gpu-bench
//! report`) on the tiny configs, so the script
//! and the hidden command cannot rot between GPU draws. The PyTorch side is
//! skipped unless `EPS2V_TEST_PYTHON` names a Python with torch, diffusers
//! and transformers; then its sections are checked too.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn row<'a>(rows: &'a [Value], metric: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["metric"].as_str().is_some_and(|m| m.contains(metric)))
        .unwrap_or_else(|| panic!("no row {metric:?} in {rows:#?}"))
}

#[test]
fn gpu_bench_script_cpu_fallback_writes_the_ratio_table() {
    let dir = tempfile::tempdir().unwrap();
    let (work, out) = (dir.path().join("work"), dir.path().join("out"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("EPS2V_TEST_PYTHON").ok();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("benches/gpu/run.sh"))
        .args(["--cpu", "--bin", env!("CARGO_BIN_EXE_eps2v")])
        .arg("--work")
        .arg(&work)
        .arg("--out")
        .arg(&out);
    match &python {
        Some(py) => cmd.args(["--python", py]),
        None => cmd.arg("--no-reference"),
    };
    let o = cmd.env_remove("OUT").output().unwrap();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{log}");
    assert!(log.contains("targets met"), "{log}");

    let j: Value =
        serde_json::from_slice(&std::fs::read(out.join("gpu_bench.json")).unwrap()).unwrap();
    for f in ["table.md", "ours.log", "weights.log", "ours.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let ours = &j["ours"];
    assert_eq!(ours["device"], "cpu");
    assert_eq!(ours["unet_config"], "tiny");
    assert_eq!(ours["unet_check"]["finite"], true);
    let rows = j["rows"].as_array().unwrap();
    // The golden tiny models pass on the CPU in f32, f16 and bf16.
    let golden: Vec<&Value> = rows
        .iter()
        .filter(|r| r["metric"].as_str().unwrap().starts_with("golden"))
        .collect();
    assert_eq!(golden.len(), 5, "{rows:#?}");
    assert!(golden.iter().all(|r| r["met"] == true), "{golden:#?}");
    // The fused-forms A/B ran (one path on the CPU: no difference).
    let ab = row(rows, "fused forms vs composites");
    assert_eq!(
        (ab["ours"].as_f64(), &ab["met"]),
        (Some(0.0), &Value::Bool(true)),
        "{ab}"
    );
    for m in [
        "CFG, batch 1",
        "CFG, batch 2",
        "step, out+OUT08",
        "step, full",
        "forms off",
    ] {
        let r = row(rows, m);
        assert!(r["ours"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    let sel = ours["train"].as_array().unwrap();
    assert!(sel.iter().all(|s| s["error"].is_null()), "{sel:#?}");
    assert!(sel[0]["params"].as_u64().unwrap() < sel[1]["params"].as_u64().unwrap());
    // The whole UNet's step recomputes its blocks (gradient checkpointing).
    assert_eq!(
        (&sel[0]["recomputed"], &sel[1]["recomputed"]),
        (&Value::Bool(false), &Value::Bool(true))
    );
    assert!(row(rows, "ours with gradient checkpointing")["ours"]
        .as_f64()
        .is_some_and(|v| v > 0.0));

    // The user's commands on the toy world, each checked by its report; on
    // the CPU the "device" images are the CPU's, bit for bit.
    let p: Value =
        serde_json::from_slice(&std::fs::read(out.join("product.json")).unwrap()).unwrap();
    let steps = p["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 12, "{p:#}");
    assert!(steps.iter().all(|s| s["ok"] == true), "{p:#}");
    assert_eq!(
        (
            p["sample_device_vs_cpu"].as_f64(),
            p["diagnose_device_vs_cpu"].as_f64()
        ),
        (Some(0.0), Some(0.0))
    );
    let train = row(rows, "toy `train` (cpu)");
    assert_eq!(train["met"], true, "{train}");
    assert_eq!(
        row(rows, "toy `sample` mean pixel, device vs CPU")["met"],
        true
    );

    if python.is_some() {
        let r = &j["reference"];
        assert!(r["error"].is_null(), "{}", r["error"]);
        // Same file, same inputs, f32 on the CPU: the two UNets agree.
        let e = row(rows, "ours f32 vs diffusers f32");
        assert!(e["ours"].as_f64().unwrap() < 1e-4, "{e}");
        assert!(row(rows, "batch 1")["reference"].as_f64().is_some());
        for (a, b) in sel.iter().zip(r["train"].as_array().unwrap()) {
            assert_eq!(a["params"], b["params"], "trainable parameters differ");
        }
    } else {
        assert!(j["reference"].is_null());
    }
}

//! The conversion, measured (long version of the test
//! `train::tests::the_conversion_works_as_a_number`, same code:
//! `train::testkit::conversion`):
//! `cargo bench --profile dev --bench convert [-- --eps-steps N --v-steps N --back-steps N --lr X --tiny --eps-plain --sample-steps N]`.
//!
//! A small SDXL-shaped UNet (`testkit::micro_unet()`, or with `--tiny`
//! `UNetConfig::tiny()`; seeded random weights, a VAE rescaled to
//! unit-variance latents) is trained from scratch with the eps objective
//! (min-SNR-γ 5 unless `--eps-plain`) on four 64×64 coloured shapes (one
//! caption each) through the real pipeline (import → bucket → `train`);
//! then converted with `--objective v --ztsnr` (plain v-MSE), then back to
//! eps; and, for comparison, converted with min-SNR-γ v weighting
//! (zero weight at the ZTSNR step t = 999). The table is the mean relative squared distance of sampled latents
//! to each caption's training latent.

use eps2v::models::sdxl::UNetConfig;
use eps2v::train::testkit::{conversion, micro_unet, Conversion};

mod common;
use common::{arg, flag};

fn main() -> eps2v::Result<()> {
    eps2v::nn::tune_cpu_runtime();
    let d0 = Conversion::default();
    let c = Conversion {
        eps_steps: arg("--eps-steps", d0.eps_steps),
        v_steps: arg("--v-steps", d0.v_steps),
        back_steps: arg("--back-steps", d0.back_steps),
        lr: arg("--lr", d0.lr),
        eps_min_snr: !flag("--eps-plain"),
        sample_steps: arg("--sample-steps", d0.sample_steps),
        compare_v_min_snr: true,
    };
    let unet = if flag("--tiny") {
        UNetConfig::tiny()
    } else {
        micro_unet()
    };
    println!("{c:?}");
    eps2v::nn::on_pool(|| {
        let d = tempfile::tempdir().map_err(|e| eps2v::Error::io(std::env::temp_dir(), e))?;
        let r = conversion(d.path(), &unet, &c, |name, steps, s, loss| {
            println!(
                "{name}: {steps} steps in {s:.1} s ({:.1} ms/step), last loss {:.4}",
                1e3 * s / steps.max(1) as f64,
                loss.unwrap_or(f64::NAN)
            )
        })?;
        println!();
        println!("| model | distance to data (mean rel. sq. error of sampled latents) |");
        println!("|---|---|");
        for (n, v) in [
            ("eps model, sampled as eps", r.eps),
            (
                "same weights, sampled as v + ZTSNR (unconverted)",
                r.unconverted,
            ),
            ("converted, sampled as v + ZTSNR", r.converted),
            ("converted back, sampled as eps", r.back),
            (
                "converted with min-SNR-γ 5 instead of plain v-MSE, sampled as v + ZTSNR",
                r.converted_min_snr.unwrap_or(f64::NAN),
            ),
        ] {
            println!("| {n} | {v:.4} |");
        }
        Ok(())
    })
}

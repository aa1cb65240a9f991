//! Built-in template packs, embedded in the binary so that `eps2v generate`
//! works without any file: `toy` (`fixtures/prompts/toy/`, the toy world's
//! scenes as prompts) and `1girl` (`fixtures/prompts/1girl/`, made by
//! `fixtures/scripts/make_1girl_pack.py` from a public Danbooru tag list
//! with post counts; sources in that folder's README.md).

use super::WildcardSet;

/// Names of the built-in packs.
pub const NAMES: &[&str] = &["1girl", "toy"];

/// A built-in pack: a template and its wildcard files.
#[derive(Debug, Clone, Copy)]
pub struct Pack {
    /// Pack name.
    pub name: &'static str,
    /// Template text.
    pub template: &'static str,
    /// Wildcard files `(name, contents)`.
    pub files: &'static [(&'static str, &'static str)],
}

impl Pack {
    /// The wildcard files as a set (labelled `builtin:<name>/wildcards`).
    pub fn wildcards(&self) -> WildcardSet {
        WildcardSet::from_files(&format!("builtin:{}/wildcards", self.name), self.files)
    }

    /// Label of the template in messages.
    pub fn template_label(&self) -> String {
        format!("builtin:{}/template.txt", self.name)
    }
}

macro_rules! wildcard_files {
    ($dir:literal; $($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../fixtures/prompts/", $dir, "/wildcards/", $name, ".txt")))),*]
    };
}

const ONE_GIRL: Pack = Pack {
    name: "1girl",
    template: include_str!("../../fixtures/prompts/1girl/template.txt"),
    files: wildcard_files!("1girl";
        "accessory", "background", "clothing", "expression", "eyes", "framing", "gaze",
        "hair/bangs", "hair/colour", "hair/length", "hair/style", "lighting", "pose",
        "quality", "rating",
    ),
};

const TOY: Pack = Pack {
    name: "toy",
    template: include_str!("../../fixtures/prompts/toy/template.txt"),
    files: wildcard_files!("toy";
        "placement", "scene/black", "scene/blue", "scene/green", "scene/orange",
        "scene/purple", "scene/red", "scene/white", "scene/yellow", "shape", "style",
    ),
};

/// The built-in pack called `name`.
pub fn builtin(name: &str) -> Option<Pack> {
    match name {
        "1girl" => Some(ONE_GIRL),
        "toy" => Some(TOY),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, tidy, TemplateSpec};
    use super::*;
    use std::path::Path;

    /// The embedded pack is the folder's content, file for file.
    #[test]
    fn embedded_pack_equals_the_fixture_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/prompts/1girl");
        let disk = WildcardSet::load_dir(&dir.join("wildcards")).unwrap();
        let p = builtin("1girl").unwrap();
        let mem = p.wildcards();
        assert_eq!(
            disk.names().collect::<Vec<_>>(),
            mem.names().collect::<Vec<_>>()
        );
        for n in disk.names() {
            assert_eq!(
                disk.file(n).unwrap().contents,
                mem.file(n).unwrap().contents,
                "{n}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("template.txt")).unwrap(),
            p.template
        );
        // The file on disk and the built-in give the same prompts.
        let a = load(&TemplateSpec::File(dir.join("template.txt")), None).unwrap();
        let b = load(&TemplateSpec::Builtin("1girl".into()), None).unwrap();
        for i in 0..20 {
            assert_eq!(a.random(3, i), b.random(3, i));
        }
    }

    #[test]
    fn one_girl_prompts_look_like_danbooru_captions() {
        let t = load(&TemplateSpec::Builtin("1girl".into()), None).unwrap();
        assert_eq!(t.wildcards_used().len(), 15);
        let n = 400;
        let prompts: Vec<String> = (0..n).map(|i| tidy(&t.random(11, i))).collect();
        for p in &prompts {
            assert!(p.contains("1girl, solo, "), "{p}");
            assert!(
                !p.contains(", ,") && !p.contains('\n') && !p.contains("__"),
                "{p}"
            );
            assert!(p.contains(" hair,"), "hair length/colour: {p}");
            assert!(p.contains(" eyes") || p.contains("heterochromia"), "{p}");
        }
        // Weights follow post counts: long hair (4.35M posts) outnumbers
        // very short hair (21k) by far; blue eyes are the most common colour.
        let count = |s: &str| prompts.iter().filter(|p| p.contains(s)).count();
        assert!(count("long hair") > 150, "{}", count("long hair"));
        assert!(count("very short hair") < 10);
        assert!(count("blue eyes") > count("aqua eyes") * 3);
        // Optional parts are sometimes absent, sometimes present.
        let rated = count("general") + count("sensitive");
        assert!(
            rated > n as usize / 4 && rated < n as usize * 3 / 4,
            "{rated}"
        );
        let distinct: std::collections::HashSet<&String> = prompts.iter().collect();
        assert!(distinct.len() > 390, "{}", distinct.len());
    }
}

//! Writes the CRD YAML of the edgefleet API.
//!
//! `crdgen` prints every CRD to stdout; `crdgen --out DIR` writes one file per CRD;
//! `crdgen --check DIR` exits 1 when a file in DIR differs from the types.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("crdgen: {err}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let crds = edgefleet_crds::generated_crds()?;
    match args {
        [] => {
            for crd in &crds {
                print!("---\n{}", crd.yaml);
            }
            Ok(ExitCode::SUCCESS)
        }
        [flag, dir] if flag == "--out" => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir)?;
            for crd in &crds {
                std::fs::write(dir.join(&crd.file_name), &crd.yaml)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        [flag, dir] if flag == "--check" => {
            let mut drift = false;
            for crd in &crds {
                let path = PathBuf::from(dir).join(&crd.file_name);
                let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
                if on_disk != crd.yaml {
                    eprintln!(
                        "crdgen: {} is out of date; run `cargo run -p edgefleet-crds --bin crdgen -- --out {dir}`",
                        path.display()
                    );
                    drift = true;
                }
            }
            Ok(if drift {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        _ => Err("usage: crdgen [--out DIR | --check DIR]".into()),
    }
}

//! The benchmark's floor (`scripts/bench` runs it for information): a plain
//! single-threaded loop over a manifest's packages that reads each table from the
//! origin folder, checks its md5, writes it to a temporary name, renames it into
//! `data/_shared/`, and makes every reference a symlink. No journal, no state file,
//! no sync, no recovery: the least work a pull of that manifest can do on one core.
//!
//! `cargo run --release --example floor -- <origin folder> <destination>`
#![allow(clippy::disallowed_methods)] // a measuring stick, not the engine: plain std::fs

use std::io::Write;
use std::path::Path;

use md5::{Digest, Md5};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, origin, dst] = args.as_slice() else {
        return Err("usage: floor <origin folder> <destination>".into());
    };
    let (origin, dst) = (Path::new(origin), Path::new(dst));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(origin.join("manifest.json"))?)?;
    let shared = dst.join("data/_shared");
    std::fs::create_dir_all(&shared)?;
    let mut done = std::collections::HashSet::new();
    let packages = m["data_packages"].as_array().ok_or("no data_packages")?;
    for p in packages {
        let slug = p["slug"].as_str().ok_or("no slug")?;
        let dir = dst.join("data").join(slug);
        std::fs::create_dir_all(&dir)?;
        for t in p["tables"].as_array().ok_or("no tables")? {
            let id = t["id"].as_str().ok_or("no id")?;
            if done.insert(id.to_string()) {
                let url = t["parquet_url"].as_str().ok_or("no url")?;
                let bytes = std::fs::read(origin.join(url.trim_start_matches('/')))?;
                let md5 = format!("{:x}", Md5::digest(&bytes));
                if Some(md5.as_str()) != t["md5"].as_str() {
                    return Err(format!("{id}: md5 {md5}").into());
                }
                let tmp = shared.join(format!(".{id}.tmp"));
                std::fs::File::create(&tmp)?.write_all(&bytes)?;
                std::fs::rename(&tmp, shared.join(format!("{id}.parquet")))?;
            }
            let name = t["name"].as_str().ok_or("no name")?;
            std::os::unix::fs::symlink(
                format!("../_shared/{id}.parquet"),
                dir.join(format!("{name}.parquet")),
            )?;
        }
    }
    Ok(())
}

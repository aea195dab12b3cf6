//! The runtime is a library others embed: it must not pull in the exporter, the graph builder or
//! the command line's server stack.

use std::process::Command;

#[test]
fn runtime_depends_on_no_exporter_graph_builder_or_server() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "carrot-runtime", "--locked", "--offline"])
        .args([
            "--prefix",
            "none",
            "-e",
            "normal,build,dev",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"ort"),
        "cargo tree output unexpected:\n{tree}"
    );
    for banned in [
        "carrot-export",
        "carrot-graphs",
        "carrot",
        "axum",
        "tokio",
        "clap",
        "anyhow",
    ] {
        assert!(
            !crates.contains(&banned),
            "carrot-runtime depends on {banned}:\n{tree}"
        );
    }
}

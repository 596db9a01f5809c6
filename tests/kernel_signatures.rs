//! The host side of every kernel launch against the kernel's signature, read from the
//! sources: cudarc's launch builder does not know a kernel's parameters, so a launch
//! that pushes one argument too few or too many compiles and runs with garbage on the
//! GPU. Here, with no GPU: every `extern "C" __global__` kernel of `kernels/*.cu` is
//! launched by exactly one site in `src/gpu/*.rs`, each site fetches an existing kernel,
//! and pushes as many `.arg(…)`s as the kernel has parameters; and the kernels are the
//! ones `kernels/*.cu` lists in `gpu::module`'s table (checked by `kernels_compile.rs`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// Kernel name → parameter count, from every `extern "C" __global__` definition.
fn kernel_params(src: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + 1..];
        // Name: the identifier before the first '(' that is not __launch_bounds__'s.
        let mut head = rest;
        let open = loop {
            let p = head.find('(').expect("a parameter list");
            let before = head[..p].trim_end();
            if before.ends_with("__launch_bounds__") {
                let close = head[p..].find(')').expect("closing )") + p;
                head = &head[close + 1..];
                continue;
            }
            break p;
        };
        let name = head[..open]
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .rfind(|s| !s.is_empty())
            .expect("a kernel name")
            .to_string();
        let close = head[open..].find(')').expect("closing )") + open;
        let params = head[open + 1..close].trim();
        let n = if params.is_empty() {
            0
        } else {
            params.split(',').count()
        };
        assert!(
            out.insert(name.clone(), n).is_none(),
            "{name} defined twice"
        );
        rest = &head[close..];
    }
    out
}

/// (kernel name, `.arg(` count, file:line) of every launch site: from
/// `kernels().get("NAME")` to the next `.launch(`.
fn launch_sites(path: &Path, src: &str) -> Vec<(String, usize, String)> {
    let key = "kernels().get(\"";
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = src[at..].find(key) {
        let start = at + i + key.len();
        let end = src[start..].find('"').expect("closing quote") + start;
        let name = src[start..end].to_string();
        let launch = src[end..]
            .find(".launch(")
            .unwrap_or_else(|| panic!("{}: no launch after get({name})", path.display()))
            + end;
        let args = src[end..launch].matches(".arg(").count();
        let line = src[..start].lines().count();
        out.push((name, args, format!("{}:{line}", path.display())));
        at = launch;
    }
    out
}

#[test]
fn every_launch_pushes_one_argument_per_kernel_parameter() {
    let root = common::crate_root();
    let mut kernels = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("kernels")).expect("kernels/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "cu") {
            let src = std::fs::read_to_string(&path).expect("read .cu");
            kernels.extend(kernel_params(&src));
        }
    }
    assert!(kernels.len() >= 14, "found only {kernels:?}");
    let mut launched = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("src/gpu")).expect("src/gpu/") {
        let path = entry.expect("dir entry").path();
        let src = std::fs::read_to_string(&path).expect("read .rs");
        for (name, args, at) in launch_sites(&path, &src) {
            let Some(&params) = kernels.get(&name) else {
                panic!("{at}: launches {name}, which no kernels/*.cu defines");
            };
            assert_eq!(
                args, params,
                "{at}: {name} takes {params} parameters but the launch pushes {args} arguments"
            );
            *launched.entry(name).or_insert(0) += 1;
        }
    }
    for name in kernels.keys() {
        assert_eq!(
            launched.get(name),
            Some(&1),
            "{name}: expected exactly one launch site in src/gpu"
        );
    }
}

#[test]
fn the_parsers_read_what_they_claim() {
    let cu = "extern \"C\" __global__ void __launch_bounds__(256, 2) k1(const float* __restrict__ a,\n int n) {}\n\
              extern \"C\" __global__ void k2() {}\n\
              extern \"C\" __global__ void k3(double* x, long long n, float s) {}";
    let p = kernel_params(cu);
    assert_eq!(p.get("k1"), Some(&2));
    assert_eq!(p.get("k2"), Some(&0));
    assert_eq!(p.get("k3"), Some(&3));
    let rs = "let f = be.kernels().get(\"k1\")?;\nlet mut launch = s.launch_builder(f);\n\
              launch.arg(a).arg(&n);\nunsafe { launch.launch(cfg) }\n\
              let f = be.kernels().get(\"k3\")?;\nlaunch.arg(x);\nunsafe { launch.launch(cfg) }";
    let sites = launch_sites(Path::new("x.rs"), rs);
    assert_eq!(sites.len(), 2);
    assert_eq!((sites[0].0.as_str(), sites[0].1), ("k1", 2));
    assert_eq!((sites[1].0.as_str(), sites[1].1), ("k3", 1));
}

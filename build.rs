//! Build script.
//!
//! - feature `cuda`: compiles every `kernels/*.cu` with nvcc into ONE fatbin in OUT_DIR
//!   (SASS for sm_80, sm_86, sm_89, sm_90 and PTX for compute_80; `CUDA_COMPUTE_CAP=86`
//!   or `CUDA_COMPUTE_CAP=80,90` narrows the SASS list, PTX stays the lowest listed),
//!   embedded by `src/cuda.rs` with `include_bytes!`. ptxas `-v` register/spill lines are
//!   re-printed as `cargo:warning` so they show in every build. It also writes one
//!   self-contained source (headers inlined) for the NVRTC fallback.
//! - feature `emulate`: compiles `kernels/emu/*.cpp` (which include the same `.cu` files
//!   through the CUDA shim `kernels/emu/cuda_emu.h`) with the host C++ compiler,
//!   `-std=c++20 -O2 -pthread`. `R2SCP_EMU_TSAN=1` adds `-fsanitize=thread` (and links
//!   the ThreadSanitizer runtime into tests/binaries); use a separate CARGO_TARGET_DIR.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const NVCC_HELP: &str = "r2scp: feature `cuda` needs nvcc (CUDA toolkit 12.x or 13.0; cudarc 0.19 rejects toolkits newer than 13.4). \
Install the CUDA toolkit and put its bin/ on PATH (or set NVCC=/path/to/nvcc), or use the PyPI wheels in a venv:\n  \
python3 -m venv .venv-nvcc && .venv-nvcc/bin/pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-cccl==13.0.85 \
nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88\n  \
export PATH=\"$(echo $PWD/.venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin):$PATH\"\n\
(pin every wheel: unpinned, pip mixes a newer nvvm into an older nvcc and ptxas rejects the PTX)";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for v in [
        "R2SCP_EMU_TSAN",
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let kernels =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("kernels");
    // Track every file under kernels/ (headers too), not just the directory mtime.
    for f in walk(&kernels) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    if env::var_os("CARGO_FEATURE_EMULATE").is_some() {
        build_emulator(&kernels);
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda(&kernels);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn build_emulator(kernels: &Path) {
    let emu = kernels.join("emu");
    let mut files: Vec<PathBuf> = walk(&emu)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    files.sort();
    if files.is_empty() {
        return;
    }
    let tsan = env::var("R2SCP_EMU_TSAN").is_ok_and(|v| v == "1");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .opt_level(2)
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .include(kernels)
        .files(&files);
    if tsan {
        b.flag("-fsanitize=thread").flag("-g");
        println!("cargo:rustc-link-arg=-fsanitize=thread");
    }
    b.compile("r2scp_emu");
    if tsan {
        println!("cargo:rustc-link-lib=dylib=tsan");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let c = dir.join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let c = PathBuf::from(root).join("bin").join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    let c = PathBuf::from("/usr/local/cuda/bin/nvcc");
    c.is_file().then_some(c)
}

/// SASS targets: CUDA_COMPUTE_CAP ("86", "8.6" or a comma list) or the default set.
fn compute_caps() -> Vec<u32> {
    match env::var("CUDA_COMPUTE_CAP") {
        Ok(v) if !v.trim().is_empty() => {
            let caps: Vec<u32> = v
                .split(',')
                .map(|s| {
                    let s = s.trim().replace('.', "");
                    s.parse::<u32>().unwrap_or_else(|_| {
                        panic!("r2scp: CUDA_COMPUTE_CAP entry `{s}` is not a compute capability like 80 or 8.6")
                    })
                })
                .collect();
            caps
        }
        _ => vec![80, 86, 89, 90],
    }
}

/// One self-contained source for NVRTC: local headers inlined once, system headers kept.
fn inline_source(kernels: &Path, cu_files: &[PathBuf]) -> String {
    fn expand(path: &Path, kernels: &Path, seen: &mut Vec<PathBuf>, out: &mut String) {
        let canon = path.to_path_buf();
        if seen.contains(&canon) {
            return;
        }
        seen.push(canon);
        let text = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("r2scp: reading {}: {e}", path.display()));
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("#pragma once") {
                continue;
            }
            if let Some(rest) = t.strip_prefix("#include \"") {
                let name = rest.trim_end_matches('"');
                let dir = path.parent().unwrap_or(kernels);
                let inc = dir.join(name);
                if inc.starts_with(kernels.join("emu")) || name.starts_with("emu/") {
                    continue;
                }
                expand(&inc, kernels, seen, out);
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    let mut seen = Vec::new();
    let mut out =
        String::from("// generated by build.rs: every kernels/*.cu with its headers inlined\n");
    for f in cu_files {
        expand(f, kernels, &mut seen, &mut out);
    }
    out
}

fn build_cuda(kernels: &Path) {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let mut cu: Vec<PathBuf> = fs::read_dir(kernels)
        .expect("kernels/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    cu.sort();
    // One translation unit including every kernel file -> one module / fatbin.
    let mut all = String::new();
    for f in &cu {
        all.push_str(&format!("#include \"{}\"\n", f.display()));
    }
    let all_path = out_dir.join("r2scp_all_kernels.cu");
    fs::write(&all_path, all).expect("write r2scp_all_kernels.cu");
    fs::write(
        out_dir.join("r2scp_kernels_nvrtc.cu"),
        inline_source(kernels, &cu),
    )
    .expect("write nvrtc source");

    let Some(nvcc) = find_nvcc() else {
        panic!("{NVCC_HELP}");
    };
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let release = version
        .lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=R2SCP_NVCC_VERSION={release}");
    let caps = compute_caps();
    let lowest = *caps.iter().min().expect("at least one compute capability");
    let fatbin = out_dir.join("r2scp_kernels.fatbin");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-I")
        .arg(kernels);
    for c in &caps {
        cmd.arg(format!("-gencode=arch=compute_{c},code=sm_{c}"));
    }
    cmd.arg(format!(
        "-gencode=arch=compute_{lowest},code=compute_{lowest}"
    ));
    cmd.arg("-o").arg(&fatbin).arg(&all_path);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("r2scp: could not run {}: {e}\n{NVCC_HELP}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "r2scp: nvcc failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            stderr
        );
    }
    // ptxas -v: "Compiling entry function 'x' for 'sm_80'" then "Used N registers, ..."
    let mut entry = String::new();
    for line in stderr.lines() {
        if let Some(i) = line.find("Compiling entry function") {
            entry = line[i..].to_string();
        } else if (line.contains("Used") && line.contains("registers"))
            || line.contains("bytes stack frame")
        {
            println!("cargo:warning=ptxas {entry}: {}", line.trim());
        }
    }
    fs::write(out_dir.join("r2scp_ptxas.txt"), stderr.as_bytes()).expect("write ptxas log");
}

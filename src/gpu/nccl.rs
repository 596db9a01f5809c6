//! NCCL for the sums of a run sharded over GPU ranks (issue 14): one communicator over
//! the ranks of a [`Comm`], on the backend's stream, so that the sharded update's
//! allreduces (`Backend::allreduce_sum_f64` / `_f32`: C, L and AᵀU) run device to device
//! instead of through the host. libnccl is loaded at run time like the other CUDA
//! libraries (cudarc's `nccl` feature, dynamic loading); where it is missing, disabled
//! (`ENKF_NCCL=0`) or cannot join the ranks, every rank keeps the host-staged sums.
//!
//! Bootstrap: rank 0 draws the NCCL unique id (128 bytes) and the ranks share it through
//! one sum over `comm` (each byte as an f64, the others adding zeros: exact), then each
//! calls `ncclCommInitRank`. Every step is agreed over `comm`, so the ranks end with
//! NCCL on all of them or on none.
//!
//! **Not run on hardware yet** (no GPU was lent to the sessions that wrote it): the
//! one-rank path is in `tests/gpu_ranks.rs`; several GPUs are unverified.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};

use crate::dist::Comm;
use crate::train::ranks::any_rank;
use crate::{Error, Result};

/// An NCCL communicator and the rank and size it was made for.
#[derive(Debug)]
pub struct NcclGroup {
    comm: NcclComm,
    rank: usize,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the
// backend keeps it in a Mutex, so no two threads use it at once, and the stream it was
// made on (the backend's) lives as long as the backend.
unsafe impl Send for NcclGroup {}

/// Whether this process may use NCCL: libnccl loads and `ENKF_NCCL` is not `0`.
pub fn usable() -> std::result::Result<(), String> {
    if std::env::var("ENKF_NCCL").is_ok_and(|v| v == "0") {
        return Err("ENKF_NCCL=0".into());
    }
    // SAFETY: only tries to open the library by its usual names.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("libnccl is not installed".into());
    }
    Ok(())
}

/// This machine's name (`/proc/sys/kernel/hostname`, else `HOSTNAME`), to tell the
/// ranks' devices apart.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// A number below 2^53 (exact in an f64) naming one GPU of one machine: 32 bits of an
/// FNV-1a hash of `host`, then the device's PCI (domain, bus, device) ids. Two ranks
/// with the same key share a GPU, which one NCCL communicator does not allow.
pub fn device_key(host: &str, [domain, bus, device]: [u64; 3]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    ((h & 0xFFFF_FFFF) << 21) | ((domain & 0xFF) << 13) | ((bus & 0xFF) << 5) | (device & 0x1F)
}

/// Joins the ranks of `comm` in one NCCL communicator on `stream` (a collective: every
/// rank calls it with its GPU's [`device_key`]). `Ok(Err(reason))` when some rank cannot
/// use NCCL or two ranks share a GPU (every rank then keeps the host-staged sums).
///
/// Errors: the transport's.
pub fn join(
    comm: &dyn Comm,
    stream: &Arc<CudaStream>,
    key: u64,
) -> Result<std::result::Result<NcclGroup, String>> {
    let local = usable();
    if any_rank(comm, local.is_err())? {
        return Ok(Err(local
            .err()
            .unwrap_or_else(|| "another rank cannot use NCCL".into())));
    }
    // Every rank's GPU, to refuse NCCL before ncclCommInitRank when two share one.
    let mut keys = vec![0.0f64; comm.size()];
    keys[comm.rank()] = key as f64;
    comm.allreduce_sum_f64(&mut keys)?;
    let mut sorted = keys.clone();
    sorted.sort_by(f64::total_cmp);
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Ok(Err("two ranks share a GPU".into()));
    }
    // Rank 0's id (and whether it could draw one) to every rank.
    let mut shared = vec![0.0f64; 129];
    if comm.rank() == 0 {
        match Id::new() {
            Ok(id) => {
                for (s, &c) in shared.iter_mut().zip(id.internal().iter()) {
                    // c_char is i8 on x86_64 and u8 on aarch64 (GH200): the byte's bits.
                    #[allow(clippy::unnecessary_cast)]
                    let byte = c as u8;
                    *s = f64::from(byte);
                }
            }
            Err(_) => shared[128] = 1.0,
        }
    }
    comm.allreduce_sum_f64(&mut shared)?;
    if shared[128] != 0.0 {
        return Ok(Err("rank 0 could not draw an NCCL id".into()));
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, &s) in internal.iter_mut().zip(&shared) {
        #[allow(clippy::unnecessary_cast)]
        let byte = s as u8 as std::ffi::c_char;
        *c = byte;
    }
    let made = NcclComm::from_rank(
        stream.clone(),
        comm.rank(),
        comm.size(),
        Id::uninit(internal),
    );
    let failed = any_rank(comm, made.is_err())?;
    Ok(match made {
        Ok(c) if !failed => Ok(NcclGroup {
            comm: c,
            rank: comm.rank(),
            size: comm.size(),
        }),
        Ok(_) => Err("another rank could not join the NCCL communicator".into()),
        Err(e) => Err(format!("ncclCommInitRank: {e:?}")),
    })
}

/// Sums `buf` over the NCCL group in `slot` when it was made for `comm`'s rank and size:
/// `Ok(true)`; `Ok(false)` when there is none (the caller stages through the host).
///
/// Errors: [`Error::Cuda`] when NCCL fails.
pub fn all_reduce<T: cudarc::nccl::safe::NcclType + cudarc::driver::DeviceRepr>(
    slot: &Mutex<Option<NcclGroup>>,
    comm: &dyn Comm,
    buf: &mut CudaSlice<T>,
) -> Result<bool> {
    let guard = slot
        .lock()
        .map_err(|_| Error::Cuda("the NCCL communicator's lock is poisoned".into()))?;
    match guard.as_ref() {
        Some(g) if g.rank == comm.rank() && g.size == comm.size() => {
            g.comm
                .all_reduce_in_place(buf, &ReduceOp::Sum)
                .map_err(|e| Error::Cuda(format!("ncclAllReduce: {e:?}")))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_tell_gpus_and_machines_apart_and_are_exact_in_f64() {
        let a = device_key("node01", [0, 0x41, 0]);
        assert_eq!(a, device_key("node01", [0, 0x41, 0]));
        assert_ne!(a, device_key("node02", [0, 0x41, 0]));
        assert_ne!(a, device_key("node01", [0, 0x42, 0]));
        assert_ne!(a, device_key("node01", [1, 0x41, 0]));
        for k in [a, device_key("", [0xFF, 0xFF, 0x1F])] {
            assert!(k < (1u64 << 53));
            assert_eq!(k as f64 as u64, k);
        }
    }
}

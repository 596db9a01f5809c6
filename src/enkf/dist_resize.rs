//! Changing a sharded ensemble (issue 14): Algorithm 1's dropped and added members and
//! the redraw of failed members, with the shards rebalanced to [`Shard::of`] of the new
//! J, over nothing but the [`Comm`]'s allreduce.
//!
//! Every rank makes the same random choices as the one-process code of [`super::resize`]
//! (the same generator, drawn in the same order: the dropped indices, then the Gaussian
//! coefficients R), so a sharded run drops and draws the same members as a one-process
//! run and the two differ only by the order of the sums. A fresh row `R_i U` is a sum
//! over members: each rank multiplies the columns of R that belong to its members, and
//! the partial rows are summed over the ranks (count × P floats), so every rank holds
//! every fresh row. Rebalancing: each position p of the new global order has a holder
//! (the rank whose old rows hold it, or every rank for a fresh row), known to every rank
//! without communication; the rows whose holder is not their new owner are placed by
//! their holders into one zero buffer (moved × P) that is summed over the ranks. After
//! dropping a few members at random only a few rows move.

use super::resize::gaussian_draw_coefficients;
use crate::backend::{Backend, Trans};
use crate::dist::{Comm, Shard};
use crate::{Error, Result};
use rand::Rng;

/// Where the row at one position of the new global order is before rebalancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Row `row` of rank `rank`'s current buffer.
    Rank { rank: usize, row: usize },
    /// Row `row` of the fresh rows every rank holds.
    Fresh(usize),
}

/// The global indices, ascending, of the rows flagged by any rank (`local`: this rank's
/// row indices within `shard`, ascending), from one sum of J flags.
///
/// Errors: the transport's.
pub fn global_rows(comm: &dyn Comm, shard: Shard, local: &[usize]) -> Result<Vec<usize>> {
    let mut flags = vec![0.0f64; shard.members];
    for &i in local {
        flags[shard.first + i] = 1.0;
    }
    comm.allreduce_sum_f64(&mut flags)?;
    Ok(flags
        .iter()
        .enumerate()
        .filter(|(_, &f)| f > 0.0)
        .map(|(j, _)| j)
        .collect())
}

/// The rows `R U` (R: `count` × `cols.len()` host coefficients whose column c weighs the
/// global member `cols[c]`) on every rank: this rank's columns times its rows, summed
/// over the ranks.
fn fresh_rows<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    shard: Shard,
    u: &B::F32,
    params: usize,
    coef: &[f32],
    cols: &[usize],
) -> Result<B::F32> {
    let count = coef.len() / cols.len().max(1);
    let local: Vec<(usize, usize)> = cols
        .iter()
        .enumerate()
        .filter(|(_, g)| shard.range().contains(g))
        .map(|(c, &g)| (c, g - shard.first))
        .collect();
    let mut part = be.zeros_f32(count * params)?;
    if !local.is_empty() {
        let rows: Vec<usize> = local.iter().map(|&(_, r)| r).collect();
        let mine = super::resize::select_members(be, u, params, &rows)?;
        let r_loc: Vec<f32> = (0..count)
            .flat_map(|i| local.iter().map(move |&(c, _)| (i, c)))
            .map(|(i, c)| coef[i * cols.len() + c])
            .collect();
        let r_dev = be.upload_f32(&r_loc)?;
        be.gemm_f32(
            Trans::No,
            Trans::No,
            count,
            params,
            local.len(),
            1.0,
            &r_dev,
            &mine,
            0.0,
            &mut part,
        )?;
    }
    if comm.size() > 1 {
        let mut host = be.download_f32(&part)?;
        comm.allreduce_sum_f32(&mut host)?;
        be.write_f32(&host, &mut part)?;
    }
    Ok(part)
}

/// This rank's buffer of the new layout `Shard::of(sources.len(), rank, N)` from the
/// rows of `u` (this rank's current buffer) and `fresh` (rows every rank holds).
fn rebalance<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    u: &B::F32,
    fresh: Option<&B::F32>,
    params: usize,
    sources: &[Source],
) -> Result<(B::F32, Shard)> {
    let (rank, size) = (comm.rank(), comm.size());
    let members = sources.len();
    let shards = (0..size)
        .map(|q| Shard::of(members, q, size))
        .collect::<Result<Vec<_>>>()?;
    let owner = |p: usize| {
        shards
            .iter()
            .position(|s| s.range().contains(&p))
            .unwrap_or(0)
    };
    // Rows held by one rank but owned by another, in global order (the same list on
    // every rank).
    let moved: Vec<usize> = (0..members)
        .filter(|&p| matches!(sources[p], Source::Rank { rank: q, .. } if q != owner(p)))
        .collect();
    let mut carried = None;
    if !moved.is_empty() {
        let mut buf = be.zeros_f32(moved.len() * params)?;
        for (slot, &p) in moved.iter().enumerate() {
            if let Source::Rank { rank: q, row } = sources[p] {
                if q == rank {
                    be.copy_rows_f32(u, row, &mut buf, slot, 1, params)?;
                }
            }
        }
        let mut host = be.download_f32(&buf)?;
        comm.allreduce_sum_f32(&mut host)?;
        be.write_f32(&host, &mut buf)?;
        carried = Some(buf);
    }
    let mine = shards[rank];
    let mut out = be.zeros_f32(mine.count * params)?;
    for (i, p) in mine.range().enumerate() {
        match sources[p] {
            Source::Rank { rank: q, row } if q == rank => {
                be.copy_rows_f32(u, row, &mut out, i, 1, params)?
            }
            Source::Rank { .. } => {
                let slot = moved.binary_search(&p).map_err(|_| {
                    Error::Config(format!("internal: row {p} neither local nor carried"))
                })?;
                let buf = carried.as_ref().ok_or_else(|| {
                    Error::Config("internal: no carried rows to take a row from".into())
                })?;
                be.copy_rows_f32(buf, slot, &mut out, i, 1, params)?;
            }
            Source::Fresh(k) => {
                let f = fresh.ok_or_else(|| {
                    Error::Config("internal: a fresh row without fresh rows".into())
                })?;
                be.copy_rows_f32(f, k, &mut out, i, 1, params)?;
            }
        }
    }
    Ok((out, mine))
}

/// Where the old global member `g` of a layout of `members` over `ranks` ranks lives.
fn old_source(members: usize, ranks: usize, g: usize) -> Result<Source> {
    for q in 0..ranks {
        let s = Shard::of(members, q, ranks)?;
        if s.range().contains(&g) {
            return Ok(Source::Rank {
                rank: q,
                row: g - s.first,
            });
        }
    }
    Err(Error::Config(format!(
        "internal: member {g} is outside the {members} members"
    )))
}

/// Removes `count` members chosen as [`super::resize::drop_members`] chooses them (the
/// same draw of `rng` on every rank); returns this rank's new buffer and shard.
///
/// Errors: [`Error::Config`] when fewer than 2 members would remain or a rank would hold
/// none; the transport's and backend's errors.
pub fn drop_members<B: Backend, R: Rng>(
    be: &B,
    comm: &dyn Comm,
    u: &B::F32,
    shard: Shard,
    params: usize,
    count: usize,
    rng: &mut R,
) -> Result<(B::F32, Shard)> {
    let members = shard.members;
    if count + 2 > members || members - count < comm.size() {
        return Err(Error::Config(format!(
            "cannot drop {count} of {members} members: at least 2, and one per rank ({}), \
             must remain",
            comm.size()
        )));
    }
    let mut dropped = rand::seq::index::sample(rng, members, count).into_vec();
    dropped.sort_unstable();
    let sources = (0..members)
        .filter(|j| dropped.binary_search(j).is_err())
        .map(|g| old_source(members, comm.size(), g))
        .collect::<Result<Vec<_>>>()?;
    rebalance(be, comm, u, None, params, &sources)
}

/// Appends `count` members drawn from the whole ensemble's Gaussian as
/// [`super::resize::add_members`] draws them; returns this rank's new buffer and shard.
///
/// Errors: the transport's and backend's errors.
pub fn add_members<B: Backend, R: Rng>(
    be: &B,
    comm: &dyn Comm,
    u: &B::F32,
    shard: Shard,
    params: usize,
    count: usize,
    rng: &mut R,
) -> Result<(B::F32, Shard)> {
    let members = shard.members;
    let coef = gaussian_draw_coefficients(rng, count, members);
    let all: Vec<usize> = (0..members).collect();
    let fresh = fresh_rows(be, comm, shard, u, params, &coef, &all)?;
    let mut sources = (0..members)
        .map(|g| old_source(members, comm.size(), g))
        .collect::<Result<Vec<_>>>()?;
    sources.extend((0..count).map(Source::Fresh));
    rebalance(be, comm, u, Some(&fresh), params, &sources)
}

/// Replaces the members `failed` (global indices, ascending, the same on every rank) by
/// draws from the Gaussian of the others, as [`super::resize::resample_members`] does;
/// each rank writes the fresh rows of its own failed members.
///
/// Errors: [`Error::TooFewToResample`] when fewer than two members succeed; the
/// transport's and backend's errors.
pub fn resample_members<B: Backend, R: Rng>(
    be: &B,
    comm: &dyn Comm,
    u: &mut B::F32,
    shard: Shard,
    params: usize,
    failed: &[usize],
    rng: &mut R,
) -> Result<()> {
    let ok = super::resize::survivors(shard.members, failed)?;
    let coef = gaussian_draw_coefficients(rng, failed.len(), ok.len());
    let fresh = fresh_rows(be, comm, shard, u, params, &coef, &ok)?;
    for (i, &g) in failed.iter().enumerate() {
        if shard.range().contains(&g) {
            be.copy_rows_f32(&fresh, i, u, g - shard.first, 1, params)?;
        }
    }
    Ok(())
}

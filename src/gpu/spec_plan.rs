//! The launch plan of a layer-spec network's forward pass on the GPU: which kernel of
//! `kernels/spec.cu` (or which cuBLAS GEMM) runs per layer, on which buffers, with
//! which activation fused. Pure data, no CUDA: the CUDA backend executes it
//! (`gpu::spec_forward`), and the tests execute the same plan with the kernels' CPU
//! twins (`cpu::spec_kernels::run_plan`), so its buffers, strides, fusions and member
//! chunks are checked everywhere.
//!
//! Buffers: the shared images (`Input`, images × n_in, read with member stride 0), two
//! scratch buffers of chunk × images × [`NetSpec::max_activation_len`] values used in
//! turn (every op reads one and writes the other, so no op works in place), and the
//! chunk's rows of the output (`Out`, written by the last op only).
//!
//! Fusions: an activation joins the op before it when that op has none yet (conv2d,
//! pool, the bias step of a linear layer); `flatten` is a no-op (the values are already
//! channel-major); a linear layer is a GEMM, followed by a bias-and-activation step
//! when it has a bias or an activation follows. A max-pool after an activation sees the
//! activated values, as the definition has it (the CPU path pools first and activates
//! after, which gives the same values since every activation is monotone).

use crate::model::spec::{Layer, NetSpec, Shape};

/// Values per scratch buffer that a chunk of members aims at (128 Mi f32, 512 MiB): the
/// members of one forward pass run in chunks of at most this many activation values.
pub const SCRATCH_TARGET: usize = 128 << 20;

/// A buffer of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The shared images, images × n_in (member stride 0).
    Input,
    /// Scratch buffer 0 or 1, chunk × images × (the op's length).
    Scratch(usize),
    /// The chunk's rows of the output, chunk × images × n_out.
    Out,
}

/// Pooling mode (the `mode` argument of `spec_pool2d_f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// First maximum of the window.
    Max,
    /// Mean of the window.
    Avg,
}

impl PoolMode {
    /// The kernel's code.
    pub fn code(self) -> i32 {
        match self {
            PoolMode::Max => 0,
            PoolMode::Avg => 1,
        }
    }
}

/// The activation code of `kernels/common.cuh` for "none".
pub const ACT_NONE: i32 = -1;

/// What an op computes (offsets are into one member's P weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `spec_conv2d_f32`: input c × h × w, output co × oh × ow.
    Conv {
        /// Weight offset (co × c × k × k).
        w_off: usize,
        /// Bias offset (co values), if any.
        b_off: Option<usize>,
        /// Input channels, height, width.
        input: (usize, usize, usize),
        /// Output channels, height, width.
        output: (usize, usize, usize),
        /// Kernel side, stride, padding.
        window: (usize, usize, usize),
    },
    /// `spec_pool2d_f32` over `channels` planes of h × w per image.
    Pool {
        /// Mode.
        mode: PoolMode,
        /// Planes per image.
        channels: usize,
        /// Input height and width.
        input: (usize, usize),
        /// Output height and width.
        output: (usize, usize),
        /// Window side (= stride).
        k: usize,
    },
    /// One strided-batched GEMM: out (images × n) = in (images × f) · Wᵀ per member, W
    /// (n × f) at `w_off`.
    Linear {
        /// Weight offset.
        w_off: usize,
        /// Input features.
        f: usize,
        /// Output features.
        n: usize,
    },
    /// `spec_bias_act_f32` on `len` values per image, the bias (one per `plane`
    /// consecutive values) at `b_off` if any.
    BiasAct {
        /// Bias offset, if any.
        b_off: Option<usize>,
        /// Values per image.
        len: usize,
        /// Values sharing one bias entry (1 for linear layers).
        plane: usize,
    },
}

/// One launch of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecOp {
    /// The layer (index in the spec) whose work this is; a fused activation's time is
    /// its producer's.
    pub layer: usize,
    /// What it computes.
    pub kind: OpKind,
    /// Where it reads.
    pub src: Buf,
    /// Where it writes (never `src`).
    pub dst: Buf,
    /// The fused activation's code ([`ACT_NONE`] for none; a Linear op has none).
    pub act: i32,
}

impl SpecOp {
    /// Values per image that the op reads.
    pub fn in_len(&self) -> usize {
        match self.kind {
            OpKind::Conv {
                input: (c, h, w), ..
            } => c * h * w,
            OpKind::Pool {
                channels,
                input: (h, w),
                ..
            } => channels * h * w,
            OpKind::Linear { f, .. } => f,
            OpKind::BiasAct { len, .. } => len,
        }
    }

    /// Values per image that the op writes.
    pub fn out_len(&self) -> usize {
        match self.kind {
            OpKind::Conv {
                output: (c, h, w), ..
            } => c * h * w,
            OpKind::Pool {
                channels,
                output: (h, w),
                ..
            } => channels * h * w,
            OpKind::Linear { n, .. } => n,
            OpKind::BiasAct { len, .. } => len,
        }
    }
}

/// The launches of one forward pass of a spec network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecPlan {
    /// The ops in order; the last writes `Out`.
    pub ops: Vec<SpecOp>,
    /// Values per image of the largest op output (the scratch row length).
    pub max_len: usize,
}

impl SpecPlan {
    /// The plan of `spec` (see the module notes).
    pub fn of(spec: &NetSpec) -> SpecPlan {
        let mut ops: Vec<SpecOp> = Vec::new();
        let mut cur = Buf::Input;
        let next = |cur: Buf| match cur {
            Buf::Scratch(0) => Buf::Scratch(1),
            _ => Buf::Scratch(0),
        };
        for (layer, l) in spec.layers().iter().enumerate() {
            match (l.layer, l.input, l.output) {
                (Layer::Flatten, _, _) => {}
                (Layer::Act(a), shape, _) => match ops.last_mut() {
                    Some(op) if op.act == ACT_NONE && !matches!(op.kind, OpKind::Linear { .. }) => {
                        op.act = a.code();
                    }
                    _ => {
                        let dst = next(cur);
                        ops.push(SpecOp {
                            layer,
                            kind: OpKind::BiasAct {
                                b_off: None,
                                len: shape.len(),
                                plane: 1,
                            },
                            src: cur,
                            dst,
                            act: a.code(),
                        });
                        cur = dst;
                    }
                },
                (
                    Layer::Conv2d {
                        kernel_size,
                        stride,
                        padding,
                        ..
                    },
                    Shape::Image { c, h, w },
                    Shape::Image {
                        c: co,
                        h: oh,
                        w: ow,
                    },
                ) => {
                    let dst = next(cur);
                    ops.push(SpecOp {
                        layer,
                        kind: OpKind::Conv {
                            w_off: l.weight_offset,
                            b_off: l.bias_offset,
                            input: (c, h, w),
                            output: (co, oh, ow),
                            window: (kernel_size, stride, padding),
                        },
                        src: cur,
                        dst,
                        act: ACT_NONE,
                    });
                    cur = dst;
                }
                (
                    Layer::MaxPool2d { kernel_size: k } | Layer::AvgPool2d { kernel_size: k },
                    Shape::Image { c, h, w },
                    Shape::Image { h: oh, w: ow, .. },
                ) => {
                    let mode = if matches!(l.layer, Layer::MaxPool2d { .. }) {
                        PoolMode::Max
                    } else {
                        PoolMode::Avg
                    };
                    let dst = next(cur);
                    ops.push(SpecOp {
                        layer,
                        kind: OpKind::Pool {
                            mode,
                            channels: c,
                            input: (h, w),
                            output: (oh, ow),
                            k,
                        },
                        src: cur,
                        dst,
                        act: ACT_NONE,
                    });
                    cur = dst;
                }
                (Layer::Linear { .. }, Shape::Vector(f), Shape::Vector(n)) => {
                    let dst = next(cur);
                    ops.push(SpecOp {
                        layer,
                        kind: OpKind::Linear {
                            w_off: l.weight_offset,
                            f,
                            n,
                        },
                        src: cur,
                        dst,
                        act: ACT_NONE,
                    });
                    cur = dst;
                    if l.bias_offset.is_some() {
                        let dst = next(cur);
                        ops.push(SpecOp {
                            layer,
                            kind: OpKind::BiasAct {
                                b_off: l.bias_offset,
                                len: n,
                                plane: 1,
                            },
                            src: cur,
                            dst,
                            act: ACT_NONE,
                        });
                        cur = dst;
                    }
                }
                // `NetSpec::build` admits no other combination.
                (kind, input, _) => unreachable!("layer {kind:?} on input {input:?}"),
            }
        }
        if ops.is_empty() {
            // Only `flatten`: the output is the input, copied for every member.
            ops.push(SpecOp {
                layer: 0,
                kind: OpKind::BiasAct {
                    b_off: None,
                    len: spec.input().len(),
                    plane: 1,
                },
                src: Buf::Input,
                dst: Buf::Out,
                act: ACT_NONE,
            });
        }
        if let Some(last) = ops.last_mut() {
            last.dst = Buf::Out;
        }
        let max_len = ops
            .iter()
            .filter(|o| o.dst != Buf::Out)
            .map(SpecOp::out_len)
            .max()
            .unwrap_or(0);
        SpecPlan { ops, max_len }
    }

    /// The blocks of one pass over `members` × `images`: (first member, members, first
    /// image, images). Chunks of whole members keep a scratch buffer at
    /// [`SCRATCH_TARGET`] values; when one member's images alone exceed it (the test set
    /// through the mean network), one member at a time in chunks of images.
    pub fn blocks(&self, members: usize, images: usize) -> Vec<Block> {
        let (mc, dc) = block_size(self.max_len, members, images);
        blocks_of(members, images, mc, dc)
    }

    /// Values of each of the two scratch buffers for `members` × `images`.
    pub fn scratch_len(&self, members: usize, images: usize) -> usize {
        scratch_len(self.max_len, members, images)
    }
}

/// (members, images) of the largest block of a plan whose scratch rows are `max_len`
/// values (see [`SpecPlan::blocks`]).
fn block_size(max_len: usize, members: usize, images: usize) -> (usize, usize) {
    let len = max_len.max(1);
    let per_member = images.saturating_mul(len);
    if per_member <= SCRATCH_TARGET {
        (
            (SCRATCH_TARGET / per_member.max(1)).clamp(1, members.max(1)),
            images,
        )
    } else {
        (1, (SCRATCH_TARGET / len).clamp(1, images.max(1)))
    }
}

/// Values of each scratch buffer of a plan with scratch rows of `max_len` values over
/// `members` × `images` (the memory check counts two).
pub fn scratch_len(max_len: usize, members: usize, images: usize) -> usize {
    let (mc, dc) = block_size(max_len, members, images);
    mc.min(members) * dc.min(images) * max_len
}

/// The blocks of `members` × `images` in chunks of `mc` members and `dc` images (both
/// at least 1), members outer. Each block's output is one range only when `mc` = 1 or
/// `dc` ≥ `images` (what [`SpecPlan::blocks`] makes).
pub fn blocks_of(members: usize, images: usize, mc: usize, dc: usize) -> Vec<Block> {
    let (mc, dc) = (mc.max(1), dc.max(1));
    let mut out = Vec::new();
    for m0 in (0..members).step_by(mc) {
        for d0 in (0..images).step_by(dc) {
            out.push(Block {
                member0: m0,
                members: mc.min(members - m0),
                image0: d0,
                images: dc.min(images - d0),
            });
        }
    }
    out
}

/// A block of one forward pass: `members` members from `member0` on `images` images
/// from `image0` (whole members, or one member's images in chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First member.
    pub member0: usize,
    /// Members.
    pub members: usize,
    /// First image.
    pub image0: usize,
    /// Images.
    pub images: usize,
}

impl Block {
    /// The block's output values in the members × images × `n_out` output: one range,
    /// as a block is whole members or a single member.
    pub fn out_range(&self, images: usize, n_out: usize) -> std::ops::Range<usize> {
        let start = (self.member0 * images + self.image0) * n_out;
        start..start + self.members * self.images * n_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::parse_short;

    fn plan(text: &str, input: Shape, outputs: usize) -> SpecPlan {
        let spec = NetSpec::build(&parse_short(text).unwrap(), input, outputs).unwrap();
        SpecPlan::of(&spec)
    }

    /// The paper's network: conv + logistic fused, pool, conv + logistic, pool, the
    /// linear layer as a GEMM into the output; buffers alternate and never alias.
    #[test]
    fn activations_fuse_and_buffers_alternate() {
        let img = Shape::Image { c: 1, h: 28, w: 28 };
        let p = plan(
            "conv2d(10,5,bias=false) logistic maxpool2d(2) conv2d(20,5,bias=false) logistic \
             maxpool2d(2) flatten linear(10,bias=false)",
            img,
            10,
        );
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|o| match o.kind {
                OpKind::Conv { .. } => "conv",
                OpKind::Pool { .. } => "pool",
                OpKind::Linear { .. } => "linear",
                OpKind::BiasAct { .. } => "bias",
            })
            .collect();
        assert_eq!(kinds, ["conv", "pool", "conv", "pool", "linear"]);
        assert_eq!(p.ops[0].act, 0);
        assert_eq!(p.ops[1].act, ACT_NONE);
        assert_eq!(p.ops[2].act, 0);
        assert_eq!(p.ops[0].src, Buf::Input);
        assert_eq!(p.ops[4].dst, Buf::Out);
        for w in p.ops.windows(2) {
            assert_eq!(w[1].src, w[0].dst, "each op reads what the last wrote");
        }
        assert!(p.ops.iter().all(|o| o.src != o.dst));
        assert_eq!(p.max_len, 10 * 24 * 24);
    }

    /// A leading activation and a second activation in a row get their own steps; a
    /// linear bias gets one that the following activation joins; flatten alone copies.
    #[test]
    fn unfusable_activations_get_their_own_step() {
        let p = plan(
            "flatten relu linear(8) tanh heaviside linear(3,bias=false)",
            Shape::Vector(5),
            3,
        );
        let acts: Vec<(i32, Buf, Buf)> = p.ops.iter().map(|o| (o.act, o.src, o.dst)).collect();
        use Buf::*;
        assert_eq!(
            acts,
            [
                (1, Input, Scratch(0)),
                (ACT_NONE, Scratch(0), Scratch(1)),
                (2, Scratch(1), Scratch(0)),
                (3, Scratch(0), Scratch(1)),
                (ACT_NONE, Scratch(1), Out),
            ]
        );
        let copy = plan("flatten", Shape::Vector(4), 4);
        assert_eq!(copy.ops.len(), 1);
        assert_eq!((copy.ops[0].src, copy.ops[0].dst), (Input, Out));
        assert_eq!(copy.max_len, 0);
    }

    #[test]
    fn blocks_keep_the_scratch_near_its_target_and_cover_the_output() {
        let p = plan("flatten linear(10)", Shape::Vector(1 << 20), 10);
        assert_eq!(p.max_len, 10, "the linear output before its bias step");
        assert_eq!(p.blocks(5000, 64).len(), 1);
        let big = plan(
            "conv2d(64,3,padding=1) maxpool2d(2) flatten linear(4)",
            Shape::Image { c: 1, h: 64, w: 64 },
            4,
        );
        let len = 64 * 64 * 64;
        assert_eq!(big.max_len, len);
        let per = 64 * len;
        let blocks = big.blocks(5000, 64);
        assert_eq!(blocks[0].members, SCRATCH_TARGET / per);
        assert_eq!(big.scratch_len(5000, 64), SCRATCH_TARGET / per * per);
        // One member on more images than the target holds: chunks of images.
        let one = big.blocks(1, 1000);
        let dc = SCRATCH_TARGET / len;
        assert_eq!(
            one[0],
            Block {
                member0: 0,
                members: 1,
                image0: 0,
                images: dc
            }
        );
        assert_eq!(big.scratch_len(1, 1000), dc * len);
        // The blocks' output ranges tile the output exactly, in order.
        for (members, images) in [(5000, 64), (1, 1000), (3, 7)] {
            let mut next = 0;
            for b in big.blocks(members, images) {
                let r = b.out_range(images, 16);
                assert_eq!(r.start, next, "{members} × {images}: {b:?}");
                next = r.end;
            }
            assert_eq!(next, members * images * 16);
        }
    }
}

//! The launch list of backpropagation through ONE layer-spec network on the GPU: the
//! forward ops of the [`SpecPlan`] run with one member, each op's output kept (the
//! tape), then the backward steps below, in order. Pure data, no CUDA: the CUDA backend
//! executes it (`gpu::spec_backprop`) and the tests execute the same list with the
//! kernels' CPU twins (`cpu::spec_backprop_kernels::run_backprop`), so its buffers and
//! fusions are checked everywhere.
//!
//! Buffers: the images (`Tape::Input`, B × n_in), op i's output (`Tape::Op(i)`, B × its
//! length), and two gradient buffers of B × [`BackPlan::grad_len`] values used in turn
//! (`g` holds the gradient with respect to the current op's output; a step that makes the
//! gradient of the op's input writes it to the other buffer, and the next step reads
//! that). The loss kernel writes the gradient of the last op's output into buffer 0.
//!
//! Per forward op, last first: a fused activation is undone first (`Act`: g ← g ·
//! act'(y) from the op's output); then a conv2d gives its weight gradient (`ConvWgrad`),
//! its bias gradient (`BiasGrad`) and, unless it reads the images, its input gradient
//! (`ConvDgrad`); a pool its input gradient (`PoolBack`); a linear layer its weight
//! gradient (`LinearWgrad`, dW = gᵀ·x) and input gradient (`LinearDgrad`, g·W), both
//! cuBLAS GEMMs; a bias-and-activation step its bias gradient (the values pass through
//! unchanged). The first op's input gradient is never formed (nothing needs it).

use super::spec_plan::{OpKind, PoolMode, SpecPlan, ACT_NONE};

/// Where a step reads a layer's forward values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tape {
    /// The images, B × n_in.
    Input,
    /// The output of forward op i, B × its length.
    Op(usize),
}

/// One backward launch (offsets are into the P weights and the P-long gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackStep {
    /// `spec_act_backward_f32`: grad buffer `g` (B × `len`) ← g · act'(y), y = `y`.
    Act {
        /// The activation's output.
        y: Tape,
        /// Gradient buffer.
        g: usize,
        /// Values per image.
        len: usize,
        /// Activation code.
        act: i32,
    },
    /// `spec_conv2d_wgrad_f32`: the weight gradient at `w_off` from the layer's input
    /// `x` and grad buffer `g`.
    ConvWgrad {
        /// The conv's input.
        x: Tape,
        /// Gradient buffer (of the conv's output).
        g: usize,
        /// Weight offset (co × c × k × k).
        w_off: usize,
        /// Input channels, height, width.
        input: (usize, usize, usize),
        /// Output channels, height, width.
        output: (usize, usize, usize),
        /// Kernel side, stride, padding.
        window: (usize, usize, usize),
    },
    /// `spec_conv2d_dgrad_f32`: grad buffer `out` (the conv's input gradient) from `g`.
    ConvDgrad {
        /// Gradient buffer read.
        g: usize,
        /// Gradient buffer written.
        out: usize,
        /// Weight offset.
        w_off: usize,
        /// Input channels, height, width.
        input: (usize, usize, usize),
        /// Output channels, height, width.
        output: (usize, usize, usize),
        /// Kernel side, stride, padding.
        window: (usize, usize, usize),
    },
    /// `spec_bias_grad_f32`: the bias gradient at `b_off` (`channels` values) from grad
    /// buffer `g` (B × channels × plane).
    BiasGrad {
        /// Gradient buffer.
        g: usize,
        /// Bias offset.
        b_off: usize,
        /// Bias entries.
        channels: usize,
        /// Values per bias entry and image.
        plane: usize,
    },
    /// `spec_pool2d_backward_f32`: grad buffer `out` (the pool's input gradient) from
    /// `g` and the pool's input `x`.
    PoolBack {
        /// The pool's input.
        x: Tape,
        /// Gradient buffer read.
        g: usize,
        /// Gradient buffer written.
        out: usize,
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
    /// GEMM dW (n × f) = gᵀ (n × B) · x (B × f) into the weight gradient at `w_off`.
    LinearWgrad {
        /// The layer's input.
        x: Tape,
        /// Gradient buffer.
        g: usize,
        /// Weight offset.
        w_off: usize,
        /// Input features.
        f: usize,
        /// Output features.
        n: usize,
    },
    /// GEMM grad buffer `out` (B × f) = g (B × n) · W (n × f).
    LinearDgrad {
        /// Gradient buffer read.
        g: usize,
        /// Gradient buffer written.
        out: usize,
        /// Weight offset.
        w_off: usize,
        /// Input features.
        f: usize,
        /// Output features.
        n: usize,
    },
}

/// The backward launches of a spec network (see the module notes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackPlan {
    /// The forward ops (each op's output kept: `Tape::Op(i)`).
    pub forward: SpecPlan,
    /// The backward steps in order, after the loss kernel.
    pub steps: Vec<BackStep>,
    /// Values per image of a gradient buffer (the largest op input or output).
    pub grad_len: usize,
}

impl BackPlan {
    /// The plan of `forward` (a [`SpecPlan`]).
    pub fn of(forward: SpecPlan) -> BackPlan {
        let mut steps = Vec::new();
        let mut g = 0usize;
        for (i, op) in forward.ops.iter().enumerate().rev() {
            let x = if i == 0 { Tape::Input } else { Tape::Op(i - 1) };
            let want_input = i > 0;
            if op.act != ACT_NONE {
                steps.push(BackStep::Act {
                    y: Tape::Op(i),
                    g,
                    len: op.out_len(),
                    act: op.act,
                });
            }
            let other = 1 - g;
            match op.kind {
                OpKind::Conv {
                    w_off,
                    b_off,
                    input,
                    output,
                    window,
                } => {
                    steps.push(BackStep::ConvWgrad {
                        x,
                        g,
                        w_off,
                        input,
                        output,
                        window,
                    });
                    if let Some(b_off) = b_off {
                        steps.push(BackStep::BiasGrad {
                            g,
                            b_off,
                            channels: output.0,
                            plane: output.1 * output.2,
                        });
                    }
                    if want_input {
                        steps.push(BackStep::ConvDgrad {
                            g,
                            out: other,
                            w_off,
                            input,
                            output,
                            window,
                        });
                        g = other;
                    }
                }
                OpKind::Pool {
                    mode,
                    channels,
                    input,
                    output,
                    k,
                } => {
                    if want_input {
                        steps.push(BackStep::PoolBack {
                            x,
                            g,
                            out: other,
                            mode,
                            channels,
                            input,
                            output,
                            k,
                        });
                        g = other;
                    }
                }
                OpKind::Linear { w_off, f, n } => {
                    steps.push(BackStep::LinearWgrad { x, g, w_off, f, n });
                    if want_input {
                        steps.push(BackStep::LinearDgrad {
                            g,
                            out: other,
                            w_off,
                            f,
                            n,
                        });
                        g = other;
                    }
                }
                OpKind::BiasAct { b_off, len, plane } => {
                    if let Some(b_off) = b_off {
                        steps.push(BackStep::BiasGrad {
                            g,
                            b_off,
                            channels: len / plane.max(1),
                            plane,
                        });
                    }
                }
            }
        }
        let grad_len = forward
            .ops
            .iter()
            .map(|o| o.in_len().max(o.out_len()))
            .max()
            .unwrap_or(0);
        BackPlan {
            forward,
            steps,
            grad_len,
        }
    }
}

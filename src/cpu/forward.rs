//! The network's forward pass on the CPU (twin of `kernels/forward.cu`).
//! TODO(helper): implement.

use crate::model::Net;
use crate::Result;

/// Forward pass of `members` networks over `images` images, see
/// [`crate::backend::Backend::ensemble_forward`].
pub fn ensemble_forward(
    _net: &Net,
    _weights: &[f32],
    _members: usize,
    _x: &[f32],
    _images: usize,
    _out: &mut [f32],
) -> Result<()> {
    todo!()
}

"""Float32 rounding control, so jitted results equal the reference kernels bit for bit.

Inside `jax.jit`, XLA on CPU (a) contracts a product and the sum that consumes it into one fused
multiply-add, rounding once instead of twice, and (b) rewrites division by a constant as
multiplication by its reciprocal. Both move results by an ulp relative to torchvision's C++
kernels; for RoIAlign sample coordinates near 300 px an ulp is 3e-5 px, enough to change an
interpolated feature by 1e-4. These helpers opt single operations out of both rewrites.
"""

import jax
import jax.numpy as jnp


def rounded(x):
    """`x` rounded to float32 on its own: it cannot be fused into a following addition.

    Exact for |x| in [2^-62, 2^63]; smaller magnitudes flush to 0 (no pixel coordinate notices).
    """
    return jax.lax.reduce_precision(x, exponent_bits=7, mantissa_bits=23)


def true_divide(x, divisor):
    """x / divisor as a real division, even when `divisor` is a compile-time constant.

    The divisor is made to depend on `x` (`divisor + 0 * x`, which IEEE arithmetic forbids
    folding: 0 * inf is NaN), so no compiler pass can prove it constant, under jit or vmap.
    Where x is inf or NaN the result is NaN.
    """
    x = jnp.asarray(x)
    return x / (jnp.asarray(divisor, x.dtype) + 0 * x)

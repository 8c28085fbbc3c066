"""Process-level XLA settings that entry points apply before JAX starts (no jax import here).

XLA's CPU backend in jaxlib 0.10 routes convolutions through experimental "YNN" fusions whose
backward passes are about 2x slower than its default kernels (a 3x3, 256-channel convolution at
150 x 250: forward + backward 901 ms with them, 401 ms without, torch 425 ms on the same 2 cores).
Its dots, on the other hand, need YNN: without it a [128, 4096] x [4096, 25088] product (the
input gradient of VGG-16's fc6) took 843 ms instead of 141 ms (measured while another job shared
the cores; the ratio is what matters). So only the convolution fusions
are removed (`-individual_convolution`: every other YNN fusion stays). XLA aborts on a flag it
does not know, so the flag is only added for jaxlib versions it was measured with.
"""

import os
from importlib import metadata

_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
_TESTED_JAXLIB_PREFIXES = ("0.10.",)


def configure_xla_cpu(environ=None, *, jaxlib_version=None):
    """Appends the CPU flags above to XLA_FLAGS; call before JAX initializes a backend.

    A flag the user already set (any value) is left alone; nothing is added for an untested
    jaxlib. Returns the flags added.
    """
    environ = os.environ if environ is None else environ
    if jaxlib_version is None:
        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return []
    if not jaxlib_version.startswith(_TESTED_JAXLIB_PREFIXES):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in _CPU_FLAGS if flag.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added

"""DP noise from a cryptographically secure generator.

Opacus draws its Gaussian noise from a torch generator: Mersenne Twister on a CPU, unless
``secure_mode`` is on, which needs the ``torchcsprng`` package (not published for current
torch). :class:`SecureGaussian` is the replacement: uniform bits from ChaCha20 (the
``cryptography`` package, OpenSSL's implementation) keyed with 256 bits from the OS
(``os.urandom``) per generator, turned into normals by the Box–Muller transform in float64.
Like Opacus's ``secure_mode``, each noise value is the sum of four normals halved (same
standard deviation), which defeats the floating-point attacks on naive Gaussian sampling
(Mironov, CCS 2012; Holohan and Braghin, arXiv:2107.10138, section 5.1).

:func:`install` puts it into an Opacus ``DPOptimizer`` in place of its noise step; the
optimizer's ``noise_multiplier`` (and Opacus's ``_adjusted_noise_multiplier``) are read at
every step, as Opacus's own ``add_noise`` reads them.

Must not: import ``fedrec.server``; send anything.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from opacus.optimizers import DPOptimizer

SOURCE_SECURE = "chacha20-os-key"
SOURCE_TORCH = "torch-mt19937-os-seed"
SOURCE_SEEDED = "torch-mt19937-fixed-seed"  # benchmarks only: not private against the seed


class SecureGaussian:
    """Normal samples from ChaCha20 keyed from ``os.urandom``."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform on [0, 1), 53 random bits each."""
        raw = self._stream.update(bytes(8 * n))
        return (np.frombuffer(raw, dtype="<u8") >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` standard normal samples (Box–Muller; both outputs of each pair are used)."""
        pairs = (n + 1) // 2
        u1 = 1.0 - self.uniform(pairs)  # (0, 1]: log is finite
        u2 = self.uniform(pairs)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
        return z[:n]

    def normal(self, std: float, shape: tuple[int, ...]) -> np.ndarray:
        """N(0, std²) samples of ``shape``: the sum of four halved (Opacus's secure mode)."""
        n = int(np.prod(shape)) if shape else 1
        z = self.standard_normal(4 * n).reshape(4, n).sum(axis=0) / 2.0
        return (std * z).reshape(shape)

    def normal_like(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        import torch

        if std == 0:
            return torch.zeros_like(reference)
        sample = self.normal(std, tuple(reference.shape))
        return torch.from_numpy(sample).to(dtype=reference.dtype, device=reference.device)


def install(optimizer: DPOptimizer, gaussian: SecureGaussian | None = None) -> SecureGaussian:
    """Replace ``optimizer``'s noise step with one drawing from ``gaussian`` (a new one if
    None). Everything else of Opacus's step (clipping, scaling, accounting) is unchanged."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    source = gaussian or SecureGaussian()

    def add_noise() -> None:
        sigma = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = float(sigma) * float(optimizer.max_grad_norm)  # type: ignore[arg-type]
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            noise = source.normal_like(std, p.summed_grad)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[method-assign]
    return source

"""Where sampling noise comes from: one rule for every draw (pipeline, training loss, context noise).

A draw uses the generator's own device (so a seeded CPU generator gives the same numbers whatever the model's
device) and is then moved to the target device; with no generator it is drawn on the target device from that
device's default generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) of ``shape`` on ``device`` (see the module docstring for which generator draws it)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class NoiseSource:
    """Gaussian noise for ``prompts`` x ``per_prompt`` rows. One generator draws for the whole batch (independent
    noise for every row); a list gives each prompt its own generator, so a prompt's images do not depend on what
    else is in the batch. A single prompt with one CPU generator draws exactly as the reference's seeded global RNG.
    ``group_noise``: the draws :meth:`block` is told to share give every image of a prompt its first image's numbers
    (the pipeline shares the start and context noise).
    """

    def __init__(self, generator: Generators, prompts: int, per_prompt: int, dim: int, device: torch.device,
                 group_noise: bool = False):
        if isinstance(generator, Sequence) and len(generator) != prompts:
            raise InputError(f"got {len(generator)} generators for {prompts} prompts")
        self.generator, self.prompts, self.per_prompt, self.dim = generator, prompts, per_prompt, dim
        self.device, self.group_noise = device, group_noise


    @property
    def rows(self) -> int:
        return self.prompts * self.per_prompt

    def block(self, k: int, shared: tuple[int, ...] = ()) -> torch.Tensor:
        """(k, rows, dim): the next k draws of (rows, dim) each, in one call per CPU generator. With ``group_noise``
        the draws at indices ``shared`` are the same for every image of a prompt (its first image's).

        On the CPU, torch draws normals in blocks of 16 values, so one (k, rows, dim) call gives the same numbers as k
        calls of (rows, dim) whenever rows * dim is a multiple of 16 (always for 64-value image tokens). Other
        generators (CUDA's maps values to threads by the call's size) and other sizes draw k times."""
        if isinstance(self.generator, Sequence):
            out = torch.cat([_block(k, self.per_prompt, self.dim, g, self.device) for g in self.generator], dim=1)
        else:
            out = _block(k, self.rows, self.dim, self.generator, self.device)
        if self.group_noise and self.per_prompt > 1:
            for i in shared:  # a copy of each prompt's first row, then written over the draw
                first = out[i].view(self.prompts, self.per_prompt, -1)[:, :1]
                out[i] = first.repeat(1, self.per_prompt, 1).flatten(0, 1)
        return out


def _block(k: int, rows: int, dim: int, g: torch.Generator | None, device) -> torch.Tensor:
    if g is not None and g.device.type == "cpu" and (rows * dim) % 16 == 0:
        return randn((k, rows, dim), g, device)
    return torch.stack([randn((rows, dim), g, device) for _ in range(k)])

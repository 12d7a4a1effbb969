"""What every bundle the command line loads shares: its modules live in this process and move as the runner says.

`unet` (the denoiser), `vae` and `text_encoders` (`TextEncoderSlot`s) are set by the bundle; the runner stages them
(`place`: encoders first, then the denoiser) and offloads what a cache made idle (`offload`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..bundle import TextEncoderSlot


class StandaloneModules:
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[TextEncoderSlot]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):  # noqa: ANN201 - the bundle itself
        """Move every module (the VAE stays float32: SD VAEs overflow in fp16)."""
        kwargs = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        self.unet.to(**kwargs)
        for slot in self.text_encoders:
            slot.module.to(**kwargs)
        self.vae.to(device=device, dtype=torch.float32)
        return self

    def modules(self) -> dict[str, nn.Module]:
        """Every module the bundle holds, by role (for memory accounting and offloading)."""
        out = {"unet": self.unet, "vae": self.vae}
        out.update({slot.prefix: slot.module for slot in self.text_encoders})
        return out

    engine_block_swap = True  # the engine holds these modules: the OOM ladder and `blocks_to_swap` may stream blocks

    def place(self, device: torch.device | str, *, unet: bool = False, vae: bool = False,
              text_encoders: bool = False, swapped_blocks: int = 0) -> None:
        """Move the chosen modules to `device`, each keeping its dtype (the runner stages encoders and UNet apart);
        the last `swapped_blocks` transformer blocks stay where they are (`BlockSwap` streams them)."""
        chosen = [self.unet] if unet and not swapped_blocks else []
        if unet and swapped_blocks:
            from ..blockswap import place_unswapped

            place_unswapped(self.unet, device, swapped_blocks)
        if vae:
            chosen.append(self.vae)
        if text_encoders:
            chosen += [slot.module for slot in self.text_encoders]
        for module in chosen:
            module.to(device)

    def offload(self, *, vae: bool, text_encoders: bool, device: str = "cpu") -> None:
        """Move what the loop no longer needs off the accelerator (latents / text conditioning are cached)."""
        self.place(device, vae=vae, text_encoders=text_encoders)

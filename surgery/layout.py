"""How a site's tensor is laid out: NCHW or NHWC maps, tokens ``(N, L, C)`` with class/register/
distillation tokens before a row-major patch grid, or flat vectors; and how an image mask maps onto
each (:meth:`Layout.pool_mask`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from surgery.errors import SurgeryError

__all__ = ["Layout", "token_grid", "channels_last_rows", "channels_first_rows"]

LayoutKind = Literal["nchw", "nhwc", "tokens", "flat", "last"]


@dataclass(frozen=True)
class Layout:
    """How the keys or values of a layer are laid out.

    ``kind``:
        ``"nchw"``: maps ``(N, C, H, W)``; ``"nhwc"``: maps ``(N, H, W, C)`` (ConvNeXt/Swin/MaxViT
        channels-last); ``"tokens"``: ``(N, L, C)`` with ``prefix`` class/register/distillation tokens
        first, then a row-major grid whose shape follows from the token count and the image's aspect
        ratio; ``"flat"``: no spatial structure known (masks are refused); ``"last"``: channels last,
        structure read from the rank when used (2-D flat, 3-D tokens with ``prefix``, 4-D nhwc): what
        a plain Linear gets, since its call alone does not say.
    ``prefix``:
        tokens before the grid; ``None`` until the adapter fills in the model's count.
    ``channel_dim``:
        the axis indexed by the edited layer's output channels when it is not the layout's channel
        axis (token-mixing MLPs, whose outputs are tokens).
    """

    kind: LayoutKind
    prefix: int | None = None
    channel_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("nchw", "nhwc", "tokens", "flat", "last"):
            raise SurgeryError(f"unknown layout kind {self.kind!r}")
        if self.prefix is not None and self.prefix < 0:
            raise SurgeryError(f"a layout's prefix token count must be >= 0, got {self.prefix}")

    @property
    def channel_axis(self) -> int:
        """The axis of channels: 1 for NCHW, -1 otherwise (unless ``channel_dim`` overrides it)."""
        if self.channel_dim is not None:
            return self.channel_dim
        return 1 if self.kind == "nchw" else -1

    @property
    def spatial(self) -> bool:
        """Whether image masks can be mapped onto this layout (given a tensor for ``"last"``)."""
        return self.kind in ("nchw", "nhwc", "tokens", "last")

    def resolve(self, t: torch.Tensor) -> Layout:
        """This layout with ``"last"`` replaced by what ``t``'s rank says."""
        if self.kind != "last":
            return self
        kind = {2: "flat", 3: "tokens", 4: "nhwc"}.get(t.ndim, "flat")
        return Layout(kind, self.prefix, self.channel_dim)  # type: ignore[arg-type]

    @staticmethod
    def of(layout: Layout | int, t: torch.Tensor) -> Layout:
        """``layout`` resolved for ``t``; an int is read as a channel axis, as before layouts existed: 1 is
        NCHW, -1 on a 4-D tensor NHWC, anything else flat with that channel axis."""
        if isinstance(layout, Layout):
            return layout.resolve(t)
        if layout == 1:
            return Layout("nchw")
        if layout == -1 and t.ndim == 4:
            return Layout("nhwc")
        return Layout("flat", channel_dim=layout)

    def pool_mask(
        self, masks: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image masks ``(N, 1, H, W)`` area-pooled onto the positions of ``t`` (computed in ``dtype``).

        Returns ``(pooled, prefix)``: ``pooled`` has ``t``'s rank with size 1 on the channel axis (for
        tokens ``(N, L, 1)``, prefix tokens 0), and ``prefix`` is a boolean tensor of the same shape,
        True at the prefix tokens, or ``None`` when there are none.

        Raises:
            SurgeryError: the layout has no spatial structure, or the token count does not factor
                into a grid with the image's aspect ratio.
        """
        lay = self.resolve(t)
        masks = masks.to(device=t.device, dtype=dtype)
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise SurgeryError(f"masks must be (N, 1, H, W), got {tuple(masks.shape)}")
        if masks.shape[0] != t.shape[0]:
            raise SurgeryError(f"{masks.shape[0]} masks for a batch of {t.shape[0]}")
        if lay.kind == "nchw" and t.ndim == 4:
            return F.adaptive_avg_pool2d(masks, tuple(t.shape[2:])), None
        if lay.kind == "nhwc" and t.ndim == 4:
            return F.adaptive_avg_pool2d(masks, tuple(t.shape[1:3])).permute(0, 2, 3, 1), None
        if lay.kind == "tokens" and t.ndim == 3:
            n_prefix = lay.prefix or 0
            grid = t.shape[1] - n_prefix
            if grid < 0:
                raise SurgeryError(f"{t.shape[1]} tokens but {n_prefix} prefix tokens")
            pooled = torch.zeros(t.shape[0], t.shape[1], 1, dtype=dtype, device=t.device)
            if grid:
                h, w = token_grid(grid, tuple(masks.shape[-2:]))
                cells = F.adaptive_avg_pool2d(masks, (h, w))  # (N, 1, h, w), row-major tokens
                pooled[:, n_prefix:, 0] = cells.reshape(t.shape[0], -1)
            prefix = None
            if n_prefix:
                prefix = torch.zeros_like(pooled, dtype=torch.bool)
                prefix[:, :n_prefix] = True
            return pooled, prefix
        raise SurgeryError(
            f"masks need spatial keys/values: (N, C, H, W), (N, H, W, C) maps or (N, L, C) tokens; this "
            f"layer's have shape {tuple(t.shape)} and layout {lay.kind!r}"
        )


def channels_last_rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``t`` as rows ``(positions, channels)``: the channel axis last, every other axis flattened in order
    (a view where ``t`` is laid out so)."""
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def channels_first_rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``t`` as ``(channels, positions)``: one row per channel, the other axes flattened in the order of
    :func:`channels_last_rows`."""
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def token_grid(count: int, image_hw: tuple[int, int], *, tolerance: float = 1.5) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``count`` tokens for an image of ``image_hw``: ``h * w == count`` and
    ``h / w`` closest to the image's ``H / W`` (within a factor ``tolerance``)."""
    H, W = image_hw
    target = math.log(H / W)
    best = None
    for h in range(1, count + 1):
        if count % h:
            continue
        err = abs(math.log(h / (count // h)) - target)
        if best is None or err < best[0]:
            best = (err, h)
    assert best is not None
    if best[0] > math.log(tolerance):
        raise SurgeryError(
            f"{count} grid tokens do not factor into a grid with the image's aspect ratio {H}:{W} "
            f"(closest {best[1]}x{count // best[1]}); is the number of class/register tokens "
            "(the layout's prefix) right?"
        )
    return best[1], count // best[1]

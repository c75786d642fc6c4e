"""A reference SPANet written from docs/spec.md §2-3, literally, in plain PyTorch on :mod:`spanet_ops.reference`.

It shares no code with :mod:`spanet.models`: it is what the tests compare the
fast model against. It has the published module layout (the same state-dict
keys, with the ``sps.{i}.filter`` masks as non-trainable Parameters as in the
published code), so a state dict moves between the two with ``strict=True``.

SPAM here is: ``proj_in``, depthwise ``(1,k)`` then ``(k,1)``, ``torch.chunk``
into 3, per-chunk SPF via ``spanet_ops.reference`` (``fft2 -> fftshift ->
mask -> ifftshift -> ifft2 -> real``), per-chunk 1x1 conv ``pws[i]``, the sum,
``proj_out(x * ctx)``. At the published map size the stored filter is the
mask; at any other size the mask is docs/spec.md §1's circular mask at that size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spanet_ops import reference

LAMS = [lam for lam in torch.arange(0.7, 0.9, 0.1)]  # float32 0.7, 0.8, 0.9, as published

CONFIGS = {
    "spanet_small": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "spanet_medium": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "spanet_mediumX": ((8, 8, 24, 8), (64, 128, 320, 512)),
    "spanet_base": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "spanet_baseX": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
RADII = (2, 2, 1, 1)


class RefSPF(nn.Module):
    def __init__(self, size, radius, lam):
        super().__init__()
        self.radius, self.lam = float(radius), float(lam)
        mask = reference.circular_mask(size, size, radius, float(lam))
        self.filter = nn.Parameter(mask.unsqueeze(0), requires_grad=False)

    def forward(self, x):
        height, width = x.shape[-2:]
        if (height, width) == tuple(self.filter.shape[-2:]):
            return reference.spectral_mask_filter(x, self.filter)
        mask = reference.circular_mask(height, width, self.radius, self.lam).to(x.device)
        return reference.spectral_mask_filter(x, mask)


class RefSPAM(nn.Module):
    def __init__(self, dim, size, radius, k=7):
        super().__init__()
        dims = [c.shape[0] for c in torch.chunk(torch.ones(dim), 3)]
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.conv = nn.Sequential(
            nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
            nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim),
        )
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.sps = nn.ModuleList([RefSPF(size, radius, lam) for lam in LAMS])
        self.pws = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in dims])

    def forward(self, x):
        x = self.conv(self.proj_in(x))
        chunks = torch.chunk(x, 3, dim=1)
        ctx = sum(pw(sp(c)) for c, sp, pw in zip(chunks, self.sps, self.pws))
        return self.proj_out(x * ctx)


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, 4 * dim, 1)
        self.fc2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale[:, None, None]


class RefBlock(nn.Module):
    def __init__(self, dim, size, radius, res_scale):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = RefSPAM(dim, size, radius)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = RefMlp(dim)
        self.res_scale1 = RefScale(dim) if res_scale else nn.Identity()
        self.res_scale2 = RefScale(dim) if res_scale else nn.Identity()

    def forward(self, x):
        x = self.res_scale1(x) + self.token_mixer(self.norm1(x))
        return self.res_scale2(x) + self.mlp(self.norm2(x))


class RefEmbed(nn.Module):
    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, k, s, p)

    def forward(self, x):
        return self.proj(x)


class RefSPANet(nn.Module):
    """The reference network for one of the five variants (inference only: no drop path)."""

    def __init__(self, variant, num_classes=1000, in_chans=3):
        super().__init__()
        depths, dims = CONFIGS[variant]
        self.patch_embed = RefEmbed(in_chans, dims[0], 7, 4, 2)
        network = []
        for i in range(4):
            if i:
                network.append(RefEmbed(dims[i - 1], dims[i], 3, 2, 1))
            size = 224 // (4 * 2**i)
            network.append(nn.Sequential(*[RefBlock(dims[i], size, RADII[i], i >= 2) for _ in range(depths[i])]))
        self.network = nn.ModuleList(network)
        self.norm = nn.GroupNorm(1, dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return self.head(self.norm(x).mean([-2, -1]))


def randomize_(model, seed=0):
    """Give ``model`` non-trivial weights in place: random norm affines, biases and ResScale values.

    Conv and linear weights keep their random init; the published ``filter``
    tensors are left as they are (they are fixed masks). Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model

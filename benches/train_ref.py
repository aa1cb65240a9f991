"""PyTorch reference for benches/train.rs: the same conv net, batch, optimizer
and thread count; prints one JSON line with median forward / backward /
optimizer / step times (ms) and peak RSS (MB, ru_maxrss; includes the torch
import itself).

Architecture (must match benches/train.rs): conv_in 4->32, 4 residual blocks
(GroupNorm(32)+SiLU+conv3x3, twice) at 32 ch 16x16, stride-2 conv 32->64,
4 blocks at 64 ch 8x8, one single-head attention block over the 64 tokens
(GroupNorm eps 1e-6, q/k/v linears without bias, out linear with bias,
residual), nearest x2 upsample, GroupNorm+SiLU, conv_out 64->4; MSE loss,
batch 32, f32, AdamW(lr 1e-4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_timing import setup, time_training


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1 = nn.GroupNorm(32, c, eps=1e-5)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.n2 = nn.GroupNorm(32, c, eps=1e-5)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.out = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (l(t).reshape(b, 1, h * w, c) for l in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.out(o.reshape(b, h * w, c))
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3, padding=1)
        self.b32 = nn.ModuleList([ResBlock(32) for _ in range(4)])
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.b64 = nn.ModuleList([ResBlock(64) for _ in range(4)])
        self.attn = AttnBlock(64)
        self.norm_out = nn.GroupNorm(32, 64, eps=1e-5)
        self.conv_out = nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.b32:
            h = b(h)
        h = self.down(h)
        for b in self.b64:
            h = b(h)
        h = self.attn(h)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.conv_out(F.silu(self.norm_out(h)))


def main():
    args = setup()
    net = Net()
    x = torch.randn(32, 4, 16, 16)
    target = torch.randn(32, 4, 16, 16)
    time_training(net.parameters(), lambda: F.mse_loss(net(x), target), args.steps)


if __name__ == "__main__":
    main()

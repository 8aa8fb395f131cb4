"""Small models the tests share (kept tiny so the suite stays fast on 2 cores)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv + BatchNorm + residual + linear: the shape of a ResNet in a few layers."""

    def __init__(self, classes=10, width=8, norm=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = F.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    """Pre-norm transformer block with explicit attention matmuls and a GELU MLP."""

    def __init__(self, d=32, heads=4, sdpa=False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def assert_steps_match(compiled, model: nn.Module, xs, references, device) -> None:
    """One training step of ``compiled`` (``model`` compiled) per input of ``xs`` (seeded, loss
    ``mean(out**2)``), each bit-identical to its reference ``(output, {name: gradient})``."""
    for x, (ref_out, ref_grads) in zip(xs, references, strict=True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = compiled(x.to(device))
        out.float().square().mean().backward()
        assert torch.equal(out.detach(), ref_out)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, ref_grads[name]), name


def train(run, params, batches, loss_fn, lr=1e-2):
    """Adam steps of ``loss_fn(run(x), y)`` over ``batches``; the losses."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for x, y in batches:
        loss = loss_fn(run(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

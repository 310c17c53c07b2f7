"""The zero-block rewrite (explainrt.autodiff.zero_blocks): a CLS-token classifier's gradient graph runs
its row-wise operators on the one non-zero token, and the gradients stay exactly those of torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from explainrt.export import explainable
from explainrt.export.torch_export import from_torch


class ClsTokenNet(nn.Module):
    """Patches -> tokens with a CLS token -> one-head self-attention (q, k, v taken from one projection, as
    ViTs do) -> a pre-norm MLP block -> final LayerNorm -> head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.norm1 = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.norm2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        qkv = self.qkv(self.norm1(tokens)).reshape(len(x), -1, 3, 16).permute(2, 0, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        tokens = tokens + torch.softmax(q @ k.transpose(1, 2) / 4, dim=-1) @ v
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm(tokens)[:, 0])


@pytest.fixture(scope="module")
def net() -> ClsTokenNet:
    torch.manual_seed(0)
    return ClsTokenNet().eval()


def _run(proto, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x, "explainrt.targets": targets}
    return session.run(["explainrt.gradients.0"], feeds)[0]


def test_cls_token_gradient_runs_on_the_block_and_matches_torch(net: ClsTokenNet) -> None:
    proto = from_torch(net, torch.zeros(1, 3, 16, 16), [net.norm1])
    lifted = [n for n in proto.graph.node if "/block/" in n.name]
    assert {"MatMul", "Mul", "ReduceMean", "Sum"} <= {n.op_type for n in lifted}, "nothing ran on the block"
    assert any(n.op_type == "Concat" and n.name.endswith("/concat") for n in proto.graph.node), "q, k, v not tiled"

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = np.array([[1, 4], [-1, 0]], dtype=np.int64)
    got = _run(proto, x.numpy(), targets)  # [N, K, C, h, w]

    captured = {}
    handle = net.norm1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    logits = net(x)
    handle.remove()
    resolved = np.where(targets < 0, logits.argsort(dim=1, descending=True)[:, 0:1].numpy(), targets)
    for k in range(targets.shape[1]):
        grad, = torch.autograd.grad(logits[torch.arange(2), torch.as_tensor(resolved[:, k])].sum(), captured["out"],
                                    retain_graph=True)
        expected = grad[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2).numpy()  # patch tokens as [N, C, h, w]
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-4, atol=1e-6)
        assert np.abs(expected).max() > 1e-3  # a gradient that could be wrong


def test_rewrite_changes_no_value(net: ClsTokenNet, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    targets = np.array([[0, -2], [-1, 2]], dtype=np.int64)
    with_blocks = _run(from_torch(net, torch.zeros(1, 3, 16, 16), [net.norm1]), x, targets)
    monkeypatch.setattr(explainable, "compute_on_blocks", lambda builder, seed: None)
    dense = from_torch(net, torch.zeros(1, 3, 16, 16), [net.norm1])
    assert not any("/block/" in n.name for n in dense.graph.node)
    np.testing.assert_allclose(with_blocks, _run(dense, x, targets), rtol=1e-6, atol=1e-7)

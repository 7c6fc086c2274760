"""AdamW weight-decay groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vermeil.nn.norms import RMSNorm
from vermeil.train import build_optimizer, build_scheduler, cosine_with_warmup, param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.proj = nn.Linear(6, 5)  # weight decayed, bias not
        self.norm = RMSNorm(5)
        self.ln = nn.LayerNorm(5)
        self.A_log = nn.Parameter(torch.zeros(5, 3))  # 2-D, but never decayed (Mamba)
        self.D = nn.Parameter(torch.ones(5))
        self.marked = nn.Parameter(torch.zeros(4, 4))
        self.marked._no_weight_decay = True
        self.listed = nn.Parameter(torch.zeros(3, 3))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.head = nn.Linear(5, 13, bias=False)

    def no_weight_decay(self) -> set[str]:
        return {"listed"}


def _names(groups: list[dict]) -> tuple[set[str], set[str]]:
    decay = next((g for g in groups if g["weight_decay"] > 0), {"param_names": []})
    rest = next((g for g in groups if g["weight_decay"] == 0), {"param_names": []})
    return set(decay["param_names"]), set(rest["param_names"])


def test_param_groups_rules() -> None:
    decay, rest = _names(param_groups(Net(), 0.1))
    assert decay == {"proj.weight", "head.weight"}
    assert rest == {
        "emb.weight",
        "proj.bias",
        "norm.weight",
        "ln.weight",
        "ln.bias",
        "A_log",
        "D",
        "marked",
        "listed",
    }
    decay, rest = _names(param_groups(Net(), 0.1, no_decay_embeddings=False))
    assert "emb.weight" in decay and "emb.weight" not in rest


def test_param_groups_tied_weight_once() -> None:
    net = Net()
    net.head.weight = nn.Parameter(torch.zeros(13, 5))
    net.emb = nn.Embedding(13, 5)
    net.head.weight = net.emb.weight
    groups = param_groups(net, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    decay, rest = _names(groups)
    assert "emb.weight" in rest and "head.weight" not in decay


def test_model_hook_is_honoured() -> None:
    class Hooked(Net):
        def optimizer_groups(self, weight_decay: float) -> list[dict]:
            return [
                {"params": [self.proj.weight], "weight_decay": weight_decay * 2},
                {"params": [], "weight_decay": 0},
            ]

    groups = param_groups(Hooked(), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == pytest.approx(0.2)
    opt = build_optimizer(Hooked(), 1e-3, 0.1)
    assert len(opt.param_groups) == 1


def test_param_groups_rejects_negative_decay() -> None:
    with pytest.raises(ValueError, match="weight_decay=-1"):
        param_groups(Net(), -1)


def test_fused_matches_unfused() -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, 1e-2, 0.1, fused=False)
    opt_b = build_optimizer(b, 1e-2, 0.1, fused=None)  # auto: fused where torch has the kernel
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            x = torch.arange(7) % 13
            loss = m.head(m.ln(m.proj(m.emb(x)))).square().mean() + (m.A_log.square().sum() + m.D.sum())
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_cosine_with_warmup_values() -> None:
    f = lambda s: cosine_with_warmup(s, warmup=4, total=14, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(4, 20))
    assert cosine_with_warmup(0, warmup=0, total=10, min_ratio=0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_ratio"):
        cosine_with_warmup(0, 1, 10, min_ratio=1.5)


def test_scheduler_drives_lr_and_round_trips() -> None:
    net = Net()
    opt = build_optimizer(net, 2.0, 0.0)
    sched = build_scheduler(opt, warmup=2, total=6, min_ratio=0.0)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * cosine_with_warmup(s, 2, 6, 0.0) for s in range(6)])
    state = sched.state_dict()
    opt2 = build_optimizer(Net(), 2.0, 0.0)
    sched2 = build_scheduler(opt2, warmup=2, total=6, min_ratio=0.0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 6 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])

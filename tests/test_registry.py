"""Per-instance patches are always removed, LIFO, and inert after removal."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lib_attn.registry import PatchSet, clean_leftovers, is_patched


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x))


def double(module, call_next, x):
    return call_next(x) * 2


def test_wrap_and_remove_restores_class_forward(caplog):
    net = Net()
    x = torch.randn(2, 3)
    ref = net(x)
    ps = PatchSet()
    ps.wrap_forward(net.a, double)
    assert is_patched(net.a)
    assert not torch.allclose(net(x), ref)
    ps.remove()
    assert "forward" not in net.a.__dict__
    assert torch.equal(net(x), ref)
    # idempotent: the set forgets what it removed, so a second remove() (__exit__ after an explicit remove, say)
    # touches nothing, not even a patch installed since on the same module, and has nothing to warn about
    assert len(ps) == 0
    later = PatchSet()
    later.wrap_forward(net.a, double)
    with caplog.at_level(logging.WARNING, logger="lib_attn"):
        ps.remove()
    assert not caplog.records
    assert is_patched(net.a) and torch.allclose(net(x), net.b(nn.Linear.forward(net.a, x) * 2))
    later.remove()
    assert "forward" not in net.a.__dict__ and torch.equal(net(x), ref)


def test_removed_even_when_body_raises():
    net = Net()
    with pytest.raises(RuntimeError), PatchSet() as ps:
        ps.wrap_forward(net.a, double)
        ps.add_handle(net.register_forward_hook(lambda m, i, o: o + 1))
        raise RuntimeError("boom")
    assert "forward" not in net.a.__dict__
    assert not net._forward_hooks


def test_double_install_is_an_error_and_lifo_with_foreign_wrapper():
    net = Net()
    foreign = net.a.forward  # another extension's instance-level forward
    net.a.forward = lambda x: foreign(x) + 100
    saved = net.a.forward
    ps = PatchSet()
    ps.wrap_forward(net.a, double)
    with pytest.raises(RuntimeError):
        PatchSet().wrap_forward(net.a, double)
    x = torch.randn(1, 3)
    assert torch.allclose(net.a(x), (nn.Linear.forward(net.a, x) + 100) * 2)
    ps.remove()
    assert net.a.forward is saved


def test_wrapper_chained_over_becomes_inert():
    net = Net()
    x = torch.randn(1, 3)
    plain = nn.Linear.forward(net.a, x)
    ps = PatchSet()
    ps.wrap_forward(net.a, double)
    ours = net.a.forward
    net.a.forward = lambda x: ours(x)  # someone chains over our wrapper
    ps.remove()
    assert torch.equal(net.a(x), plain)


def test_clean_leftovers():
    net = Net()
    ps = PatchSet()
    ps.wrap_forward(net.a, double)
    ps.wrap_forward(net.b, double)
    assert clean_leftovers(net) == 2
    assert not any("forward" in m.__dict__ for m in net.modules())

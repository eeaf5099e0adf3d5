"""Rings (in-place writes, wrap-around, valid prefix, pointer math) and the flat EMA."""

import copy

import torch
from torch import nn

from fastmsd.momentum import Rings, ema_update, flatten_parameters, is_view_of


def keys(n, d, start):
    """Distinct, recognisable keys: row r holds the value start + r everywhere."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_write_wraps_around_without_moving_the_pointer():
    rings = Rings(capacity=10, dim=3)
    rings.ptr, rings.n_valid = 7, 10
    rings.write(0, keys(5, 3, 100), keys(5, 3, 200))
    assert rings.img[[7, 8, 9, 0, 1], 0].tolist() == [100, 101, 102, 103, 104]
    assert rings.txt[[7, 8, 9, 0, 1], 0].tolist() == [200, 201, 202, 203, 204]
    assert rings.ptr == 7
    assert rings.rows(0, 5).tolist() == [7, 8, 9, 0, 1]
    assert rings.rows(3, 2).tolist() == [0, 1]


def test_unwritten_slots_stay_out_of_the_valid_prefix():
    rings = Rings(capacity=10, dim=2)
    rings.write(0, keys(4, 2, 0), keys(4, 2, 0))
    assert rings.n_valid == 4
    rings.write(4, keys(2, 2, 4), keys(2, 2, 4))  # second chunk of the same effective batch
    assert rings.n_valid == 6
    rings.advance(6)
    rings.write(0, keys(6, 2, 6), keys(6, 2, 6))  # 6 + 6 > 10: full from here on
    assert rings.n_valid == 10
    assert rings.img[:, 0].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_pointer_math_when_n_does_not_divide_q():
    """Many steps of N = 7 into Q = 24 match a plain list simulation of the ring."""
    q, n, d = 24, 7, 2
    rings = Rings(capacity=q, dim=d)
    expected = [None] * q
    counter = 0
    for step in range(20):
        block = keys(n, d, counter)
        for chunk_start in range(0, n, 3):  # keys written in chunks of 3
            part = block[chunk_start:chunk_start + 3]
            rings.write(chunk_start, part, part + 1000)
        for r in range(n):
            expected[(step * n + r) % q] = counter + r
        assert rings.n_valid == min(q, (step + 1) * n)
        rings.advance(n)
        counter += n
        assert rings.ptr == (step + 1) * n % q
        assert rings.img[: rings.n_valid, 0].tolist() == expected[: rings.n_valid]
    assert rings.img[:, 0].tolist() == expected
    assert (rings.txt[:, 0] - rings.img[:, 0]).eq(1000).all()


def test_state_dict_round_trip():
    a = Rings(capacity=6, dim=2)
    a.write(0, keys(4, 2, 1), keys(4, 2, 5))
    a.advance(4)
    b = Rings(capacity=6, dim=2)
    b.load_state_dict(a.state_dict())
    assert (b.ptr, b.n_valid) == (4, 4)
    assert torch.equal(a.img, b.img) and torch.equal(a.txt, b.txt)


def test_flat_ema_equals_per_tensor_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    expected = [t.detach().clone() for t in teacher.parameters()]
    s_flat, t_flat = flatten_parameters(student), flatten_parameters(teacher)
    assert is_view_of(student, s_flat) and is_view_of(teacher, t_flat)
    m = 0.995
    for _ in range(3):
        ema_update(t_flat, s_flat, m)
        for i, s in enumerate(student.parameters()):
            # torch.lerp's own fp32 formula for weight < 0.5: t + w * (s - t).
            expected[i] = expected[i] + (1 - m) * (s.detach() - expected[i])
    for got, want in zip(teacher.parameters(), expected, strict=True):
        assert torch.equal(got, want)


def test_flat_views_survive_training_and_loading():
    student = nn.Linear(4, 4)
    flat = flatten_parameters(student)
    opt = torch.optim.AdamW(student.parameters(), lr=0.1)
    student(torch.randn(2, 4)).sum().backward()
    opt.step()
    student.load_state_dict({k: v.clone() for k, v in student.state_dict().items()})
    assert is_view_of(student, flat)
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
    student.weight.data = torch.zeros(4, 4)
    assert not is_view_of(student, flat)

"""Every logit loss from a densified sparse distribution p, against the formula docs/losses.md gives.

The references are float64 numpy written from the page: wherever a loss uses softmax(zt/T) the sparse
cache gives ``tp(p, T) = p^(1/T) / Σ p^(1/T)``; zero-probability classes stay zero; a part of a row
with no mass contributes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.losses import Batch, StudentOutput, TeacherBatch, get

ZS = np.array([[1.0, 0.5, -0.3, 2.0], [0.2, -1.0, 1.5, 0.3], [-0.5, 0.8, 0.1, -1.2]])
Y = np.array([3, 2, 1])
# top-k (k=2, C=4): exact top-2, the rest spread uniformly; no zeros
P_TOPK = np.array([[0.5, 0.1, 0.1, 0.3], [0.125, 0.125, 0.6, 0.15], [0.05, 0.7, 0.2, 0.05]])
# sampled:20 (counts / 20): zeros; row 0 has every draw on its label (no non-target mass); row 2 one class
P_SAMPLED = np.array([[0.0, 0.0, 0.0, 1.0], [0.1, 0.0, 0.75, 0.15], [0.0, 0.0, 1.0, 0.0]])
NINE = ["dkd", "nkd", "dist", "cskd", "r2kd", "energy_kd", "energy_dkd", "pld", "mixkd"]
ENERGY = np.array([0.5, 5.0, 9.0])  # with prepare(arange(10)): T_i = 6, 4, 2 (mapping paper)


def softmax(z, T=1.0):
    e = np.exp(z / T - (z / T).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tp(p, T=1.0):
    q = p ** (1.0 / T)
    return q / q.sum(-1, keepdims=True)


def kl(p, q):
    return sum(a * np.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ce():
    return -np.mean([np.log(softmax(ZS)[i, c]) for i, c in enumerate(Y)])


def cos(a, b, axis):
    return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))


def dkd_rows(p, T):
    tc, nc = [], []
    for i, c in enumerate(Y):
        ps, pt = softmax(ZS[i], T), tp(p[i], T)
        tc.append(kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]]))
        keep = [k for k in range(4) if k != c]
        nc.append(kl(tp(p[i, keep], T), softmax(ZS[i, keep], T)) if p[i, keep].sum() > 0 else 0.0)
    return np.array(tc), np.array(nc)


def ref_dkd(p):
    tc, nc = dkd_rows(p, 4.0)
    return ce() + 16 * (tc.mean() + 8 * nc.mean())


def ref_nkd(p):
    target = -np.mean([p[i, c] * np.log(softmax(ZS[i])[c]) for i, c in enumerate(Y)])
    non = []
    for i, c in enumerate(Y):
        keep = [k for k in range(4) if k != c]
        has = p[i, keep].sum() > 0
        non.append((tp(p[i, keep], 3.0) * np.log(softmax(ZS[i, keep], 3.0))).sum() if has else 0.0)
    return ce() + target - 3.5 * 9 * np.mean(non)


def ref_dist(p):
    ps, pt = softmax(ZS, 4), tp(p, 4)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(3)])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(4) if pt[:, c].std() > 0])
    return ce() + 2 * 16 * (inter + intra)


def l_cs(ps, pt):
    """1 - the mean per-class cosine over the batch, over the classes with teacher mass."""
    has = pt.sum(0) > 0
    return 1 - cos(ps[:, has], pt[:, has], 0).mean()


def ref_r2kd(p):
    ps, pt = softmax(ZS, 4), tp(p, 4)
    return ce() + 2 * 16 * ((1 - cos(ps, pt, 1).mean()) + l_cs(ps, pt))


def ref_cskd(p):
    cs = cos(softmax(ZS), p, axis=1)
    span = cs.max() - cs.min()
    Ti = 2 + 4 * (cs.max() - cs) / span if span > 1e-6 else np.full(3, 4.0)
    cs_term = 2 * 16 * l_cs(softmax(ZS, 4), tp(p, 4))
    ps_w = np.stack([softmax(ZS[i], Ti[i]) for i in range(3)])
    pt_w = np.stack([tp(p[i], Ti[i]) for i in range(3)])
    return ce() + cs_term + 2 * Ti.mean() ** 2 * l_cs(ps_w, pt_w)


def ref_energy_kd(p):
    rows = [Ti**2 * kl(tp(p[i], Ti), softmax(ZS[i], Ti)) for i, Ti in enumerate([6.0, 4.0, 2.0])]
    return 0.1 * ce() + 0.9 * np.mean(rows)


def ref_energy_dkd(p):
    rows = []
    for i, Ti in enumerate([6.0, 4.0, 2.0]):
        ps, pt = softmax(ZS[i], Ti), tp(p[i], Ti)
        c = Y[i]
        tc = kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        keep = [k for k in range(4) if k != c]
        nc = kl(tp(p[i, keep], Ti), softmax(ZS[i, keep], Ti)) if p[i, keep].sum() > 0 else 0.0
        rows.append(Ti**2 * (tc + 8 * nc))
    return ce() + np.mean(rows)


def ref_pld(p):
    rows = []
    for i, c in enumerate(Y):
        others = sorted((k for k in range(4) if k != c), key=lambda k: (-p[i, k], k))  # ties: class order
        order = [c, *others]
        rows.append(sum(p[i, order[k]] * (np.log(np.exp(ZS[i, order[k:]]).sum()) - ZS[i, order[k]])
                        for k in range(4)))  # fmt: skip
    return np.mean(rows)


def ref_mixkd(p):
    rows = []
    for i in range(3):
        logs = np.log(p[i][p[i] > 0])
        sigma_t = logs.std(ddof=1) if len(logs) >= 2 else 1.0
        rows.append(kl(tp(p[i], sigma_t), softmax(ZS[i], ZS[i].std(ddof=1))))
    return 0.1 * ce() + 0.9 * np.mean(rows)


REFS = {name: globals()[f"ref_{name}"] for name in NINE}


def loss_value(name: str, teacher: TeacherBatch) -> tuple[float, torch.Tensor]:
    loss = get(name)
    if name.startswith("energy"):
        loss.prepare(torch.arange(10.0))
    zs = torch.tensor(ZS, dtype=torch.float32, requires_grad=True)
    total, _ = loss(StudentOutput(zs), teacher, Batch(torch.tensor(Y), epoch=40))
    total.backward()
    return total.item(), zs.grad


def sparse(p: np.ndarray) -> TeacherBatch:
    return TeacherBatch(probs=torch.tensor(p, dtype=torch.float32), energy=torch.tensor(ENERGY))


@pytest.mark.parametrize("name", NINE)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_sparse_value_equals_the_documented_formula_with_a_finite_gradient(name, mode):
    p = {"topk": P_TOPK, "sampled": P_SAMPLED}[mode]
    value, grad = loss_value(name, sparse(p))
    assert value == pytest.approx(REFS[name](p), rel=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", NINE)
def test_log_p_stands_in_for_the_logits_up_to_a_per_row_constant(name):
    """Dense logits log p + c_i give the loss a sparse cache gives from p: the approximation is only the tail."""
    shift = np.array([[3.0], [-2.0], [0.5]])
    dense = TeacherBatch(logits=torch.tensor(np.log(P_TOPK) + shift, dtype=torch.float32),
                         energy=torch.tensor(ENERGY))
    assert loss_value(name, dense)[0] == pytest.approx(loss_value(name, sparse(P_TOPK))[0], rel=1e-5)


def test_every_logit_loss_says_what_a_sparse_cache_gives_it():
    from kdcache.losses import available

    for cls in available():
        reads = "probs" in cls.needs
        assert bool(cls.sparse) == reads, cls.name
        if reads:
            assert cls.sparse.startswith(("approximate: ", "temperatures exact ")), cls.name

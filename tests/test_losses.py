"""Every loss against a value computed by hand from the formula in docs/losses.md.

References are written out in float64 numpy from the formulas, never through kdcache helpers.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from kdcache.errors import CacheMismatch, InvalidSpec
from kdcache.losses import Batch, StudentOutput, TeacherBatch, available, get, register
from kdcache.losses.ce import CE

ZS = [[1.0, 0.5, -0.3, 2.0], [0.2, -1.0, 1.5, 0.3], [-0.5, 0.8, 0.1, -1.2]]
ZT = [[2.0, 0.1, -1.0, 1.0], [0.0, -0.5, 2.5, 0.4], [-1.0, 1.6, 0.3, -0.2]]
Y = [3, 2, 1]
ALL = [
    "amd", "ce", "cskd", "dist", "dkd", "dr", "energy_dkd", "energy_kd",
    "fitnet", "kd", "mixkd", "nkd", "pld", "r2kd",
]  # fmt: skip
ENERGY_HP = {"r_low": 0.2, "r_high": 0.2}
LAYER_HP = {"amd": {"layers": "layer3"}, "fitnet": {"layers": "layer3"}}


def zs_t(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(ZS, requires_grad=requires_grad)


def run(name: str, teacher: TeacherBatch, epoch: int = 30, **hp) -> float:
    loss = get(name, **hp)
    total, _ = loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y), epoch=epoch))
    return total.item()


# ---- references, plain numpy -------------------------------------------------------------
S, T_, LAB = np.array(ZS), np.array(ZT), np.array(Y)


def softmax(z, T=1.0):
    e = np.exp(z / T - (z / T).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl(p, q):
    return (p * np.log(p / q)).sum(1)


def ce_ref(z, y):
    return -np.mean([np.log(softmax(z)[i, y[i]]) for i in range(len(y))])


def cos(a, b, axis):
    return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))


def dkd_ref(zs, zt, y, T):
    """Per-sample TCKD, NCKD without the T² factor."""
    ps, pt = softmax(zs, T), softmax(zt, T)
    tckd, nckd = [], []
    for i, c in enumerate(y):
        bs = np.array([ps[i, c], 1 - ps[i, c]])
        bt = np.array([pt[i, c], 1 - pt[i, c]])
        tckd.append((bt * np.log(bt / bs)).sum())
        keep = [k for k in range(zs.shape[1]) if k != c]
        qs, qt = softmax(zs[i : i + 1, keep], T), softmax(zt[i : i + 1, keep], T)
        nckd.append(kl(qt, qs)[0])
    return np.array(tckd), np.array(nckd)


# ---- values --------------------------------------------------------------------------------
def test_ce_matches_hand_value_with_hard_and_soft_labels():
    assert run("ce", TeacherBatch()) == pytest.approx(ce_ref(S, LAB), rel=1e-5)
    soft = np.array([[0, 0.3, 0, 0.7], [0, 0, 1, 0], [0.5, 0.5, 0, 0]])
    batch = Batch(torch.tensor(Y), soft_labels=torch.tensor(soft, dtype=torch.float32))
    total, _ = get("ce")(StudentOutput(zs_t()), TeacherBatch(), batch)
    expected = -(soft * np.log(softmax(S))).sum(1).mean()
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_kd_matches_hinton_formula_at_T4():
    expected = 0.1 * ce_ref(S, LAB) + 0.9 * 16 * kl(softmax(T_, 4), softmax(S, 4)).mean()
    assert run("kd", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)


def test_kd_from_dense_probs_equals_kd_from_logits():
    probs = torch.softmax(torch.tensor(ZT), 1)
    from_probs = run("kd", TeacherBatch(probs=probs), T=3.0)
    assert from_probs == pytest.approx(run("kd", TeacherBatch(logits=torch.tensor(ZT)), T=3.0))


def test_kd_tempers_sparse_probs_as_p_to_one_over_T_renormalised():
    p = np.array([[0.6, 0.3, 0.05, 0.05], [0.1, 0.1, 0.7, 0.1], [0.0, 0.9, 0.1, 0.0]])
    pt = p ** (1 / 4) / (p ** (1 / 4)).sum(1, keepdims=True)
    ps = softmax(S, 4)
    kd_rows = [
        sum(a * np.log(a / b) for a, b in zip(pt[i], ps[i], strict=True) if a > 0) for i in range(3)
    ]
    expected = 0.1 * ce_ref(S, LAB) + 0.9 * 16 * np.mean(kd_rows)
    zs = zs_t(requires_grad=True)
    total, _ = get("kd")(
        StudentOutput(zs),
        TeacherBatch(probs=torch.tensor(p, dtype=torch.float32)),
        Batch(torch.tensor(Y)),
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert torch.isfinite(zs.grad).all()


def test_dr_matches_kl_to_teacher_distribution_dense_and_sparse():
    expected = kl(softmax(T_), softmax(S)).mean()
    assert run("dr", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)
    q = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.2, 0.4, 0.2], [0.05, 0.85, 0.05, 0.05]])
    expected = kl(q, softmax(S)).mean()
    got = run("dr", TeacherBatch(probs=torch.tensor(q, dtype=torch.float32)))
    assert got == pytest.approx(expected, rel=1e-5)


def prepared(name: str, **hp):
    loss = get(name, **hp)
    loss.prepare(torch.arange(10.0))  # quantiles 0.2 -> 1.8 and 0.8 -> 7.2
    return loss


@pytest.mark.parametrize(
    ("mapping", "expected"), [("paper", [6.0, 4.0, 2.0]), ("code", [2.0, 4.0, 6.0])]
)
def test_energy_kd_mapping_assigns_documented_temperatures(mapping, expected):
    loss = prepared("energy_kd", mapping=mapping)
    assert loss.thresholds == pytest.approx((1.8, 7.2))
    T = loss.temperatures(torch.tensor([0.5, 5.0, 9.0]), None)
    assert T.tolist() == expected


def test_energy_kd_gives_mixed_views_the_middle_temperature():
    loss = prepared("energy_kd")
    T = loss.temperatures(torch.tensor([0.5, 5.0, 9.0]), torch.tensor([True, False, True]))
    assert T.tolist() == [4.0, 4.0, 4.0]


def test_energy_kd_matches_per_sample_temperature_formula():
    loss = prepared("energy_kd")
    teacher = TeacherBatch(logits=torch.tensor(ZT), energy=torch.tensor([0.5, 5.0, 9.0]))
    total, _ = loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y)))
    Ts = [6.0, 4.0, 2.0]
    rows = [Ts[i] ** 2 * kl(softmax(T_[i : i + 1], Ts[i]), softmax(S[i : i + 1], Ts[i]))[0]
            for i in range(3)]  # fmt: skip
    assert total.item() == pytest.approx(0.1 * ce_ref(S, LAB) + 0.9 * np.mean(rows), rel=1e-5)


def test_energy_dkd_scales_each_sample_dkd_by_its_temperature_squared():
    loss = prepared("energy_dkd")
    teacher = TeacherBatch(logits=torch.tensor(ZT), energy=torch.tensor([0.5, 5.0, 9.0]))
    total, _ = loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y), epoch=40))
    rows = []
    for i, Ti in enumerate([6.0, 4.0, 2.0]):
        tc, nc = dkd_ref(S[i : i + 1], T_[i : i + 1], LAB[i : i + 1], Ti)
        rows.append(Ti**2 * (1.0 * tc[0] + 8.0 * nc[0]))
    assert total.item() == pytest.approx(ce_ref(S, LAB) + np.mean(rows), rel=1e-5)


def test_energy_kd_without_prepare_is_a_clear_error():
    loss = get("energy_kd")
    teacher = TeacherBatch(logits=torch.tensor(ZT), energy=torch.tensor([0.5, 5.0, 9.0]))
    with pytest.raises(InvalidSpec, match="prepare"):
        loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y)))


def l_cs(ps, pt):
    return 1 - cos(ps, pt, axis=0).mean()


def test_cskd_matches_cs_plus_cswt_formula():
    cs = cos(softmax(S), softmax(T_), axis=1)
    Ti = 2 + 4 * (cs.max() - cs) / (cs.max() - cs.min())
    cs_term = 2 * 16 * l_cs(softmax(S, 4), softmax(T_, 4))
    ps_w = np.stack([softmax(S[i : i + 1], Ti[i])[0] for i in range(3)])
    pt_w = np.stack([softmax(T_[i : i + 1], Ti[i])[0] for i in range(3)])
    cswt = 2 * Ti.mean() ** 2 * l_cs(ps_w, pt_w)
    expected = ce_ref(S, LAB) + cs_term + cswt
    assert run("cskd", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)


def test_cswt_uses_middle_temperature_when_all_similarities_are_equal():
    loss = get("cskd")
    z = torch.tensor(ZS)
    assert loss.cswt_temperatures(z, z).tolist() == [4.0, 4.0, 4.0]
    one = StudentOutput(z[:1].clone().requires_grad_())
    total, _ = loss(one, TeacherBatch(logits=torch.tensor(ZT[:1])), Batch(torch.tensor(Y[:1])))
    assert torch.isfinite(total)


def test_r2kd_matches_sample_and_class_cosine_distances():
    ps, pt = softmax(S, 4), softmax(T_, 4)
    expected = ce_ref(S, LAB) + 2 * 16 * ((1 - cos(ps, pt, 1).mean()) + (1 - cos(ps, pt, 0).mean()))
    assert run("r2kd", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)


def test_dist_matches_pearson_inter_and_intra():
    ps, pt = softmax(S, 4), softmax(T_, 4)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(3)])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(4)])
    expected = ce_ref(S, LAB) + 2 * 16 * (inter + intra)
    assert run("dist", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)


def test_dkd_matches_decoupled_formula_after_warmup():
    tc, nc = dkd_ref(S, T_, LAB, 4.0)
    expected = ce_ref(S, LAB) + 16 * (1.0 * tc.mean() + 8.0 * nc.mean())
    got = run("dkd", TeacherBatch(logits=torch.tensor(ZT)), epoch=19)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("epoch", "factor"), [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)])
def test_dkd_warmup_scales_kd_terms_linearly_over_20_epochs(epoch, factor):
    loss = get("dkd")
    teacher = TeacherBatch(logits=torch.tensor(ZT))
    _, full = loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y), epoch=100))
    _, warm = loss(StudentOutput(zs_t()), teacher, Batch(torch.tensor(Y), epoch=epoch))
    for term in ("tckd", "nckd"):
        assert warm[term].item() == pytest.approx(factor * full[term].item(), rel=1e-6)
    assert warm["ce"].item() == pytest.approx(full["ce"].item())


def test_nkd_matches_target_and_normalised_non_target_terms():
    ps, pt = softmax(S), softmax(T_)
    target = -np.mean([pt[i, c] * np.log(ps[i, c]) for i, c in enumerate(Y)])
    non = []
    for i, c in enumerate(Y):
        keep = [k for k in range(4) if k != c]
        qt, qs = softmax(T_[i : i + 1, keep], 3.0), softmax(S[i : i + 1, keep], 3.0)
        non.append((qt * np.log(qs)).sum())
    expected = ce_ref(S, LAB) + target - 3.5 * 9 * np.mean(non)
    assert run("nkd", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(expected, rel=1e-5)


def test_pld_matches_plackett_luce_sum_over_teacher_order():
    q = softmax(T_)
    rows = []
    for i, c in enumerate(Y):
        others = sorted((k for k in range(4) if k != c), key=lambda k: -T_[i, k])
        order = [c, *others]
        rows.append(sum(
            q[i, order[k]] * (np.log(np.exp(S[i, order[k:]]).sum()) - S[i, order[k]])
            for k in range(4)
        ))  # fmt: skip
    assert run("pld", TeacherBatch(logits=torch.tensor(ZT))) == pytest.approx(
        np.mean(rows), rel=1e-5
    )


def test_mixkd_uses_each_rows_logit_std_as_temperature():
    soft = np.array([[0, 0.4, 0, 0.6], [0, 0, 1, 0], [0.3, 0.7, 0, 0]])
    rows = []
    for i in range(3):
        ss, st = S[i].std(ddof=1), T_[i].std(ddof=1)
        rows.append(kl(softmax(T_[i : i + 1], st), softmax(S[i : i + 1], ss))[0])
    ce_mixed = -(soft * np.log(softmax(S))).sum(1).mean()
    batch = Batch(torch.tensor(Y), soft_labels=torch.tensor(soft, dtype=torch.float32))
    total, _ = get("mixkd")(StudentOutput(zs_t()), TeacherBatch(logits=torch.tensor(ZT)), batch)
    assert total.item() == pytest.approx(0.1 * ce_mixed + 0.9 * np.mean(rows), rel=1e-5)


def amd_ref(a_s, a_t, s=64.0, m=1.35):
    def parts(a):
        q = a.reshape(a.shape[0], -1)
        q = q / (np.sqrt((q * q).sum(1, keepdims=True)) + 1e-6)
        P = s * np.cos(m * np.arccos(np.clip(q, -1 + 1e-7, 1 - 1e-7)))
        N = s * (1 - q)
        return [P - np.log(np.exp(P) + np.exp(N)), P, N]

    def n(x):
        return x / np.sqrt((x * x).sum(1, keepdims=True))

    return np.mean(
        [((n(a) - n(b)) ** 2).mean() for a, b in zip(parts(a_s), parts(a_t), strict=True)]
    )


FS = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
FT_ATT = np.random.default_rng(1).uniform(0.1, 2.0, size=(2, 2, 2))
FT_FULL = np.random.default_rng(2).normal(size=(2, 5, 2, 2))


def test_amd_matches_angular_margin_formula_with_bilinear_resize():
    a_s = (FS**2).sum(1)  # [2,4,4]
    a_s_small = a_s.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4))  # bilinear 4->2 = 2x2 block means
    expected = ce_ref(S[:2], LAB[:2]) + amd_ref(a_s_small, FT_ATT)
    loss = get("amd", layers="layer3")
    student = StudentOutput(zs_t()[:2], {"layer3": torch.tensor(FS, dtype=torch.float32)})
    teacher = TeacherBatch(features={"layer3": torch.tensor(FT_ATT, dtype=torch.float32)})
    total, _ = loss(student, teacher, Batch(torch.tensor(Y[:2])))
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_amd_computes_teacher_map_from_full_features():
    fs = FS[:, :, :2, :2]
    expected = ce_ref(S[:2], LAB[:2]) + amd_ref((fs**2).sum(1), (FT_FULL**2).sum(1))
    loss = get("amd", layers="layer3")
    student = StudentOutput(zs_t()[:2], {"layer3": torch.tensor(fs, dtype=torch.float32)})
    teacher = TeacherBatch(features={"layer3": torch.tensor(FT_FULL, dtype=torch.float32)})
    total, _ = loss(student, teacher, Batch(torch.tensor(Y[:2])))
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_fitnet_matches_mse_of_adapted_and_resized_student_map():
    W = np.random.default_rng(3).normal(size=(5, 3))
    b = np.array([0.1, -0.2, 0.0, 0.3, 0.05])
    loss = get("fitnet", layers="layer4=layer3", student_channels=3, teacher_channels=5)
    with torch.no_grad():
        loss.adaptors["0"].weight.copy_(torch.tensor(W).view(5, 3, 1, 1))
        loss.adaptors["0"].bias.copy_(torch.tensor(b))
    adapted = np.einsum("oc,bchw->bohw", W, FS) + b[None, :, None, None]
    small = adapted.reshape(2, 5, 2, 2, 2, 2).mean(axis=(3, 5))
    expected = ce_ref(S[:2], LAB[:2]) + 100.0 * ((small - FT_FULL) ** 2).mean()
    student = StudentOutput(zs_t()[:2], {"layer3": torch.tensor(FS, dtype=torch.float32)})
    teacher = TeacherBatch(features={"layer3": torch.tensor(FT_FULL, dtype=torch.float32)})
    total, _ = loss(student, teacher, Batch(torch.tensor(Y[:2])))
    assert total.item() == pytest.approx(expected, rel=1e-4)
    assert loss.layer_pairs() == [("layer4", "layer3")]


# ---- gradients, terms, checks --------------------------------------------------------------
def inputs(name: str):
    """A prepared loss and inputs that carry every teacher output, with grad-enabled student."""
    loss = prepared(name) if name.startswith("energy") else get(name, **LAYER_HP.get(name, {}))
    fs = torch.tensor(FS, dtype=torch.float32, requires_grad=True)
    student = StudentOutput(torch.tensor(ZS[:2], requires_grad=True), {"layer3": fs})
    feats = {"layer3": torch.tensor(FT_FULL, dtype=torch.float32)}
    teacher = TeacherBatch(
        logits=torch.tensor(ZT[:2]), energy=torch.tensor([0.5, 9.0]), features=feats
    )
    return loss, student, teacher, Batch(torch.tensor(Y[:2]), epoch=5)


@pytest.mark.parametrize("name", ALL)
def test_student_receives_finite_nonzero_gradient(name):
    loss, student, teacher, batch = inputs(name)
    with pytest.warns(UserWarning, match="build") if name == "fitnet" else nullcontext():
        total, _ = loss(student, teacher, batch)
    total.backward()
    grads = [student.logits.grad]
    if name in LAYER_HP:
        grads.append(student.features["layer3"].grad)
    if name == "fitnet":
        grads.append(loss.adaptors["0"].weight.grad)
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_total_is_sum_of_named_terms(name):
    loss, student, teacher, batch = inputs(name)
    loss.build({"layer3": (3, 4, 4)}, {"layer3": (5, 2, 2)})
    total, terms = loss(student, teacher, batch)
    assert total.requires_grad and terms
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)


FULL_CACHE = {"logits", "probs", "energy", "features:attention:layer3", "features:full:layer3"}
MISSING = {
    "logits": ({"probs", "energy", "features:full:layer3"}, "dense teacher logits"),
    "probs": ({"energy"}, "logits"),
    "energy": ({"logits", "probs"}, "energies"),
}


@pytest.mark.parametrize("name", ALL)
def test_check_refuses_cache_lacking_a_needed_input_in_one_line(name):
    loss = get(name, **LAYER_HP.get(name, {}))
    loss.check(FULL_CACHE)
    for need in sorted(loss.needs):
        if need.startswith("features:"):
            cache, words = {"logits", "probs", "features:pooled:layer3"}, "--features layer3:"
        else:
            cache, words = MISSING[need]
        with pytest.raises(CacheMismatch, match=words) as info:
            loss.check(cache)
        assert "\n" not in str(info.value) and " — " in str(info.value)


def test_check_accepts_sparse_caches_for_kd_and_dr_and_full_maps_for_amd():
    get("kd").check({"probs"})
    get("dr").check({"probs"})
    get("ce").check(set())
    get("amd", layers="s3=layer3").check({"features:full:layer3"})
    with pytest.raises(CacheMismatch, match="layer3:full"):
        get("fitnet", layers="layer3").check({"features:attention:layer3"})


def test_fitnet_build_creates_adaptor_before_the_optimizer():
    loss = get("fitnet", layers="layer3")
    assert not list(loss.parameters())
    loss.build({"layer3": (8, 3, 4, 4)}, {"layer3": (8, 5, 2, 2)})
    assert [tuple(p.shape) for p in loss.parameters()] == [(5, 3, 1, 1), (5,)]
    with pytest.raises(InvalidSpec, match="3->5"):
        loss.build({"layer3": (6, 4, 4)}, {"layer3": (5, 2, 2)})


# ---- registry and hyper-parameters ---------------------------------------------------------
def test_registry_lists_every_loss_with_its_declarations():
    assert [cls.name for cls in available()] == ALL
    for cls in available():
        assert cls.scope in {"sample", "batch"} and cls.source and isinstance(cls.defaults, dict)
    assert {cls.name for cls in available() if cls.scope == "batch"} == {"cskd", "dist", "r2kd"}


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(InvalidSpec, match=r"unknown loss 'kdd'.*dkd.*kd") as info:
        get("kdd")
    assert "\n" not in str(info.value)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="twice"):
        register(type("CE2", (CE,), {}))


def test_unknown_hyper_parameter_is_refused_with_accepted_names():
    with pytest.raises(InvalidSpec, match="no hyper-parameter temp — it accepts: T, ce_weight"):
        get("kd", temp=4)


def test_hyper_parameters_from_cli_strings_are_converted_and_validated():
    loss = get("dkd", T="2", warmup="5", beta="4.5")
    assert (loss.T, loss.warmup, loss.beta) == (2.0, 5, 4.5)
    with pytest.raises(InvalidSpec, match="T='hot'"):
        get("kd", T="hot")
    with pytest.raises(InvalidSpec, match="must be > 0"):
        get("kd", T=0)
    with pytest.raises(InvalidSpec, match="mapping"):
        get("energy_kd", mapping="reverse")
    with pytest.raises(InvalidSpec, match="needs the hyper-parameter layers"):
        get("amd")
    with pytest.raises(InvalidSpec, match="student=teacher"):
        get("amd", layers="a=b=c")

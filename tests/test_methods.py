"""Each loss against an independent numpy computation, gradcheck in float64, and GD's closed form."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import methods
from methods.gd import clip_loss_gradients

B = 5
DIMS = [(6, 6), (6, 9)]  # equal and unequal student/teacher dims


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce_diag(z):
    return -np.mean(np.diag(_log_softmax(z)))


def _kl_rows(p_logits, q_logits):  # KL(softmax(p) || softmax(q)), mean over rows
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))


def _soft_ce_rows(t_logits, s_logits):
    return np.mean(-np.sum(np.exp(_log_softmax(t_logits)) * _log_softmax(s_logits), axis=1))


def _clip_np(v, u, s):
    z = s * v @ u.T
    return (_ce_diag(z) + _ce_diag(z.T)) / 2


def _linear(module, x):
    if isinstance(module, torch.nn.Identity):
        return x
    return x @ module.weight.detach().double().numpy().T + module.bias.detach().double().numpy()


def make_batch(ds, dt, seed=0, dtype=torch.float64, masked=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return methods.DistillBatch(
        student_image=r(B, ds).requires_grad_(),
        student_text=r(B, ds).requires_grad_(),
        teacher_image=F.normalize(r(B, dt), dim=-1),
        teacher_text=F.normalize(r(B, dt), dim=-1),
        student_logit_scale=torch.tensor(12.0, dtype=dtype),
        teacher_logit_scale=torch.tensor(20.0, dtype=dtype),
        student_image_masked=r(B, ds).requires_grad_() if masked else None,
    )


def as_numpy(batch):
    n = lambda t: t.detach().double().numpy()  # noqa: E731
    return (
        n(batch.student_image), n(batch.student_text), n(batch.teacher_image), n(batch.teacher_text),
        float(batch.student_logit_scale), float(batch.teacher_logit_scale), n(batch.student_image_masked),
    )


def expected(name, method, batch):
    vs, us, vt, ut, ss, st, vm = as_numpy(batch)
    if name == "crd":
        zs, zt = ss * _unit(vs) @ _unit(us).T, st * vt @ ut.T
        return _kl_rows(zt, zs) + _kl_rows(zt.T, zs.T)
    if name in ("fd", "mfd"):
        image = vm if name == "mfd" else vs
        pv, pu = _unit(_linear(method.project, image)), _unit(_linear(method.project, us))
        return np.mean((vt - pv) ** 2) + np.mean((ut - pu) ** 2)
    if name == "gd":
        def grads(v, u, s):  # gradients of the symmetric InfoNCE, written per element
            n = v.shape[0]
            z = s * v @ u.T
            p_row, p_col = np.exp(_log_softmax(z)), np.exp(_log_softmax(z.T))
            gv, gu = np.zeros_like(v), np.zeros_like(u)
            for i in range(n):
                for j in range(n):
                    d_ij = (p_row[i, j] - (i == j)) / (2 * n) + (p_col[j, i] - (i == j)) / (2 * n)
                    gv[i] += s * d_ij * u[j]
                    gu[j] += s * d_ij * v[i]
            return gv, gu

        pv, pu = _unit(_linear(method.project, vs)), _unit(_linear(method.project, us))
        (gvs, gus), (gvt, gut) = grads(pv, pu, ss), grads(vt, ut, st)
        return np.mean((gvt - gvs) ** 2) + np.mean((gut - gus) ** 2)
    if name == "icl":
        s = min(np.exp(method.logit_scale.log_scale.item()), 100.0)
        pv, pu = _unit(_linear(method.project, vs)), _unit(_linear(method.project, us))
        return _ce_diag(s * pv @ ut.T) + _ce_diag(s * pu @ vt.T)
    if name == "afd":
        s = min(np.exp(method.logit_scale.log_scale.item()), 100.0)
        pv, pu = _unit(_linear(method.project, vs)), _unit(_linear(method.project, us))
        fv = _unit(_linear(method.fuse_image, np.concatenate([pv, vt], 1)))
        fu = _unit(_linear(method.fuse_text, np.concatenate([pu, ut], 1)))
        return _clip_np(fv, fu, s)
    if name in ("open_clip_distill", "mobileclip_dr"):  # one teacher: MobileCLIP's average is that teacher's
        zs, zt = ss * _unit(vs) @ _unit(us).T, st * vt @ ut.T
        return (_soft_ce_rows(zt, zs) + _soft_ce_rows(zt.T, zs.T)) / 2
    if name == "tinyclip":
        zs, zt = method.scale * _unit(vs) @ _unit(us).T, method.scale * vt @ ut.T
        return (_soft_ce_rows(zt, zs) + _soft_ce_rows(zt.T, zs.T)) / 2
    if name == "hrd":
        zs, zt = ss * _unit(vs) @ _unit(us).T, st * vt @ ut.T
        return (_kl_rows(zt, zs) + _kl_rows(zt.T, zs.T)) / 2
    if name == "vrd":
        pv, pu = _unit(_linear(method.project, vs)), _unit(_linear(method.project, us))
        zv, zu = _scale(method.image_scale) * vt @ pv.T, _scale(method.text_scale) * ut @ pu.T
        consistency = (_kl_rows(zu, zv) + _kl_rows(zu.T, zv.T)) / 2
        return consistency + sum((_ce_diag(z) + _ce_diag(z.T)) / 2 for z in (zv, zu))
    if name == "xrd":
        pv, pu = _unit(_linear(method.project, vs)), _unit(_linear(method.project, us))
        s = _scale(method.logit_scale)
        a, c = s * vt @ pu.T, s * ut @ pv.T  # teacher image -> student text, teacher text -> student image
        return (_kl_rows(c, a) + _kl_rows(a, c) + _kl_rows(a.T, c.T) + _kl_rows(c.T, a.T)) / 4
    if name == "clip_rd":  # every term by its own hand computation, one shared projection
        assert all(term.project is method.project for term in method.terms.values() if hasattr(term, "project"))
        return sum(weight * expected(term, method.terms[term], batch) for term, weight in method.weights.items())
    raise AssertionError(f"no hand computation for {name}")


def _scale(logit_scale):
    return min(np.exp(logit_scale.log_scale.item()), 100.0)


BUILTIN = ["crd", "fd", "mfd", "gd", "icl", "afd", "open_clip_distill", "tinyclip", "hrd", "vrd", "xrd", "clip_rd",
           "mobileclip_dr"]


@pytest.mark.parametrize("ds,dt", DIMS)
@pytest.mark.parametrize("name", BUILTIN)
def test_loss_equals_hand_computation(name, ds, dt):
    torch.manual_seed(1)
    method = methods.get(name)(ds, dt).double()
    batch = make_batch(ds, dt)
    value = method(batch)
    assert value.shape == ()
    np.testing.assert_allclose(float(value.detach()), expected(name, method, batch), rtol=1e-10, atol=1e-12)


STOPPED_TARGETS = {"vrd", "xrd", "clip_rd"}  # KL terms whose target distribution is the student's, gradient stopped


@pytest.mark.parametrize("ds,dt", DIMS)
@pytest.mark.parametrize("name", BUILTIN)
def test_gradcheck(name, ds, dt, monkeypatch):
    """Autograd against finite differences. A loss with stopped-gradient targets (CLIP-RD's VRD and XRD hold one
    student distribution to another, detached) has as its gradient that of the loss with the targets frozen at their
    values: finite differences check the frozen loss, and the method's gradient is checked equal to its gradient."""
    torch.manual_seed(2)
    method = methods.get(name)(ds, dt).double()
    batch = make_batch(ds, dt, seed=3)

    def loss(student_image, student_text, student_image_masked):
        b = methods.DistillBatch(
            student_image, student_text, batch.teacher_image, batch.teacher_text,
            batch.student_logit_scale, batch.teacher_logit_scale, student_image_masked,
        )
        return method(b)

    inputs = (batch.student_image, batch.student_text, batch.student_image_masked)
    if name in STOPPED_TARGETS:
        from methods import relational

        method_grads = torch.autograd.grad(loss(*inputs), inputs, allow_unused=True)
        targets, calls, kl_to = [], [0], relational.kl_to
        monkeypatch.setattr(relational, "kl_to", lambda t, z: targets.append(t.detach().clone()) or kl_to(t, z))
        for module in ("vrd", "xrd", "hrd"):
            monkeypatch.setattr(f"methods.{module}.kl_to", relational.kl_to)
        loss(*inputs)  # records the targets at the point checked

        def frozen(t, z):  # the i-th KL of a call, its target the recorded constant
            calls[0] += 1
            return kl_to(targets[(calls[0] - 1) % len(targets)], z)

        for module in ("vrd", "xrd", "hrd"):
            monkeypatch.setattr(f"methods.{module}.kl_to", frozen)
        frozen_grads = torch.autograd.grad(loss(*inputs), inputs, allow_unused=True)
        for got, want in zip(method_grads, frozen_grads):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def test_learnable_parameters_get_gradients_and_scales_are_exponentiated():
    icl = methods.get("icl")(6, 9).double()
    assert torch.isclose(icl.logit_scale(), torch.tensor(1 / 0.07, dtype=torch.float64))
    icl(make_batch(6, 9)).backward()
    assert icl.logit_scale.log_scale.grad is not None and icl.project.weight.grad is not None
    with torch.no_grad():
        icl.logit_scale.log_scale.fill_(10.0)
    assert icl.logit_scale().item() == 100.0  # clamped like CLIP's own scale


def test_gd_closed_form_equals_autograd_of_infonce():
    g = torch.Generator().manual_seed(4)
    v = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    u = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(30.0, dtype=torch.float64)
    autograd_v, autograd_u = torch.autograd.grad(ClipLoss()(v, u, scale), (v, u))
    closed_v, closed_u = clip_loss_gradients(v, u, scale)
    torch.testing.assert_close(closed_v, autograd_v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(closed_u, autograd_u, rtol=1e-12, atol=1e-14)


def test_afd_runs_with_unequal_dims():
    afd = methods.get("afd")(32, 48)
    loss = afd(make_batch(32, 48, dtype=torch.float32))
    loss.backward()
    assert torch.isfinite(loss) and afd.project.weight.shape == (48, 32)


def test_mfd_requires_the_masked_embedding_and_declares_it():
    mfd = methods.get("mfd")(6, 6, mask_ratio=0.5)
    assert mfd.image_mask_ratio == 0.5
    with pytest.raises(ValueError, match="student_image_masked"):
        mfd(make_batch(6, 6, dtype=torch.float32, masked=False))
    with pytest.raises(ValueError, match="mask_ratio"):
        methods.get("mfd")(6, 6, mask_ratio=1.5)


def test_registry_errors_name_the_choices():
    with pytest.raises(methods.UnknownMethodError, match="registered methods: afd, clip_rd, crd"):
        methods.get("kd-that-does-not-exist")
    with pytest.raises(ValueError, match="already registered"):
        @methods.register("fd")
        class Other(methods.DistillMethod):
            """Another FD."""


def test_every_builtin_has_a_description():
    available = methods.available()
    assert set(BUILTIN) <= set(available)
    assert all(available[name] for name in BUILTIN)


def test_under_bf16_autocast_every_term_takes_float32_logits():
    """The trainer's objective under bf16 autocast, as a bf16 run computes it, against the same objective with
    autocast off, on bf16 embeddings near convergence (logits near 100): every term equal to the bit. Before,
    ``scale * v @ uᵀ`` of the task loss, CRD, HRD, TinyCLIP, MobileCLIP's and open_clip's distillation losses was
    stored in bf16 (a spacing of 0.5 at 100) before its softmax, and the terms differed by up to a few percent."""
    from harness.training.objective import Objective

    names = ["crd", "hrd", "tinyclip", "mobileclip_dr", "open_clip_distill", "icl", "fd", "vrd", "xrd", "afd", "gd"]
    objective = Objective({name: (1.0, {}) for name in names}, 64, 96)
    g = torch.Generator().manual_seed(0)
    teacher_image = F.normalize(torch.randn(64, 96, generator=g), dim=-1)
    teacher_text = F.normalize(teacher_image + 0.05 * torch.randn(64, 96, generator=g), dim=-1)  # near-paired
    student = lambda t: (t[:, :64] + 0.01 * torch.randn(64, 64, generator=g)).bfloat16()  # noqa: E731
    batch = methods.DistillBatch(student(teacher_image), student(teacher_text), teacher_image.bfloat16(),
                                 teacher_text.bfloat16(), torch.tensor(100.0), torch.tensor(100.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = objective(batch)
    exact = objective(batch)
    assert mixed.keys() == exact.keys() == {"task", *names}
    for name, value in exact.items():
        assert value.dtype == mixed[name].dtype == torch.float32 and torch.equal(mixed[name], value), name


def test_registering_a_method_leaves_the_random_stream_alone():
    """The registry builds a method once to check its contract. Built-ins register on first lookup, inside a
    run's set-up, after its seed: a draw there would move every initialisation after it (a learned projection's)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()

    @methods.register("test-draws-at-build")
    class Draws(methods.DistillMethod):
        def __init__(self, student_dim, teacher_dim):
            super().__init__(student_dim, teacher_dim)
            self.project = torch.nn.Linear(student_dim, teacher_dim)

        def forward(self, batch):
            return self.project(batch.student_image).sum()

    assert torch.equal(torch.get_rng_state(), before)


def test_the_methods_listed_without_importing_them_are_the_registrys():
    """``clipkd methods`` reads the built-ins' descriptions from their files (no torch); they are the registry's."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import sys, json, methods; listed = methods.descriptions(); assert 'torch' not in sys.modules; "
              "print(json.dumps([listed, methods.available()]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed, registered = json.loads(out)
    assert listed == registered and len(listed) == len(methods.BUILTIN)

"""RiemannianMuon: torch.optim.Muon's numbers on plain matrices, AdamW routing, and the
spectral-norm steepest direction on manifolds against exact optima and its certificate."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch

from manifold_opt import PSI, ConditionedSpectrum, Manifold, ManifoldParameter, RiemannianMuon, Sphere, Stiefel
from manifold_opt.manifolds.spectral import POLAR_EXPRESS, duality_gap, msign
from tests.host_reads import reads_during_step

cvxpy = pytest.importorskip("cvxpy")


def _pairs(shapes, seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def _run(opt_a, opt_b, params_a, params_b, steps, grad_fn=torch.randn_like):
    for _ in range(steps):
        for a, b in zip(params_a, params_b):
            g = grad_fn(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


@pytest.mark.parametrize(
    ("nesterov", "adjust_lr_fn", "momentum", "weight_decay"),
    list(itertools.product((True, False), (None, "original", "match_rms_adamw"), (0.0, 0.95), (0.0, 0.1))),
)
def test_plain_matrices_match_torch_muon_in_bfloat16(nesterov, adjust_lr_fn, momentum, weight_decay):
    shapes = [(8, 5), (5, 8), (6, 6), (8, 5), (32, 16)]  # two (8, 5): one bucket of two
    ours, theirs = _pairs(shapes)
    kwargs = dict(lr=0.02, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    steps = 6
    _run(
        RiemannianMuon(ours, ns_dtype=torch.bfloat16, **kwargs), torch.optim.Muon(theirs, **kwargs), ours, theirs, steps
    )
    for a, b in zip(ours, theirs):
        # bound: one bfloat16 rounding (2^-8 relative) of an update entry of size <= 1.5 per step
        scale = 0.02 * 0.2 * max(a.shape) ** 0.5 if adjust_lr_fn == "match_rms_adamw" else 0.02 * 2
        assert (a - b).abs().max().item() <= steps * scale * 1.5 * 2**-8


def test_float32_newton_schulz_is_the_same_iteration():
    ours, theirs = _pairs([(16, 8)] * 3)
    opt = RiemannianMuon(ours, lr=0.01, ns_dtype=torch.float64)
    ref = torch.optim.Muon(theirs, lr=0.01)
    _run(opt, ref, ours, theirs, 3)
    for a, b in zip(ours, theirs):  # torch in bfloat16, ours in float64: bf16 rounding apart
        assert (a - b).abs().max().item() < 3 * 0.01 * 2 * 2**-6


def test_conv_kernels_and_expert_stacks_are_matrices():
    torch.manual_seed(1)
    conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    experts = torch.nn.Parameter(torch.randn(3, 6, 10))
    flat = torch.nn.Parameter(conv.detach().reshape(8, 36).clone())
    each = [torch.nn.Parameter(e.clone()) for e in experts.detach()]
    ours = RiemannianMuon(
        [{"params": [conv]}, {"params": [experts], "matrix_batch_dims": 1}], lr=0.02, ns_dtype=torch.bfloat16
    )
    ref = torch.optim.Muon([flat, *each], lr=0.02)
    for _ in range(3):
        conv.grad, experts.grad = torch.randn_like(conv), torch.randn_like(experts)
        flat.grad = conv.grad.reshape(8, 36).clone()
        for e, g in zip(each, experts.grad):
            e.grad = g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(conv.detach().reshape(8, 36), flat.detach(), atol=1e-3)
    assert torch.allclose(experts.detach(), torch.stack([e.detach() for e in each]), atol=1e-3)


def test_adamw_routing_matches_torch_adamw_and_is_reported():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
    twin = copy.deepcopy(model)
    opt = RiemannianMuon(
        [
            {"params": list(model[0].parameters()), "algorithm": "adamw"},
            {"params": list(model[1].parameters()) + list(model[2].parameters())},
        ],
        lr=0.02,
        adamw_lr=3e-3,
        adamw_betas=(0.8, 0.99),
        adamw_eps=1e-6,
        adamw_weight_decay=0.05,
    )
    plain = [twin[0].weight, twin[1].bias, twin[2].weight, twin[2].bias]
    ref = torch.optim.AdamW(plain, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    for _ in range(4):
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = torch.randn_like(p)
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
    pairs = [(model[0].weight, twin[0].weight), (model[1].bias, twin[1].bias), (model[2].weight, twin[2].weight)]
    for a, b in pairs:
        torch.testing.assert_close(a, b)
    assert not torch.allclose(model[1].weight, twin[1].weight)  # the matrix took Muon
    report = opt.routing_report()
    assert [row.algorithm for row in report] == ["adamw", "muon", "adamw", "adamw", "adamw"]
    assert "adamw" in str(report) and "2-D" in str(report)


def test_routing_errors_name_the_parameter_and_the_fix():
    w = ManifoldParameter(torch.randn(6, 3), Stiefel())
    with pytest.raises(ValueError, match=r"declared on Stiefel.*algorithm 'muon'"):
        RiemannianMuon([{"params": [w], "algorithm": "adamw"}])
    with pytest.raises(ValueError, match=r"shape \(4,\) cannot be stepped by Muon"):
        RiemannianMuon([{"params": [torch.nn.Parameter(torch.randn(4))], "algorithm": "muon"}])
    with pytest.raises(ValueError, match="algorithm"):
        RiemannianMuon([{"params": [w], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        RiemannianMuon([w], adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="oracle_iterations"):
        RiemannianMuon([w], oracle_iterations=5)


# ------------------------------------------------------------------ the oracle


def test_polar_express_schedule_brings_singular_values_to_one():
    s = torch.logspace(-3, 0, 4000, dtype=torch.float64)
    for a, b, c in POLAR_EXPRESS:
        s = a * s + b * s**3 + c * s**5
    assert (s - 1).abs().max().item() < 1e-6


def test_msign_is_the_polar_factor_and_keeps_zero_singular_values():
    torch.manual_seed(3)
    a = torch.randn(4, 30, 12, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64))
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    assert (msign(a) - u @ vh).abs().max().item() < 1e-6
    rank_deficient = a.clone()
    rank_deficient[..., -1] = rank_deficient[..., 0]
    assert torch.linalg.svdvals(msign(rank_deficient))[..., -1].max().item() < 1e-6


def _exact_optimum(x, g, manifold, shape):
    """max <g, A> subject to ||A||_2 <= 1 and A tangent at x (a small SDP, float64); ``x`` and
    ``g`` in the points layout of one parameter of shape ``shape``."""
    rows, cols = manifold.spectral_matrix_shape(shape)
    matrix = cvxpy.Variable((rows, cols))
    basis = torch.eye(rows * cols, dtype=torch.float64)
    tangent = manifold.project_tangent(x.expand(len(basis), *x.shape), basis.reshape(-1, *x.shape))
    normal = basis - tangent.reshape(len(basis), -1)  # A tangent <=> (I - P_T) vec(A) = 0
    constraints = [cvxpy.norm(matrix, 2) <= 1, normal.numpy() @ cvxpy.vec(matrix, order="C") == 0]
    objective = cvxpy.Maximize(cvxpy.sum(cvxpy.multiply(g.reshape(rows, cols).numpy(), matrix)))
    problem = cvxpy.Problem(objective, constraints)
    problem.solve(solver="SCS", eps=1e-10, max_iters=100000)
    return problem.value


def _gradient(kind, shape, generator):
    g = torch.randn(shape, dtype=torch.float64, generator=generator)
    if kind == "ill":
        g = g @ torch.diag(torch.logspace(0, -4, shape[-1], dtype=torch.float64))
    if kind == "rank1":
        g = torch.randn(*shape[:-1], 1, dtype=torch.float64, generator=generator) @ torch.randn(
            1, shape[-1], dtype=torch.float64, generator=generator
        )
    return g


@pytest.mark.parametrize(
    ("shape", "kind"), list(itertools.product([(12, 4), (16, 8), (20, 5)], ["random", "ill", "rank1"]))
)
@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_stiefel_direction_is_the_optimum_in_float32_and_float64(shape, kind):
    generator = torch.Generator().manual_seed(sum(shape))
    st = Stiefel()
    x = st.random_point(shape, generator=generator, dtype=torch.float64)
    g = _gradient(kind, shape, generator)
    optimum = _exact_optimum(x, g, st, shape)
    for dtype, tolerance in ((torch.float64, 1e-4), (torch.float32, 1e-3)):
        direction = st.steepest_direction(x.to(dtype), g.to(dtype), shape, iterations=0).direction.double()
        assert torch.linalg.matrix_norm(direction, 2).item() <= 1 + 10 * torch.finfo(dtype).eps ** 0.5
        tangent = direction - st.project_tangent(x, direction)
        assert tangent.abs().max().item() < (1e-12 if dtype == torch.float64 else 1e-4)
        assert (g * direction).sum().item() >= optimum * (1 - tolerance)


@pytest.mark.parametrize("p", [5, 6])
def test_square_stiefel_closed_form_is_the_optimum(p):
    generator = torch.Generator().manual_seed(p)
    st = Stiefel()
    x = st.random_point((p, p), generator=generator, dtype=torch.float64)
    g = torch.randn(p, p, dtype=torch.float64, generator=generator)
    direction = st.steepest_direction(x, g, (p, p), iterations=0).direction
    assert (x.mT @ direction + direction.mT @ x).abs().max().item() < 1e-9  # tangent for odd p too
    assert (g * direction).sum().item() == pytest.approx(_exact_optimum(x, g, st, (p, p)), rel=1e-6)


@pytest.mark.parametrize(
    ("manifold", "shape"),
    [(Sphere(), (6, 5)), (Sphere(batch_dims=1), (6, 5)), (PSI(), (5, 6)), (Sphere(), (4, 10))],
)
@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_other_manifolds_within_a_hundredth_and_a_thousandth_with_more_iterations(manifold, shape):
    generator = torch.Generator().manual_seed(7)
    points = manifold.to_points(torch.randn(shape, dtype=torch.float64, generator=generator))
    x = manifold.project(points)
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    optimum = _exact_optimum(x, g, manifold, shape)
    for iterations, tolerance in ((100, 1e-2), (300, 1e-3)):
        result = manifold.steepest_direction(x, g, shape, iterations=iterations)
        rows, cols = manifold.spectral_matrix_shape(shape)
        matrix = result.direction.reshape(-1, rows, cols)
        assert torch.linalg.matrix_norm(matrix, 2).max().item() <= 1 + 1e-9
        assert (result.direction - manifold.project_tangent(x, result.direction)).abs().max().item() < 1e-9
        assert (g * result.direction).sum().item() >= optimum * (1 - tolerance)


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_duality_gap_certifies_the_distance_to_the_optimum():
    generator = torch.Generator().manual_seed(11)
    sphere = Sphere(batch_dims=1)
    x = sphere.project(torch.randn(6, 5, dtype=torch.float64, generator=generator))
    g = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    optimum = _exact_optimum(x, g, sphere, (6, 5))
    for iterations in (5, 20, 80):
        result = sphere.steepest_direction(x, g, (6, 5), iterations=iterations)
        gap = duality_gap(
            g[None], result.direction[None], result.dual[None], lambda a: sphere.project_tangent(x, a[0])[None]
        ).item()
        value = (g * result.direction).sum().item()
        assert 0 <= 1 - value / optimum <= gap + 1e-7  # the certificate bounds the true error


# ------------------------------------------------------------------ the optimizer on manifolds


def _model():
    torch.manual_seed(5)
    return [
        ManifoldParameter(torch.randn(16, 16), Stiefel()),
        ManifoldParameter(torch.randn(24, 8), Stiefel()),
        ManifoldParameter(torch.randn(8, 24), Stiefel()),
        ManifoldParameter(torch.randn(8, 2, 3, 3), Stiefel()),
        ManifoldParameter(torch.randn(6, 10), Sphere()),
        ManifoldParameter(torch.randn(6, 10), Sphere(batch_dims=1)),
        ManifoldParameter(torch.randn(6, 10), PSI()),
        ManifoldParameter(torch.randn(12, 6), ConditionedSpectrum(kappa=4.0)),
        torch.nn.Parameter(torch.randn(10, 7)),
        torch.nn.Parameter(torch.randn(7)),
    ]


@pytest.mark.parametrize("lr", [1e-3, 0.3, 1e3])
def test_points_stay_on_their_manifolds_at_any_lr(lr):
    params = _model()
    opt = RiemannianMuon(params, lr=lr, weight_decay=0.0, adamw_weight_decay=0.0, oracle_iterations=(20, 3))
    for _ in range(100):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        if hasattr(p, "manifold"):
            assert p.manifold.parameter_distance(p.detach()).item() <= 5e-6, p.manifold
        assert torch.isfinite(p).all()


def test_step_reads_nothing_on_the_host_and_skips_nonfinite_gradients():
    params = _model()
    opt = RiemannianMuon(params, lr=0.05, oracle_iterations=(5, 2))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    assert reads_during_step(opt) == []
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    after = opt.state_dict()["state"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after[index][key]), key


def test_state_dict_round_trip_with_weights_only_gives_the_same_steps():
    params = _model()
    opt = RiemannianMuon(params, lr=0.05, oracle_iterations=(5, 2))
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    for step in grads[:2]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_params = [copy.deepcopy(p) for p in params]
    twin = RiemannianMuon(twin_params, lr=0.05, oracle_iterations=(5, 2))
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    clone = copy.deepcopy(opt)
    clone_params = [p for group in clone.param_groups for p in group["params"]]
    for step in grads[2:]:
        for trio in zip(params, twin_params, clone_params, step):
            for p in trio[:3]:
                p.grad = trio[3].clone()
        opt.step()
        twin.step()
        clone.step()
    for a, b, c in zip(params, twin_params, clone_params):
        assert torch.equal(a.detach(), c.detach())
        # a loaded optimizer re-projects its points on their first step: float32 rounding apart
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


def test_half_precision_parameters_step_in_float32_geometry():
    w = ManifoldParameter(torch.randn(16, 8).to(torch.bfloat16), Stiefel())
    plain = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = RiemannianMuon([w, plain], lr=0.05, oracle_iterations=(5, 2))
    for _ in range(3):
        w.grad, plain.grad = torch.randn_like(w), torch.randn_like(plain)
        opt.step()
    assert w.dtype == torch.bfloat16 and opt.state[w]["momentum_buffer"].dtype == torch.float32
    assert Stiefel().parameter_distance(w.detach().float()).item() < 1e-2  # bfloat16 storage


@pytest.mark.parametrize(
    ("manifold", "shape"), [(Stiefel(), (6, 6)), (Stiefel(), (12, 4)), (Stiefel(), (3, 10)), (Sphere(), (5, 4))]
)
def test_steepest_direction_gap_certifies_each_manifolds_direction(manifold, shape):
    from manifold_opt.checks import steepest_direction_gap

    generator = torch.Generator().manual_seed(13)
    x = manifold.project(manifold.to_points(torch.randn(shape, dtype=torch.float64, generator=generator)))
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    assert steepest_direction_gap(manifold, x, g, shape, iterations=300).max().item() < 1e-4
    # a direction that is not the steepest one is not certified: half of it plus noise
    worse = manifold.steepest_direction(x, g, shape, iterations=300).direction + 0.5 * manifold.random_tangent(x)
    from manifold_opt.manifolds.spectral import duality_gap as gap

    rows, cols = manifold.spectral_matrix_shape(shape)
    dual = Manifold.steepest_direction(manifold, x, g, shape, iterations=300).dual.reshape(-1, rows, cols)
    project = lambda a: manifold.project_tangent(x, a.reshape(x.shape)).reshape(a.shape)  # noqa: E731
    assert gap(g.reshape(-1, rows, cols), worse.reshape(-1, rows, cols), dual, project).max().item() > 1e-3


def test_complex_stiefel_direction_is_tangent_with_the_nuclear_norm_value_on_square_points():
    generator = torch.Generator().manual_seed(17)
    st = Stiefel()
    for shape in ((6, 6), (12, 4), (9, 7)):
        x = st.random_point(shape, generator=generator, dtype=torch.complex128)
        g = torch.randn(shape, dtype=torch.complex128, generator=generator)
        a = st.steepest_direction(x, g, shape, iterations=0).direction
        assert (a - st.project_tangent(x, a)).abs().max().item() < 1e-9
        assert torch.linalg.matrix_norm(a, 2).item() <= 1 + 1e-9
        value = (g.conj() * a).real.sum().item()
        upper = torch.linalg.matrix_norm(st.project_tangent(x, g), "nuc").item()
        assert value <= upper + 1e-9
        if shape[0] == shape[1]:
            assert value == pytest.approx(upper, rel=1e-9)


def test_lr_schedulers_and_param_groups_follow_torch_muon():
    ours, theirs = _pairs([(8, 5), (6, 6)])
    opt = RiemannianMuon([{"params": [ours[0]]}, {"params": [ours[1]], "lr": 0.05}], lr=0.02)
    ref = torch.optim.Muon([{"params": [theirs[0]]}, {"params": [theirs[1]], "lr": 0.05}], lr=0.02)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for scheduler in schedulers:
            scheduler.step()
    assert opt.param_groups[1]["lr"] == ref.param_groups[1]["lr"] == 0.05 / 16
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 4 * 0.1 * 1.5 * 2**-8


def test_per_group_manifolds_and_a_geoopt_manifold_through_the_generic_solver():
    geoopt = pytest.importorskip("geoopt")
    torch.manual_seed(19)
    declared = torch.nn.Parameter(torch.randn(12, 4))
    canonical = geoopt.ManifoldParameter(torch.linalg.qr(torch.randn(12, 4))[0], manifold=geoopt.CanonicalStiefel())
    opt = RiemannianMuon(
        [{"params": [declared], "manifold": Stiefel()}, {"params": [canonical]}], lr=0.05, oracle_iterations=(200, 20)
    )
    assert next(row.manifold for row in opt.routing_report()) == Stiefel()
    for _ in range(5):
        declared.grad, canonical.grad = torch.randn_like(declared), torch.randn_like(canonical)
        opt.step()
    for p in (declared, canonical):
        assert Stiefel().distance_to_manifold(p.detach()).item() < 1e-5
    # geoopt manifolds whose tangent projection is not known to be orthogonal: a clear error
    ball = geoopt.ManifoldParameter(torch.zeros(3, 2), manifold=geoopt.PoincareBall())
    with pytest.raises(TypeError, match=r"shape \(3, 2\) on PoincareBall.*RiemannianAdam"):
        RiemannianMuon([ball])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tests.test_fsdp import process_group

    with process_group(rank, world, port):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        model[0].weight = ManifoldParameter(model[0].weight, Stiefel())
        ddp = DistributedDataParallel(model)
        opt = RiemannianMuon(ddp.parameters(), lr=0.05, adamw_lr=0.01)
        for step in range(5):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            ddp(x[rank * 4 : rank * 4 + 4]).square().mean().backward()  # each rank its half
            opt.step()
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


def test_ddp_on_two_processes_equals_one_process(tmp_path):
    from tests.test_fsdp import spawn

    out = str(tmp_path / "ddp.pt")
    spawn(_ddp_worker, 2, out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model[0].weight = ManifoldParameter(model[0].weight, Stiefel())
    opt = RiemannianMuon(model.parameters(), lr=0.05, adamw_lr=0.01)
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for key, value in torch.load(out, weights_only=True).items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=2e-5)


@pytest.mark.parametrize("rank", [1, 5])
def test_low_rank_gradients_on_tall_float32_points_give_finite_unit_tangent_directions(rank):
    # the p x p Cholesky factor of a rank-deficient Gram matrix plus its shift failed in
    # float32 (NaN directions for about one rank-1 gradient in eight)
    st = Stiefel()
    generator = torch.Generator().manual_seed(rank)
    for n, p in [(256, 64), (512, 128), (300, 20), (64, 16)] * 5:
        x = st.random_point((n, p), generator=generator)
        g = torch.randn(n, rank, generator=generator) @ torch.randn(rank, p, generator=generator)
        a = st.steepest_direction(x, g, (n, p), iterations=0).direction
        assert torch.isfinite(a).all()
        assert torch.linalg.matrix_norm(a, 2).item() <= 1 + 1e-3
        assert (a - st.project_tangent(x, a)).abs().max().item() < 1e-4
        # the optimum is the nuclear norm of skew(G X^T) (test_stiefel_direction_is_the_optimum...
        # checks the closed form against semidefinite programs on small shapes)
        xi = 0.5 * (g.double() @ x.double().mT - x.double() @ g.double().mT)
        optimum = torch.linalg.matrix_norm(xi, "nuc").item()
        assert (g.double() * a.double()).sum().item() >= (1 - 1e-3) * optimum


def test_the_gap_of_a_nonfinite_direction_is_nan_not_an_error():
    from manifold_opt.manifolds.spectral import duality_gap as gap

    g = torch.randn(1, 6, 3, dtype=torch.float64)
    direction = torch.full_like(g, float("nan"))
    assert torch.isnan(gap(g, direction, torch.zeros_like(g), lambda a: a)).all()

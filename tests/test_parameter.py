"""ManifoldParameter: construction, copies, devices, checkpoints (geoopt issues 81, 104, 188)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from manifold_opt import Euclidean, ManifoldParameter, RiemannianAdam, Sphere, Stiefel


class Net(nn.Module):
    """A small model with Stiefel, oblique and Euclidean parameters."""

    def __init__(self, constrained: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)
        if constrained:
            self.conv.weight = ManifoldParameter(self.conv.weight, Stiefel())
            self.fc.weight = ManifoldParameter(self.fc.weight, Sphere(batch_dims=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 2, 4, 4, generator=gen)
        target = torch.randint(0, 3, (5,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()


def test_data_is_projected_at_construction() -> None:
    w = ManifoldParameter(torch.randn(6, 3), Stiefel())
    torch.testing.assert_close(w.detach().T @ w.detach(), torch.eye(3))
    assert isinstance(w, nn.Parameter) and w.requires_grad
    assert ManifoldParameter(torch.randn(2), requires_grad=False).requires_grad is False
    assert ManifoldParameter(torch.randn(2)).manifold == Euclidean()


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"no nearest point.*zero"):
        ManifoldParameter(torch.zeros(4, 3), Sphere(batch_dims=1))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        ManifoldParameter(torch.randn(5), Stiefel())
    with pytest.raises(ValueError, match="floating-point"):
        ManifoldParameter(torch.ones(3, 2, dtype=torch.int64), Stiefel())
    with pytest.raises(TypeError, match="manifold must be"):
        ManifoldParameter(torch.randn(3), "sphere")  # type: ignore[arg-type]


def test_half_precision_data_is_projected_in_float32() -> None:
    w = ManifoldParameter(torch.randn(16, 4, dtype=torch.bfloat16), Stiefel())
    assert w.dtype == torch.bfloat16
    gram = w.detach().float().T @ w.detach().float()
    assert (gram - torch.eye(4)).abs().max() < 2e-2  # bf16 rounding of an orthonormal matrix


def test_deepcopy_and_pickle_keep_class_manifold_and_data() -> None:
    w = ManifoldParameter(torch.randn(6, 3), Stiefel(retraction="polar"))
    for clone in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert type(clone) is ManifoldParameter
        assert clone.manifold == w.manifold and clone.requires_grad
        torch.testing.assert_close(clone.detach(), w.detach(), rtol=0, atol=0)
        assert clone.data_ptr() != w.data_ptr()
    model = copy.deepcopy(Net())
    assert isinstance(model.conv.weight, ManifoldParameter)


def test_module_to_keeps_the_parameter() -> None:
    model = Net().to(torch.float64)
    assert isinstance(model.conv.weight, ManifoldParameter)
    assert model.conv.weight.dtype == torch.float64 and model.conv.weight.manifold == Stiefel()


def test_checkpoint_round_trip_with_weights_only(tmp_path) -> None:
    """torch.save({"model": ..., "opt": ...}) loads with weights_only=True and training resumes
    exactly; the checkpoint loads into a plain model and back."""
    torch.manual_seed(0)
    model = Net()
    opt = RiemannianAdam(model.parameters(), lr=0.01)
    train(model, opt, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    train(model, opt, 3, seed=1)  # the uninterrupted run

    checkpoint = torch.load(path, weights_only=True)
    resumed = Net()
    resumed.load_state_dict(checkpoint["model"])
    assert isinstance(resumed.conv.weight, ManifoldParameter)  # the manifold is kept
    resumed_opt = RiemannianAdam(resumed.parameters(), lr=0.01)
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, 3, seed=1)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    plain = Net(constrained=False)
    plain.load_state_dict(checkpoint["model"])
    back = Net()
    back.load_state_dict(plain.state_dict())
    assert isinstance(back.conv.weight, ManifoldParameter)
    torch.testing.assert_close(back.conv.weight.detach(), checkpoint["model"]["conv.weight"], rtol=0, atol=0)


def test_pickled_parameters_load_with_weights_only() -> None:
    model = Net()
    buffer = io.BytesIO()
    torch.save(model.state_dict(keep_vars=True), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert type(loaded["conv.weight"]) is ManifoldParameter
    assert loaded["fc.weight"].manifold == Sphere(batch_dims=1)


def test_data_on_a_geoopt_manifold_is_projected_at_construction() -> None:
    """``ManifoldParameter(torch.randn(8, 4), geoopt.EuclideanStiefel())`` used to keep the data
    as it was (16 off the manifold), against "projected at construction": geoopt manifolds
    with a native counterpart are projected by it, the others by their own ``projx``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import geoopt

    torch.manual_seed(0)
    stiefel = ManifoldParameter(torch.randn(8, 4), geoopt.EuclideanStiefel())
    assert isinstance(stiefel.manifold, geoopt.EuclideanStiefel)
    assert float((stiefel.detach().T @ stiefel.detach() - torch.eye(4)).abs().max()) < 1e-5
    rows = ManifoldParameter(3 * torch.randn(5, 6, dtype=torch.float64), geoopt.Sphere())
    torch.testing.assert_close(rows.detach().norm(dim=-1), torch.ones(5, dtype=torch.float64))
    spd = ManifoldParameter(torch.randn(3, 3, dtype=torch.float64), geoopt.SymmetricPositiveDefinite())
    torch.testing.assert_close(spd.detach(), spd.detach().mT)
    assert bool((torch.linalg.eigvalsh(spd.detach()) > 0).all())
    with pytest.raises(ValueError, match="NaN or Inf"):
        ManifoldParameter(torch.full((4, 2), float("nan")), geoopt.EuclideanStiefel())
